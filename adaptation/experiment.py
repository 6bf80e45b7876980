"""One experiment: the runs of train.py, from a features file to a runs folder and its summary.

`run_experiment(config, device)` does what `train.py` does once its flags are parsed: it checks
everything that can be wrong with the input before writing anything, draws each run's split,
trains each run (`adaptation.training.train`, with `adaptation.positive_training.PositivePairLoss`
for the positive-pair objectives), writes each run's folder (config.json, metrics.json,
TensorBoard events, the checkpoint and `best.pt` with validation pairs) and the summary over
runs (`adaptation.runs`), and returns that summary. The user manual is train.py's `--help` and
the README; the layout of the runs folder is `adaptation.runs`'s.

Under torchrun (`ranks`, joined by the caller) every rank trains and only rank 0 writes; checks
that only rank 0 makes (the output folder) and failures any rank finds reach every rank through
`toolkit.distributed.Ranks`.

Example:
    >>> cfg = ExperimentConfig(data="features.npy", save_to="runs", train=TrainConfig(epochs=5, temperature=15))  # doctest: +SKIP
    >>> summary = run_experiment(cfg, torch.device("cpu"))                                      # doctest: +SKIP
    >>> summary.final["Test/top 1"]["mean"]                                                      # doctest: +SKIP
    0.39
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from featuresExtractor.manifest import MANIFEST, read_manifest
from featuresExtractor.pairs_file import Pairs, load_pairs
from featuresExtractor.subset import describe_subset, match_subset, missing_line, read_subset
from toolkit.checks import check_fields
from toolkit.distributed import Ranks
from toolkit.lock import folder_lock
from toolkit.utils import UserError, check_writable, os_error_line, write_json

from .calibration import calibrate
from .cca import CCARun, DEFAULT_RIDGE, check_k, check_ridge, fit_run
from .checkpoint import BEST_CHECKPOINT, CHECKPOINT, provenance_of, save_checkpoint
from .distributed import all_reduce_min, broadcast_int
from .losses import similarity_matrix
from .models import OUT_DIM_MODELS, build_model, model_kwargs
from .objectives import DEFAULT_EMA, EMA, build_objective
from .positive_training import OUTPUT_STD, PositivePairLoss
from .runs import AVERAGE, average_curves, check_save_to, collapse_verdict, replacing, run_dir, summarise, write_summary
from .selection import VAL_SPLIT, best_epoch, patience_exhausted, split_validation
from .split import TrainData, split_each, split_indices
from .training import AT_LEAST_1, SEED, ZERO_OR_MORE, TrainConfig, largest_fitting_batch, make_optimizer, step_bytes, train

__all__ = ["ExperimentConfig", "Summary", "run_experiment", "resolve_batch_size", "check_objective",
           "check_model", "check_memory", "available_bytes", "output_folder", "event_writer"]


@dataclass(frozen=True)
class ExperimentConfig:
    """Everything one invocation of train.py decides, as plain values (train.py's flags, one to one).

    Each field's default and rule are written here (and in `train`'s `TrainConfig`) once: train.py's
    flags take them from these fields (`toolkit.checks`). A bad value is a `ValueError`; what
    depends on the data (a split too small, a batch the ranks cannot share) is a `UserError` of
    `run_experiment`, before anything is written.

    Attributes:
        data: the features file of pairs (extract.py's `features*.npy`).
        save_to: the runs folder.
        model: `original`, `linear`, `peterson`, `dummy` or `cca` (`adaptation.models`; `cca` is fitted in
            closed form, `adaptation.cca`, then evaluated once: one "epoch", fp32 figures).
        train: the recipe (`adaptation.training.TrainConfig`: epochs, batch_size, temperature, lr,
            weight_decay, precision, topk); `batch_size=None` is the full batch. Its `seed` is
            left as it is: the runs take `seed`.
        runs: independent runs; run i splits and initialises with `seed + i - 1` unless `same_split`.
        test_split, val_split: shares of the pairs held out for testing, and of the training pairs
            for validation (0: none).
        patience: stop a run after this many epochs without a better validation top-1.
        seed: None draws one (recorded).
        objective: `contrastive`, `simsiam` or `byol`; `ema` is byol's base decay (None: the default).
        allow_pickle: accept the original implementation's pickled features file.
        images: log the TensorBoard retrieval grid when the images are at hand.
        overwrite: replace the runs already in `save_to`.
        subset: a subset file (`featuresExtractor.subset`): train and test on the pairs it names only
            (e.g. the paper's published `TLL_obj.csv`).
        out_dim: the output width of `original` or `linear` (None: the model's default, 1024 or 256).
        cca_k: model `cca`: the directions kept (None: chosen on the validation pairs, `adaptation.cca`).
        cca_ridge: model `cca`: the ridge on Cov(l - r), a share of its trace over D (None: `DEFAULT_RIDGE`).
    """

    data: str
    save_to: str
    model: str = "original"
    train: TrainConfig = TrainConfig()
    runs: int = field(default=1, metadata={"check": AT_LEAST_1})
    same_split: bool = False
    test_split: float = 0.25
    val_split: float = field(default=0.0, metadata={"check": VAL_SPLIT})
    patience: int | None = field(default=None, metadata={"check": AT_LEAST_1})
    seed: int | None = field(default=None, metadata={"check": SEED})
    objective: str = "contrastive"
    ema: float | None = field(default=None, metadata={"check": EMA})
    allow_pickle: bool = False
    images: bool = True
    overwrite: bool = False
    subset: str | None = None
    out_dim: int | None = field(default=None, metadata={"check": AT_LEAST_1})
    cca_k: int | None = field(default=None, metadata={"check": AT_LEAST_1})
    cca_ridge: float | None = field(default=None, metadata={"check": ZERO_OR_MORE})

    def __post_init__(self) -> None:
        check_fields(self)
        if self.train.seed != TrainConfig.seed:  # it would be ignored: the runs take `seed`
            raise ValueError(f"train.seed is the experiment's: give seed={self.train.seed}, not train.seed")


@dataclass
class Summary:
    """What an experiment returns (rank 0; other ranks get an empty one).

    Attributes:
        config: what summary.json records as the shared configuration.
        final: the final figures over runs, `{name: {"mean", "std", "values"}}`.
        best_val: the same at each run's best validation epoch (with `epochs`), or None.
        collapse: the positive-pair objectives' collapse verdict, or None.
        runs_seconds: each run's training time.
    """

    config: dict[str, Any] = field(default_factory=dict)
    final: dict[str, dict] = field(default_factory=dict)
    best_val: dict[str, Any] | None = None
    collapse: dict[str, Any] | None = None
    runs_seconds: list[float] = field(default_factory=list)


Log = Callable[[str], None]


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)


def check_objective(cfg: ExperimentConfig, n_train: int, batch_size: int | None) -> None:
    """Refuse flag combinations that would be silently ignored, or that would never make an optimiser step."""
    if cfg.ema is not None and cfg.objective != "byol":
        raise UserError(f"ema applies to objective byol only (this run: {cfg.objective})")
    if cfg.objective == "contrastive":  # (a model with nothing to train is build_objective's to refuse)
        return
    # The predictor's BatchNorm needs two rows: a smaller batch is left out, so the run would never step.
    least = PositivePairLoss.min_rows
    if min(batch_size or n_train, n_train) < least:
        raise UserError(f"objective {cfg.objective} needs at least {least} pairs per batch (its predictor's BatchNorm), "
                        f"and batch_size {batch_size or n_train} of {n_train} training pairs would make no "
                        f"optimiser step; use batch_size {least} or more")


def check_model(cfg: ExperimentConfig, in_dim: int) -> dict[str, Any]:
    """Refuse model settings that do not apply or cannot fit; returns the model's `build_model` keywords."""
    if cfg.out_dim is not None and cfg.model not in OUT_DIM_MODELS:
        width = "; its width is cca_k" if cfg.model == "cca" else ""
        raise UserError(f"out_dim applies to models {' and '.join(OUT_DIM_MODELS)} (this run: {cfg.model}{width})")
    if cfg.model != "cca":
        given = [name for name in ("cca_k", "cca_ridge") if getattr(cfg, name) is not None]
        if given:
            raise UserError(f"{given[0]} applies to model cca only (this run: {cfg.model})")
        return {} if cfg.out_dim is None else {"out_dim": cfg.out_dim}
    if cfg.objective != "contrastive":
        raise UserError(f"model cca is fitted in closed form, so objective {cfg.objective} (a training objective) "
                        f"does not apply; leave objective at contrastive")
    check_ridge(cfg.cca_ridge if cfg.cca_ridge is not None else DEFAULT_RIDGE)
    if cfg.cca_k is not None:
        check_k(cfg.cca_k, in_dim)
    elif cfg.val_split == 0:
        raise UserError("model cca needs cca_k, or val_split to choose k on validation pairs (e.g. val_split 0.1)")
    return {"out_dim": cfg.cca_k}


def resolve_batch_size(requested: int | None, n_train: int, ranks: Ranks) -> int | None:
    """The global batch to train with (None: the whole set), or a UserError naming the nearest valid one."""
    if ranks.world_size > n_train:
        raise UserError(f"{ranks.world_size} ranks but only {n_train} training pairs; use at most "
                        f"--nproc_per_node {n_train}")
    if requested is None or requested >= n_train:
        return None
    if requested % ranks.world_size:
        k = ranks.world_size
        nearest = max(k, min(n_train - n_train % k, k * round(requested / k)))
        raise UserError(f"batch_size {requested} is not a multiple of the {k} ranks (each rank takes an equal "
                        f"share); use batch_size {nearest}")
    return requested


def available_bytes(device: torch.device) -> float:
    """What the device can still hold: free GPU memory, or MemAvailable on the CPU (infinite when unknown)."""
    if device.type == "cuda":
        return float(torch.cuda.mem_get_info(device)[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) * 1024
    except OSError:
        pass
    return math.inf


def check_memory(batch: int | None, n_train: int, in_dim: int, out_dim: int, n_test: int, device: torch.device,
                 ranks: Ranks) -> None:
    """Refuse, before the first step, a batch whose estimated memory exceeds what the device has."""
    b = batch or n_train
    sharing = ranks.local_world_size if device.type == "cpu" else 1
    need = sharing * step_bytes(b, in_dim, out_dim, n_test, ranks.world_size)
    available = all_reduce_min(available_bytes(device), ranks)
    if need <= available:
        return
    fits = largest_fitting_batch(available, in_dim, out_dim, n_test, ranks.world_size, sharing, upper=b)
    what = f"--batch-size {b}" if batch else f"the full batch ({b} pairs)"
    where = f"{device.type}" + (f", {sharing} ranks" if sharing > 1 else "")
    advice = (f"the largest --batch-size that fits is {fits}" if fits else
              "not even the smallest batch fits; free memory or use a machine with more")
    raise UserError(f"training at {what} needs about {need / 2**30:.1f} GiB ({where}), {available / 2**30:.1f} GiB "
                    f"available; {advice}")


@dataclass(frozen=True)
class _Plan:
    """What every run of the experiment shares, decided before anything is written."""

    train: TrainConfig
    seed: int
    split_seeds: list[int]
    splits: list[tuple[np.ndarray, np.ndarray, np.ndarray]]
    shared: dict[str, Any]  # config.json's shared part
    to_remove: list[Path]


def _recipe(cfg: ExperimentConfig, batch_size: int | None, seed: int) -> TrainConfig:
    """The recipe of the runs. Model cca is fitted once in float64, then evaluated once: one "epoch", fp32 figures."""
    closed_form = {"epochs": 1, "precision": "fp32"} if cfg.model == "cca" else {}
    return dataclasses.replace(cfg.train, batch_size=batch_size, seed=seed, **closed_form)


def _cca_settings(cfg: ExperimentConfig) -> dict[str, Any]:
    """config.json's model cca settings (the ridge in effect, the k given or None); nothing for the other models."""
    if cfg.model != "cca":
        return {}
    return {"cca_ridge": cfg.cca_ridge if cfg.cca_ridge is not None else DEFAULT_RIDGE, "cca_k": cfg.cca_k}


def _plan(cfg: ExperimentConfig, pairs: Pairs, data_path: Path, seed: int, device: torch.device,
          ranks: Ranks, subset: dict[str, Any] | None, kwargs: dict[str, Any]) -> _Plan:
    """Check the input and decide the splits and the recipe (a `UserError` on anything wrong, nothing written).

    `subset`: the record of the subset file `pairs` was cut to (`_apply_subset`), or None.
    `kwargs`: the model's (`adaptation.models.model_kwargs` of run 1's model).
    """
    save_to = Path(cfg.save_to)
    to_remove = check_save_to(save_to, cfg.overwrite)
    if cfg.patience is not None and cfg.val_split == 0:
        raise UserError("patience needs validation pairs; add val_split (e.g. 0.1)")
    # Run i draws its split from SEED+i-1 (the paper re-splits for every run), unless same_split.
    split_seeds = [seed if cfg.same_split else seed + run for run in range(cfg.runs)]
    splits = [_split(cfg, len(pairs), s, subset) for s in split_seeds]
    n_train = len(splits[0][0])  # the same for every split
    batch_size = resolve_batch_size(cfg.train.batch_size, n_train, ranks)
    check_objective(cfg, n_train, batch_size)
    train_cfg = _recipe(cfg, batch_size, seed)
    manifest = data_path.parent / MANIFEST
    shared = {
        "data": str(data_path),
        # sha256 of the features and PCA, checked wherever the run is used (None: pairs given in memory, no file)
        "provenance": provenance_of(data_path) if data_path.is_file() else None,
        "manifest": str(manifest) if manifest.is_file() else None,
        "model": cfg.model,
        "in_dim": pairs.in_dim,
        "model_kwargs": kwargs,
        "runs": cfg.runs,
        "seed": seed,
        "same_split": cfg.same_split,
        "test_split": cfg.test_split,
        "n_pairs": len(pairs),
        "subset": subset,
        "n_train": n_train,
        "n_test": len(splits[0][1]),
        "val_split": cfg.val_split,
        "n_val": len(splits[0][2]),
        "patience": cfg.patience,
        "device": device.type,
        "world_size": ranks.world_size,
        "allow_pickle": cfg.allow_pickle,
        "torch": str(torch.__version__),
        **train_cfg.to_dict(),
        "objective": cfg.objective,
        **({"ema": _ema(cfg), "ema_schedule": "cosine from ema to 1 over the optimiser steps (BYOL)"}
           if cfg.objective == "byol" else {}),
        **_cca_settings(cfg),
    }
    return _Plan(train_cfg, seed, split_seeds, splits, shared, to_remove)


def _split(cfg: ExperimentConfig, n_pairs: int, seed: int,
           subset: dict[str, Any] | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One run's (train, test, validation) indices, the validation pairs drawn from the training pairs."""
    try:
        train_idx, test_idx = split_indices(n_pairs, cfg.test_split, seed, cfg.train.topk)
    except UserError as err:
        if subset is None:
            raise
        raise UserError(f"subset file {subset['file']} keeps {subset['kept']} of {subset['of']} pairs, too few "
                        f"to split: {err}") from None
    train_idx, val_idx = split_validation(train_idx, cfg.val_split, seed)
    return train_idx, test_idx, val_idx


def _ema(cfg: ExperimentConfig) -> float:
    return DEFAULT_EMA if cfg.ema is None else cfg.ema


def _build(cfg: ExperimentConfig, in_dim: int, kwargs: dict[str, Any], run_seed: int, device: torch.device):
    """A run's model, its objective (None for the contrastive one) and optimiser, seeded for the run.

    The one place a run's model is built (once per run); `build_objective` refuses a model with
    nothing to train.
    """
    torch.manual_seed(run_seed)
    model = build_model(cfg.model, in_dim, **kwargs).to(device)
    objective = None
    if cfg.objective != "contrastive":
        objective = build_objective(cfg.objective, model, ema=_ema(cfg)).to(device)
    optimizer = make_optimizer(model if objective is None else objective, cfg.train)  # reads lr and weight_decay
    return model, objective, optimizer


@contextlib.contextmanager
def output_folder(save_to: Path, ranks: Ranks) -> Iterator[None]:
    """Hold the output folder for the whole experiment: one run at a time per folder.

    The check that it can be written and the OS lock (released by the kernel however the
    process ends) are rank 0's alone under torchrun, the one rank that writes; when it refuses,
    every rank stops (exit 2) and rank 0 alone says why (`Ranks.agree`).
    """
    with contextlib.ExitStack() as stack:
        def hold() -> None:
            try:
                check_writable(save_to, "-s")
                stack.enter_context(folder_lock(save_to, "-s"))
            except OSError as err:  # e.g. a folder that check_writable's probe could create but the lock cannot
                raise UserError(f"-s {save_to}: {os_error_line(err)}") from None

        ranks.agree(hold)
        yield


def run_experiment(cfg: ExperimentConfig, device: torch.device, ranks: Ranks = Ranks(), pairs: Pairs | None = None,
                   log: Log = _stderr) -> Summary:
    """Train, log and save the experiment `cfg` describes on `device`; returns the summary over runs.

    Args:
        cfg: the experiment.
        device: where to train (the caller chooses it: `cuda:LOCAL_RANK` under torchrun).
        ranks: this process's place under torchrun, its group joined (`Ranks.join`); `Ranks()` alone.
        pairs: the pairs already loaded from `cfg.data` (read from it when None).
        log: where progress lines go (stderr by default); rank 0 alone logs.

    Raises:
        UserError: anything wrong with the input, found before anything is written (on every rank).
    """
    save_to = Path(cfg.save_to)
    with output_folder(save_to, ranks):
        drawn = cfg.seed if cfg.seed is not None else int(np.random.SeedSequence().entropy % 2**31)
        seed = broadcast_int(drawn, ranks)  # every rank must draw the same splits and batches
        data_path = Path(cfg.data).resolve()

        # Everything that can be wrong with the input is found before anything is written; under
        # torchrun every rank checks, and none goes on until all have (rank 0 then writes).
        failure, missing = None, []
        try:
            loaded = pairs if pairs is not None else load_pairs(data_path, allow_pickle=cfg.allow_pickle)
            subset = None
            if cfg.subset is not None:
                loaded, subset, missing = _apply_subset(loaded, Path(cfg.subset), data_path)
            kwargs = check_model(cfg, loaded.in_dim)
            first = _build(cfg, loaded.in_dim, kwargs, seed, device)  # run 1's model, its one build
            plan = _plan(cfg, loaded, data_path, seed, device, ranks, subset,
                         kwargs if cfg.model == "cca" else model_kwargs(first[0]))
        except UserError as err:
            failure = err
        ranks.check(failure)
        if missing and ranks.rank == 0:
            log(missing_line(cfg.subset, missing, str(data_path)))
        out_dim = first[0].out_dim
        check_memory(plan.train.batch_size, plan.shared["n_train"], loaded.in_dim, out_dim, plan.shared["n_test"],
                     device, ranks)
        images_root = _dataset_root(data_path) if cfg.images else None
        runs = split_each(loaded, plan.splits, device)
        del loaded, pairs  # `runs` holds the vectors now and lets them go before the last run trains
        experiment = _Experiment(cfg, plan, device, ranks, images_root, log, first)
        if ranks.rank != 0:
            for run in range(1, cfg.runs + 1):
                experiment.one_run(run, next(runs))
            return Summary()
        with replacing(save_to, plan.to_remove):
            log(experiment.headline())
            # next(runs) inside the loop: the previous run's sets are gone before the next ones are made.
            results = [experiment.one_run(run, next(runs)) for run in range(1, cfg.runs + 1)]
            return experiment.summarise(results, out_dim)


def _apply_subset(pairs: Pairs, path: Path, data_path: Path) -> tuple[Pairs, dict[str, Any], list[str]]:
    """`pairs` cut to the names a subset file lists: (the kept pairs, the subset's record, the names not found)."""
    names = read_subset(path)
    kept, missing = match_subset(pairs.names, names)
    if not kept:
        raise UserError(f"subset file {path} names none of the {len(pairs)} pairs in {data_path} (first names: "
                        f"{', '.join(names[:3])}); is it the subset of these features?")
    record = {**describe_subset(path, names), "kept": len(kept), "of": len(pairs)}
    return pairs.select(kept), record, missing


def _dataset_root(data_path: Path) -> Path | None:
    """The pairs folder that the features file's extraction manifest records, when it is still there.

    Only for the optional image grid: no manifest, or one that is not extract.py's, just means no grid.
    """
    if not (data_path.parent / MANIFEST).is_file():
        return None
    try:
        dataset = read_manifest(data_path).get("dataset")
    except UserError:
        return None
    if not isinstance(dataset, dict) or not isinstance(dataset.get("path"), str) or dataset.get("kind") != "pairs":
        return None
    root = Path(dataset["path"])
    return root if (root / "left").is_dir() and (root / "right").is_dir() else None


@torch.no_grad()
def _calibrated(model: torch.nn.Module, data: TrainData) -> dict[str, Any]:
    """The cosine threshold calibrated on the validation pairs with `model` as it is now, as a dict."""
    model.eval()
    return calibrate(similarity_matrix(model(data.val[0]), model(data.val[1]))).to_dict()


class _BestKeeper:
    """Follows a run's validation figures: keeps the best epoch's weights and threshold, says when to stop.

    With `keep=False` (ranks other than 0 under torchrun) it only says when to stop: every rank
    sees the same figures, so all stop at the same epoch.
    """

    def __init__(self, model: torch.nn.Module, optimizer, data: TrainData, k: int, patience: int | None,
                 keep: bool = True):
        self.model, self.optimizer_now, self.data, self.k, self.patience = model, optimizer, data, k, patience
        self.keep = keep
        self.rows: list[dict[str, float]] = []
        self.epoch, self.state, self.optimizer, self.threshold = 0, None, None, None

    def update(self, epoch: int, metrics: dict[str, float]) -> bool:
        """Record an epoch; returns True when the run should stop."""
        self.rows.append(metrics)
        if self.keep and best_epoch(self.rows, self.k) == epoch:
            self.epoch = epoch
            self.state = copy.deepcopy(self.model.state_dict())
            self.optimizer = copy.deepcopy(self.optimizer_now.state_dict()) if self.optimizer_now is not None else None
            self.threshold = _calibrated(self.model, self.data)
        return self.patience is not None and patience_exhausted(self.rows, self.patience, self.k)

    def summary(self, epochs_run: int, epochs: int) -> dict[str, Any]:
        """What metrics.json records about the selection."""
        return {"best_epoch": self.epoch, "patience": self.patience, "epochs_run": epochs_run,
                "stopped_early": epochs_run < epochs, "best_threshold": self.threshold}


def _check_finite(run: int, epoch: int, metrics: dict[str, float], temperature: float) -> None:
    """Stop the run (a `UserError`) at the first epoch with a non-finite figure, before anything looks complete."""
    bad = [name for name, value in metrics.items() if not math.isfinite(value)]
    if bad:
        # e.g. a temperature that overflows float32
        raise UserError(f"run {run}: the training loss is {metrics['Train/Loss']} ({bad[0]} is not finite) "
                        f"at epoch {epoch}; temperature {temperature} may overflow float32: lower temperature or lr")


@dataclass
class _Experiment:
    """The runs of one experiment, once its plan is made."""

    cfg: ExperimentConfig
    plan: _Plan
    device: torch.device
    ranks: Ranks
    images_root: Path | None
    log: Log
    first: tuple | None  # run 1's model, objective and optimiser (`_build`), until run 1 takes them

    def headline(self) -> str:
        """The line that says what is about to be trained."""
        cfg, shared, ranks = self.cfg, self.plan.shared, self.ranks
        n_val = shared["n_val"]
        subset = shared["subset"]
        what = (f"{shared['n_pairs']} pairs" if subset is None else
                f"on {subset['kept']:,} of {subset['of']:,} pairs (subset {Path(subset['file']).name})")
        return (f"{what} of {shared['in_dim']}-d features ({shared['n_train']} train, "
                f"{f'{n_val} validation, ' if n_val else ''}{shared['n_test']} test, "
                f"{'one split' if cfg.same_split else 'a new split per run'}), model {cfg.model}, {self.device.type}"
                + (f" x {ranks.world_size} ranks" if ranks.distributed else "") +
                f", {self.plan.train.precision}, batch {self.plan.train.batch_size or 'full'}, seed {self.plan.seed}")

    def _fit_cca(self, model, data: TrainData) -> CCARun:
        """Model cca: fit the run's map in closed form (every rank: the sums are added over them) and set it."""
        shared = self.plan.shared
        fitted = fit_run(data, shared["cca_ridge"], shared["cca_k"], self.plan.train.topk, self.plan.train.temperature,
                         self.ranks)
        model.set_map(fitted.weight().to(self.device, torch.float32))
        return fitted

    def one_run(self, run: int, data: TrainData) -> tuple[list[dict[str, float]], dict[str, float] | None, float]:
        """Train run number `run` on its sets and (rank 0) write its folder.

        Returns its history, its row at the best validation epoch (None without validation
        pairs) and the seconds it took.
        """
        cfg, plan = self.cfg, self.plan
        run_seed = plan.seed + run - 1
        built, self.first = self.first, None
        model, objective, optimizer = built or _build(cfg, plan.shared["in_dim"], plan.shared["model_kwargs"],
                                                      run_seed, self.device)
        fitted = self._fit_cca(model, data) if cfg.model == "cca" else None
        keeper = _BestKeeper(model, optimizer, data, plan.train.topk[0], cfg.patience, keep=self.ranks.rank == 0) \
            if data.val is not None else None
        if self.ranks.rank != 0:
            # Every rank gets the same figures, so every rank stops at the same epoch (non-finite, or patience).
            def follow(epoch: int, metrics: dict[str, float]) -> bool:
                _check_finite(run, epoch, metrics, plan.train.temperature)
                return keeper is not None and keeper.update(epoch, metrics)

            return self._train(model, objective, optimizer, data, follow), None, 0.0

        folder = run_dir(cfg.save_to, run)
        config = {**plan.shared, "run": run, "run_seed": run_seed, "split_seed": plan.split_seeds[run - 1],
                  "n_train_flipped": 0 if data.flipped is None else len(data.flipped[0])}
        if fitted is not None:
            config.update(model_kwargs=model_kwargs(model), cca=fitted.record())
            self.log(_cca_line(run, fitted, plan.train.topk[0]))
        write_json(folder / "config.json", config)
        with event_writer(folder) as writer:
            writer.add_text("config", _config_text(config))
            writer.add_text("model", f"```\n{model}\n```")
            if fitted is not None:
                _log_cca(writer, fitted)
            history, seconds = self._train_logged(run, model, objective, optimizer, keeper, data, writer)
        record: dict[str, Any] = {"run": run, "seconds": seconds, "epochs": history}
        best_row = _save_run(folder, cfg.model, model, optimizer, objective, keeper, data, plan.train, config, history,
                             record)
        k = plan.train.topk[0]
        self.log(f"run {run}: {seconds:.1f} s, test top {k} {100 * history[-1][f'Test/top {k}']:.2f}%")
        return history, best_row, seconds

    def _train(self, model, objective, optimizer, data: TrainData, on_epoch) -> list[dict[str, float]]:
        if objective is None:
            return train(model, data, self.plan.train, optimizer, on_epoch=on_epoch, dist=self.ranks)
        return train(objective, data, self.plan.train, optimizer, on_epoch=on_epoch, dist=self.ranks,
                     batch_loss=PositivePairLoss())

    def _train_logged(self, run: int, model, objective, optimizer, keeper, data: TrainData,
                      writer) -> tuple[list[dict[str, float]], float]:
        """Train with a progress bar, each epoch's figures to TensorBoard; returns the history and the seconds taken."""
        from tqdm.auto import tqdm  # slow import, only needed from here on

        k = self.plan.train.topk[0]
        bar = tqdm(total=self.plan.train.epochs, desc=f"run {run}/{self.cfg.runs}", unit="epoch", file=sys.stderr)

        def log(epoch: int, metrics: dict[str, float]) -> bool:
            _check_finite(run, epoch, metrics, self.plan.train.temperature)
            for name, value in metrics.items():
                writer.add_scalar(name, value, epoch)
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['Train/Loss']:.3f}", test_top1=f"{metrics[f'Test/top {k}']:.3f}",
                            refresh=False)
            return keeper is not None and keeper.update(epoch, metrics)

        start = time.perf_counter()
        try:
            history = self._train(model, objective, optimizer, data, log)
            if self.images_root is not None:
                _log_retrieval_grid(writer, model, data, self.images_root, len(history))
        finally:
            bar.close()
        return history, time.perf_counter() - start

    def summarise(self, results: list[tuple[list[dict[str, float]], dict[str, float] | None, float]],
                  out_dim: int) -> Summary:
        """Write the summary of all runs (and their average curves); returns it."""
        save_to = Path(self.cfg.save_to)
        histories = [history for history, _, _ in results]
        if self.cfg.runs > 1:
            with event_writer(save_to / AVERAGE) as writer:  # early-stopped runs: the epochs all of them reached
                for row in average_curves(histories):
                    for name, value in row.items():
                        if name != "epoch":
                            writer.add_scalar(name, value, row["epoch"])
        final = summarise([{k: v for k, v in h[-1].items() if k != "epoch"} for h in histories])
        best_rows = [row for _, row, _ in results if row is not None]
        best_val = None
        if best_rows:
            best_val = {"epochs": [int(r["epoch"]) for r in best_rows],
                        **summarise([{k: v for k, v in r.items() if k != "epoch"} for r in best_rows])}
        collapse = None
        if self.cfg.objective != "contrastive":
            collapse = collapse_verdict([h[-1][OUTPUT_STD] for h in histories], out_dim)
        write_summary(save_to, self.plan.shared, final, best_val=best_val, collapse=collapse)
        return Summary(self.plan.shared, final, best_val, collapse, [s for _, _, s in results])


def _cca_line(run: int, fitted: CCARun, k_metric: int) -> str:
    """What a cca run says of its fit: k, how it was chosen, and the validation figure there and at a few other k."""
    dim = len(fitted.fit.values)
    head = f"run {run}: cca k {fitted.k} of {dim}, {'chosen on validation' if fitted.chosen_on == 'validation' else 'given'}"
    if fitted.curve is None:
        return head
    name = f"Val/top {k_metric}"
    shown = sorted({1, max(1, fitted.k // 2), fitted.k, min(dim, 2 * fitted.k), dim})
    curve = ", ".join(f"k {k}: {100 * fitted.curve[k - 1][name]:.1f}%" for k in shown)
    return f"{head}; validation top {k_metric} {curve} (config.json: cca.val_curve)"


def _log_cca(writer, fitted: CCARun) -> None:
    """The fit in TensorBoard: the eigenvalues and the validation curve against k, and the k chosen."""
    for j, value in enumerate(fitted.fit.values.tolist(), start=1):
        writer.add_scalar("CCA/eigenvalue", value, j)
    for row in fitted.curve or []:
        for name, value in row.items():
            if name != "k":
                writer.add_scalar(f"CCA/{name}", value, row["k"])
    writer.add_scalar("CCA/k", fitted.k, 1)


def _config_text(config: dict[str, Any]) -> str:
    rows = "\n".join(f"| {k} | `{v}` |" for k, v in sorted(config.items()))
    return "| setting | value |\n|---|---|\n" + rows


def _log_retrieval_grid(writer, model: torch.nn.Module, data: TrainData, root: Path, epoch: int) -> None:
    """A few test queries (left) with their top 5 (right), true partner framed green."""
    from .visualize import pair_retrieval_grid

    model.eval()
    with torch.no_grad():
        # Only the shown queries' rows: a large test set's full matrix would not fit.
        sim = similarity_matrix(model(data.test[0][:6]), model(data.test[1]))
    grid = pair_retrieval_grid(sim, data.test_names, root, n_queries=6, k=5)
    writer.add_image("Test/retrieval", np.asarray(grid), epoch, dataformats="HWC")


def _save_run(folder: Path, model_name: str, model, optimizer, objective, keeper: _BestKeeper | None,
              data: TrainData, cfg: TrainConfig, config: dict[str, Any], history: list[dict[str, float]],
              record: dict[str, Any]) -> dict[str, float] | None:
    """Write a finished run's metrics.json and checkpoints (best.pt too with validation pairs).

    Returns its row at the best validation epoch (None without validation pairs).
    """
    final = {k: v for k, v in history[-1].items() if k != "epoch"}
    extra: dict[str, Any] = {}
    best_row = None
    if keeper is not None:
        threshold = _calibrated(model, data)
        record.update(keeper.summary(len(history), cfg.epochs), threshold=threshold)
        extra = {"val_names": list(data.val_names), "threshold": threshold}
        best_row = history[keeper.epoch - 1]
        best_model = copy.deepcopy(model)
        best_model.load_state_dict(keeper.state)
        save_checkpoint(folder / BEST_CHECKPOINT, best_model, None, model_name=model_name, epoch=keeper.epoch,
                        config=config, test_names=data.test_names, train_names=data.train_names,
                        final_metrics={k: v for k, v in best_row.items() if k != "epoch"},
                        optimizer_state=keeper.optimizer, provenance=config["provenance"],
                        **{**extra, "threshold": keeper.threshold})
    write_json(folder / "metrics.json", record)
    save_checkpoint(folder / CHECKPOINT, model, optimizer, model_name=model_name, epoch=len(history), config=config,
                    test_names=data.test_names, train_names=data.train_names, final_metrics=final, objective=objective,
                    provenance=config["provenance"], **extra)
    return best_row


@contextlib.contextmanager
def event_writer(folder: Path) -> Iterator[Any]:
    """A TensorBoard `SummaryWriter` on `folder`, closed on leaving; a write error (a full disk) names the folder.

    TensorBoard writes from a thread of its own, keeps that thread's error and raises it here at
    the next write, flush or close; that thread's traceback is not printed as well.
    """
    from torch.utils.tensorboard import SummaryWriter  # slow import, only needed once a run is written

    _leave_writer_errors_to_the_caller()
    try:
        writer = SummaryWriter(str(folder))
        try:
            yield writer
        finally:
            writer.close()
    except OSError as err:
        if err.filename is None:  # TensorBoard's own errors name no file
            err.filename = str(folder)
        raise


def _leave_writer_errors_to_the_caller() -> None:
    """Keep Python from printing the traceback of TensorBoard's writer thread (once per process)."""
    import threading

    if getattr(threading.excepthook, "leaves_tensorboard_errors", False):
        return
    previous = threading.excepthook

    def hook(args) -> None:
        if isinstance(args.exc_value, OSError) and type(args.thread).__module__.startswith("tensorboard."):
            return  # the writer raises it again in the thread that writes, which reports it in one line
        previous(args)

    hook.leaves_tensorboard_errors = True
    threading.excepthook = hook


