"""Train an adaptation function on pairs of features and report top-k retrieval.

Reproduces the paper's recipe (Risser-Maroix, Kurtz, Loménie, ICIP 2021):

    python train.py -d FEATURES.npy --model original -s RUNS -e 150 -r 1 -t 15 --test-split 0.25 -k 1 3 5 --gpu

`FEATURES.npy` is a pairs features file written by extract.py (`DIR/MODEL/features.npy` or
`features_pca256.npy`), or the original implementation's pickled file with `--allow-pickle`.

Each run `i` writes to `RUNS/run{i}/`:

- TensorBoard scalars `Train/Loss`, `Test/Loss`, `Train/top k`, `Test/top k`,
  `Test/left2right top k`, `Test/right2left top k`, `Test/MRR` (and the other train figures),
  plus the configuration as text;
- `config.json`: the configuration, including `data`, the absolute path of the features file;
- `metrics.json`: every epoch's figures;
- `model_and_optimizer.pt`: see `adaptation.checkpoint`.

With `--val-split F`, a share F of the training pairs is held out as validation pairs (the
test pairs are drawn first and do not change; F = 0, the default, is exactly the run without
it). Each run then also logs `Val/...` scalars, keeps `best.pt`, the checkpoint of the best
validation epoch (see `adaptation.selection`), and stores in both checkpoints a cosine
threshold calibrated on the validation pairs (`adaptation.calibration`); `summary.json` adds
the test figures at the best validation epoch under `best_val`. `--patience P` stops a run
once P epochs pass without a better validation epoch. The test set never chooses anything.

`--batch-size B` trains on minibatches of B pairs (shuffled each epoch, one Adam step each,
in-batch negatives) instead of the whole training set at once; the default is the whole set,
the paper's recipe. The same flags run data-parallel under torchrun (gloo on the CPU, NCCL on
CUDA, one GPU per rank: `cuda:LOCAL_RANK`); only rank 0 writes, and only rank 0 checks and
locks the output folder:

    torchrun --nproc_per_node 2 train.py -d FEATURES.npy -s RUNS --batch-size 4096 ...

With `-r` above 1, each run draws its own train/test split, as the paper's train.py does (it
re-splits after every run): run `i` splits with seed `SEED+i-1` and initialises with the same seed,
so the whole command is reproducible from `--seed`, and each run's checkpoint records its split
(`test_names`, `train_names`, `config["split_seed"]`). `--same-split` keeps run 1's split for every
run instead, which isolates the effect of the initialisation. Run i's validation pairs (with
`--val-split`) are drawn from its own training pairs with the same seed. With `--batch-size`, every run
shuffles its batches from `SEED`.

`RUNS/avg/` holds the mean curves. `RUNS/summary.json` holds the final test (and train) figures as
mean and std (sample std, ddof=1) over runs, and the same table is printed. Without `--same-split`
they describe what the paper's "Avg top1 accuracy" describes: the spread over random splits and
initialisations together; with `--same-split`, over initialisations on one split only.

"top k" is the paper's figure: a test pair counts as found when its partner ranks within the
first k left-to-right OR right-to-left among all test pairs; the paper's 39.39% average top-1
is this figure. See `adaptation.metrics` for the exact definitions.

`--objective simsiam` or `byol` trains the same adaptation model from the positive pairs alone
(no negatives), with a predictor MLP and, for byol, a momentum target (`adaptation.objectives`),
in minibatches of `--batch-size` pairs (`adaptation.positive_training`). The Test figures are
those above, so runs of all objectives compare directly; `Train/Loss` is the objective's own
loss, and `Train/output std` the collapse monitor. `summary.json` then says whether each run
collapsed (`"collapse"`), and the checkpoint keeps the predictor and target.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from adaptation.calibration import calibrate
from adaptation.checkpoint import BEST_CHECKPOINT, CHECKPOINT, provenance_of, save_checkpoint
from adaptation.distributed import (Dist, agree_on_failure, all_reduce_min, broadcast_int, from_env, init_group,
                                    run_ranked_cli)
from adaptation.losses import similarity_matrix
from adaptation.metrics import metric_names
from adaptation.models import MODELS, build_model, model_kwargs
from adaptation.objectives import DEFAULT_EMA, OBJECTIVES, build_objective
from adaptation.positive_training import OUTPUT_STD, train_positive
from adaptation.runs import (AVERAGE, average_curves, check_save_to, collapse_verdict, replacing, run_dir, summarise,
                             write_summary)
from adaptation.selection import best_epoch, patience_exhausted, split_validation
from adaptation.split import TrainData, split_each, split_indices
from adaptation.training import PRECISIONS, TrainConfig, largest_fitting_batch, make_optimizer, step_bytes, train
from featuresExtractor.pairs_file import load_pairs
from toolkit.lock import folder_lock
from toolkit.utils import UserError, check_writable, flag_names, os_error_line, read_json, require_utf8, write_json

PROG = "train.py"


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _seed(text: str) -> int:
    value = int(text)
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"must be between 0 and 2**32-1, got {value}")
    return value


def _float_check(predicate, what: str):
    def parse(text: str) -> float:
        value = float(text)
        if not math.isfinite(value) or not predicate(value):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    """train.py's argument parser; its help is also the command-line reference of the HTML docs."""
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Train an adaptation function on pairs of features; log top-k retrieval to TensorBoard.",
        allow_abbrev=False,
    )
    p.add_argument("-d", "--data", required=True, metavar="FILE",
                   help="features file of pairs written by extract.py (DIR/MODEL/features.npy), or the original implementation's with --allow-pickle")
    p.add_argument("-s", "--save-to", required=True, metavar="DIR",
                   help="output folder: run1/, run2/, ... (TensorBoard, checkpoint, metrics), avg/, summary.json")
    p.add_argument("--model", choices=sorted(MODELS), default="original",
                   help="original: Linear(D,1024,no bias)+ReLU; peterson: x*relu(w); dummy: raw features, no training (default: original)")
    p.add_argument("-e", "--epochs", type=_positive_int, default=150, help="epochs (default: 150)")
    p.add_argument("--batch-size", type=_positive_int, default=None, metavar="B",
                   help="pairs per Adam step (the global batch under torchrun), shuffled each epoch; "
                        "default: all training pairs, one full-batch step per epoch (the paper's recipe)")
    p.add_argument("-r", "--runs", type=_positive_int, default=1,
                   help="independent runs, each with its own split and initialisation, as in the paper (default: 1)")
    p.add_argument("--same-split", action="store_true",
                   help="train every run on run 1's split, so runs differ only in their initialisation")
    p.add_argument("-t", "--temperature", type=_float_check(lambda v: v > 0, "a positive number"), default=1.0,
                   help="multiplies the cosines before the softmax, as in the paper's code (default: 1; the paper's command uses 15)")
    p.add_argument("--test-split", type=_float_check(lambda v: True, "a number"), default=0.25,
                   help="fraction of pairs held out for testing, in (0, 1) (default: 0.25)")
    p.add_argument("--val-split", type=_float_check(lambda v: 0 <= v < 1, "at least 0 and below 1"), default=0.0,
                   help="share of the training pairs held out for validation: best.pt, a calibrated threshold, "
                        "--patience (default: 0, none)")
    p.add_argument("--patience", type=_positive_int, default=None, metavar="P",
                   help="stop a run after P epochs without a better validation top-1 (needs --val-split)")
    p.add_argument("-k", "--topk", type=_positive_int, nargs="+", default=[1, 3], metavar="K",
                   help="k values of the top-k metrics (default: 1 3)")
    dev = p.add_mutually_exclusive_group()
    # As in the paper's train.py: CUDA when present unless --cpu; None = not asked either way.
    dev.add_argument("--gpu", dest="gpu", action="store_true", default=None,
                     help="train on CUDA (the default when CUDA is available; without it, the CPU, said on stderr)")
    dev.add_argument("--cpu", dest="gpu", action="store_false", help="train on the CPU even when CUDA is available")
    p.add_argument("--seed", type=_seed, default=None,
                   help="fixes the splits and the initialisations (run i uses SEED+i-1), 0 to 2**32-1; "
                        "default: drawn at random and recorded")
    p.add_argument("--lr", type=_float_check(lambda v: v > 0, "a positive number"), default=1e-3, help="Adam learning rate (default: 1e-3)")
    p.add_argument("--weight-decay", type=_float_check(lambda v: v >= 0, "zero or more"), default=0.0,
                   help="Adam weight decay (default: 0)")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="bf16: autocast the model and similarity products to bfloat16, loss and evaluation in fp32 (default: fp32)")
    p.add_argument("--objective", choices=OBJECTIVES, default="contrastive",
                   help="contrastive: the paper's loss with in-batch negatives; simsiam: positive pairs only, predictor + "
                        "stop-gradient (Chen and He, 2021); byol: positive pairs only, predictor + momentum target "
                        "(Grill et al., 2020) (default: contrastive)")
    p.add_argument("--ema", type=_float_check(lambda v: 0 <= v <= 1, "in [0, 1]"), default=None,
                   help=f"byol: base decay of the target, raised to 1 along a cosine over the steps (default: {DEFAULT_EMA})")
    p.add_argument("--allow-pickle", action="store_true",
                   help="accept the original implementation's pickled features file; unpickling can run code, so only for files you trust")
    p.add_argument("--no-images", dest="images", action="store_false",
                   help="skip the TensorBoard retrieval grid (test queries with their top 5)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the runs (run*/, avg/, summary.json) already in --save-to; other files there are kept")
    return p


def _check_objective_flags(args: argparse.Namespace, dist: Dist) -> None:
    """Refuse flag combinations that would be silently ignored, or that the positive-pair objectives do not support."""
    if args.ema is not None and args.objective != "byol":
        raise UserError(f"--ema applies to --objective byol only (this run: {args.objective})")
    if args.objective != "contrastive" and args.model == "dummy":
        raise UserError(f"--objective {args.objective} trains the adaptation, and --model dummy has nothing to train; "
                        f"use --model original or peterson")
    if args.objective != "contrastive" and dist.active:
        raise UserError(f"--objective {args.objective} trains in one process; run it without torchrun")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line (argparse exits 2 on a malformed one)."""
    return build_parser().parse_args(argv)


def _select_device(gpu: bool | None, dist: Dist = Dist()) -> tuple[torch.device, str | None]:
    """CUDA when available unless --cpu (the paper's default), `cuda:LOCAL_RANK` under torchrun.

    Returns the device and the line that says the choice on stderr (None: nothing to say), which
    main prints once the input has been checked (rank 0 alone under torchrun).
    """
    if gpu is False:
        return torch.device("cpu"), None
    if torch.cuda.is_available():
        device = torch.device("cuda")
        if dist.active:
            count = torch.cuda.device_count()
            if count < dist.local_world_size:
                raise UserError(f"CUDA with {dist.local_world_size} ranks on this machine needs {dist.local_world_size} "
                                f"GPUs, found {count}; use torchrun --nproc_per_node {count}, or --cpu")
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        where = ", one GPU per rank: cuda:LOCAL_RANK" if dist.active else ""
        return device, (f"{PROG}: training on CUDA ({torch.cuda.get_device_name(device)}{where}); pass --cpu to "
                        f"train on the CPU")
    return torch.device("cpu"), f"{PROG}: {'--gpu given but ' if gpu else ''}CUDA is not available; training on the CPU"


def _available_bytes(device: torch.device) -> float:
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


def _batch_size(requested: int | None, n_train: int, dist: Dist) -> int | None:
    """The global batch to train with (None: the whole set), or a UserError naming the nearest valid one."""
    if dist.world_size > n_train:
        raise UserError(f"{dist.world_size} ranks but only {n_train} training pairs; use at most "
                        f"--nproc_per_node {n_train}")
    if requested is None or requested >= n_train:
        return None
    if requested % dist.world_size:
        k = dist.world_size
        nearest = max(k, min(n_train - n_train % k, k * round(requested / k)))
        raise UserError(f"--batch-size {requested} is not a multiple of the {k} ranks (each rank takes an equal "
                        f"share); use --batch-size {nearest}")
    return requested


def _check_memory(batch: int | None, n_train: int, in_dim: int, out_dim: int, n_test: int, device: torch.device,
                  dist: Dist) -> None:
    """Refuse, before the first step, a batch whose estimated memory exceeds what the device has."""
    b = batch or n_train
    sharing = dist.local_world_size if device.type == "cpu" else 1
    need = sharing * step_bytes(b, in_dim, out_dim, n_test, dist.world_size)
    available = all_reduce_min(_available_bytes(device), dist)
    if need <= available:
        return
    fits = largest_fitting_batch(available, in_dim, out_dim, n_test, dist.world_size, sharing, upper=b)
    what = f"--batch-size {b}" if batch else f"the full batch ({b} pairs)"
    where = f"{device.type}" + (f", {sharing} ranks" if sharing > 1 else "")
    advice = (f"the largest --batch-size that fits is {fits}" if fits else
              "not even the smallest batch fits; free memory or use a machine with more")
    raise UserError(f"training at {what} needs about {need / 2**30:.1f} GiB ({where}), {available / 2**30:.1f} GiB "
                    f"available; {advice}")


def _config_text(config: dict[str, Any]) -> str:
    rows = "\n".join(f"| {k} | `{v}` |" for k, v in sorted(config.items()))
    return "| setting | value |\n|---|---|\n" + rows


def _table(summary: dict[str, dict], topk: Sequence[int], runs: int, title: str = "final metric") -> str:
    """The test figures, then the train loss and top-k, as percentages (losses as they are)."""
    shown = [f"Test/{m}" for m in metric_names(topk)] + ["Test/Loss", "Train/Loss"] + [f"Train/top {k}" for k in topk]
    shown += [OUTPUT_STD] if OUTPUT_STD in summary else []
    lines = [f"{title:<26}{'mean':>9}{'std':>9}   (over {runs} run{'s' if runs > 1 else ''}; top-k and MRR in %)"]
    for name in shown:
        scale = 1.0 if name.endswith(("Loss", "std")) else 100.0
        digits = 4 if name == OUTPUT_STD else 2  # about 1/sqrt(d): 0.03 for 1024-d outputs
        lines.append(f"{name:<26}{summary[name]['mean'] * scale:>9.{digits}f}{summary[name]['std'] * scale:>9.{digits}f}")
    return "\n".join(lines)


def _dataset_root(manifest: Path) -> Path | None:
    """The pairs folder an extract.py manifest records, when it is still there."""
    if not manifest.is_file():
        return None
    obj = read_json(manifest)
    # Only for the optional image grid: a manifest without usable dataset facts just means no grid.
    dataset = obj.get("dataset") if isinstance(obj, dict) else None
    if not isinstance(dataset, dict) or not isinstance(dataset.get("path"), str) or dataset.get("kind") != "pairs":
        return None
    root = Path(dataset["path"])
    return root if (root / "left").is_dir() and (root / "right").is_dir() else None


def _log_retrieval_grid(writer, model: torch.nn.Module, data, root: Path, epoch: int) -> None:
    """A few test queries (left) with their top 5 (right), true partner framed green."""
    from adaptation.losses import similarity_matrix
    from adaptation.visualize import pair_retrieval_grid

    model.eval()
    with torch.no_grad():
        # Only the shown queries' rows: a large test set's full matrix would not fit.
        sim = similarity_matrix(model(data.test[0][:6]), model(data.test[1]))
    grid = pair_retrieval_grid(sim, data.test_names, root, n_queries=6, k=5)
    writer.add_image("Test/retrieval", np.asarray(grid), epoch, dataformats="HWC")


@torch.no_grad()
def _calibrated(model: torch.nn.Module, data) -> dict[str, Any]:
    """The cosine threshold calibrated on the validation pairs with `model` as it is now, as a dict."""
    model.eval()
    return calibrate(similarity_matrix(model(data.val[0]), model(data.val[1]))).to_dict()


class _BestKeeper:
    """Follows a run's validation figures: keeps the best epoch's weights and threshold, says when to stop.

    With `keep=False` (ranks other than 0 under torchrun) it only says when to stop: every rank
    sees the same figures, so all stop at the same epoch.
    """

    def __init__(self, model: torch.nn.Module, optimizer, data, k: int, patience: int | None, keep: bool = True):
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


FLAGS = {"save_to": "--save-to", "overwrite": "--overwrite", "test_split": "--test-split", "topk": "-k/--topk",
         "val_split": "--val-split",
         "allow_pickle": "--allow-pickle", "epochs": "-e/--epochs", "temperature": "-t/--temperature",
         "lr": "--lr", "weight_decay": "--weight-decay", "precision": "--precision", "ema": "--ema"}
"""Library parameter names as this script's flags, for error messages."""


def _base_config(args: argparse.Namespace, cfg: TrainConfig, data_path: Path, manifest: Path, pairs, splits,
                 seed: int, device: torch.device, dist: Dist = Dist()) -> dict[str, Any]:
    """What every run of this invocation shares, as written to config.json and summary.json."""
    return {
        "data": str(data_path),
        "provenance": provenance_of(data_path),  # sha256 of the features and PCA: checked wherever the run is used
        "manifest": str(manifest) if manifest.is_file() else None,
        "model": args.model,
        "in_dim": pairs.in_dim,
        "model_kwargs": model_kwargs(build_model(args.model, pairs.in_dim)),
        "runs": args.runs,
        "seed": seed,
        "same_split": args.same_split,
        "test_split": args.test_split,
        "n_pairs": len(pairs),
        "n_train": len(splits[0][0]),
        "n_test": len(splits[0][1]),
        "val_split": args.val_split,
        "n_val": len(splits[0][2]),
        "patience": args.patience,
        "device": device.type,
        "world_size": dist.world_size,
        "allow_pickle": args.allow_pickle,
        "torch": str(torch.__version__),
        **cfg.to_dict(),
        "objective": args.objective,
        **({"ema": args.ema if args.ema is not None else DEFAULT_EMA,
            "ema_schedule": "cosine from ema to 1 over the optimiser steps (BYOL)"} if args.objective == "byol" else {}),
    }


def _check_finite(run: int, epoch: int, metrics: dict[str, float], temperature: float) -> None:
    """Stop the run (a `UserError`) at the first epoch with a non-finite figure, before anything looks complete."""
    bad = [name for name, value in metrics.items() if not math.isfinite(value)]
    if bad:
        # e.g. a temperature that overflows float32
        raise UserError(f"run {run}: the training loss is {metrics['Train/Loss']} ({bad[0]} is not finite) "
                        f"at epoch {epoch}; -t {temperature} may overflow float32: lower -t or --lr")


def _one_run(run: int, args: argparse.Namespace, cfg: TrainConfig, base_config: dict[str, Any], data: TrainData,
             split_seed: int, device: torch.device, images_root: Path | None,
             dist: Dist = Dist()) -> tuple[list[dict[str, float]], dict[str, float] | None]:
    """Train run number `run` on its sets `data` (its split's train, test and validation pairs), logging
    to TensorBoard, and write its folder.

    Returns its history, and its row at the best validation epoch (None without validation pairs).
    Under torchrun every rank trains; only rank 0 writes anything.
    """
    folder = run_dir(args.save_to, run)
    run_seed = base_config["seed"] + run - 1
    model, objective, optimizer = _run_model(args, cfg, base_config, run_seed, device)
    first_k = cfg.topk[0]
    keeper = _BestKeeper(model, optimizer, data, first_k, args.patience, keep=dist.rank == 0) \
        if data.val is not None else None
    if dist.rank != 0:
        # Every rank gets the same figures, so every rank stops at the same epoch (non-finite, or patience).
        def follow(epoch: int, metrics: dict[str, float]) -> bool:
            _check_finite(run, epoch, metrics, args.temperature)
            return keeper is not None and keeper.update(epoch, metrics)

        return train(model, data, cfg, optimizer, on_epoch=follow, dist=dist), None

    config = {**base_config, "run": run, "run_seed": run_seed, "split_seed": split_seed,
              "n_train_flipped": 0 if data.flipped is None else len(data.flipped[0])}
    write_json(folder / "config.json", config)

    with _event_writer(folder) as writer:
        writer.add_text("config", _config_text(config))
        writer.add_text("model", f"```\n{model}\n```")
        history, seconds = _train_logged(run, args, cfg, model, objective, optimizer, keeper, data, images_root,
                                         writer, dist)
    record: dict[str, Any] = {"run": run, "seconds": seconds, "epochs": history}
    best_row = _save_run(folder, args.model, model, optimizer, objective, keeper, data, cfg, config, history, record)
    final = history[-1]
    print(f"{PROG}: run {run}: {seconds:.1f} s, test top {first_k} {100 * final[f'Test/top {first_k}']:.2f}%", file=sys.stderr)
    return history, best_row


def _train_logged(run: int, args: argparse.Namespace, cfg: TrainConfig, model, objective, optimizer, keeper, data,
                  images_root: Path | None, writer, dist: Dist) -> tuple[list[dict[str, float]], float]:
    """Train with a progress bar, each epoch's figures to TensorBoard; returns the history and the seconds taken."""
    from tqdm.auto import tqdm  # slow import, only needed from here on

    first_k = cfg.topk[0]
    bar = tqdm(total=cfg.epochs, desc=f"run {run}/{args.runs}", unit="epoch", file=sys.stderr)

    def log(epoch: int, metrics: dict[str, float]) -> bool:
        _check_finite(run, epoch, metrics, args.temperature)
        for name, value in metrics.items():
            writer.add_scalar(name, value, epoch)
        bar.update(1)
        bar.set_postfix(loss=f"{metrics['Train/Loss']:.3f}", test_top1=f"{metrics[f'Test/top {first_k}']:.3f}", refresh=False)
        return keeper is not None and keeper.update(epoch, metrics)

    start = time.perf_counter()
    try:
        if objective is None:
            history = train(model, data, cfg, optimizer, on_epoch=log, dist=dist)
        else:
            history = train_positive(objective, data, cfg, optimizer, on_epoch=log)
        if images_root is not None:
            _log_retrieval_grid(writer, model, data, images_root, len(history))
    finally:
        bar.close()
    return history, time.perf_counter() - start


@contextlib.contextmanager
def _event_writer(folder: Path) -> Iterator[Any]:
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


def _run_model(args: argparse.Namespace, cfg: TrainConfig, base_config: dict[str, Any], run_seed: int,
               device: torch.device):
    """The run's model, its objective (None for the contrastive one) and optimiser, seeded for the run."""
    torch.manual_seed(run_seed)
    model = build_model(args.model, base_config["in_dim"]).to(device)
    objective = None
    if args.objective != "contrastive":
        objective = build_objective(args.objective, model, ema=base_config.get("ema", DEFAULT_EMA)).to(device)
    optimizer = make_optimizer(model if objective is None else objective, cfg)
    return model, objective, optimizer


def _save_run(folder: Path, model_name: str, model, optimizer, objective, keeper, data, cfg: TrainConfig,
              config: dict[str, Any], history: list[dict[str, float]],
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


def _log_average(save_to: Path, histories: list[list[dict[str, float]]]) -> None:
    with _event_writer(save_to / AVERAGE) as writer:
        for row in average_curves(histories):
            for name, value in row.items():
                if name != "epoch":
                    writer.add_scalar(name, value, row["epoch"])


def main(argv: Sequence[str] | None = None) -> int:
    """Train, log and save as described in the module docstring. Returns the exit status."""
    dist = from_env()
    # Under torchrun every rank parses the same command line; rank 0 alone says what is wrong with it.
    with contextlib.redirect_stderr(io.StringIO()) if dist.rank else contextlib.nullcontext():
        args = parse_args(argv)
    save_to = Path(args.save_to)
    require_utf8({"-d": args.data, "-s": args.save_to})  # every rank finds the same; rank 0 says it
    device, device_note = _select_device(args.gpu, dist)
    init_group(dist, device)
    with _output_folder(save_to, dist):
        return _run(args, save_to, device, device_note, dist)


@contextlib.contextmanager
def _output_folder(save_to: Path, dist: Dist) -> Iterator[None]:
    """Hold the output folder for the whole command: one run at a time per folder.

    The check that it can be written and the OS lock (released by the kernel however the
    process ends) are rank 0's alone under torchrun, the one rank that writes; the other ranks
    wait for it, and when it refuses, every rank stops (exit 2) and rank 0 alone says why.
    """
    with contextlib.ExitStack() as stack:
        failure = None
        if dist.rank == 0:
            try:
                check_writable(save_to, "-s")
                stack.enter_context(folder_lock(save_to, "-s"))
            except OSError as err:  # e.g. a folder that check_writable's probe could create but the lock cannot
                failure = UserError(f"-s {save_to}: {os_error_line(err)}")
            except UserError as err:
                failure = err
        agree_on_failure(failure, dist)
        yield


def _run(args: argparse.Namespace, save_to: Path, device: torch.device, device_note: str | None, dist: Dist) -> int:
    topk = tuple(dict.fromkeys(args.topk))
    # Everything that can be wrong with the input is found before anything is written; under
    # torchrun every rank checks, and none goes on until all have (rank 0 then writes).
    drawn = args.seed if args.seed is not None else int(np.random.SeedSequence().entropy % 2**31)
    seed = broadcast_int(drawn, dist)  # every rank must draw the same splits and batches
    failure = None
    try:
        with flag_names(FLAGS):
            to_remove = check_save_to(save_to, args.overwrite)
            data_path = Path(args.data).resolve()
            pairs = load_pairs(data_path, allow_pickle=args.allow_pickle)
            # Run i draws its split from SEED+i-1 (the paper re-splits for every run), unless --same-split.
            split_seeds = [seed if args.same_split else seed + run for run in range(args.runs)]
            if args.patience is not None and args.val_split == 0:
                raise UserError("--patience needs validation pairs; add --val-split (e.g. 0.1)")
            splits = []
            for s in split_seeds:  # (train, test, validation) indices, validation drawn from the training pairs
                train_idx, test_idx = split_indices(len(pairs), args.test_split, s, topk)
                train_idx, val_idx = split_validation(train_idx, args.val_split, s)
                splits.append((train_idx, test_idx, val_idx))
            n_train, n_test = len(splits[0][0]), len(splits[0][1])  # the same for every split
            batch_size = _batch_size(args.batch_size, n_train, dist)
            cfg = TrainConfig(epochs=args.epochs, temperature=args.temperature, lr=args.lr,
                              weight_decay=args.weight_decay, topk=topk, precision=args.precision,
                              batch_size=batch_size, seed=seed)
            _check_objective_flags(args, dist)
    except UserError as err:
        failure = err
    agree_on_failure(failure, dist)
    if device_note and dist.rank == 0:
        print(device_note, file=sys.stderr)
    out_dim = build_model(args.model, pairs.in_dim).out_dim
    _check_memory(batch_size, n_train, pairs.in_dim, out_dim, n_test, device, dist)

    manifest = data_path.parent / "manifest.json"
    images_root = _dataset_root(manifest) if args.images else None
    base_config = _base_config(args, cfg, data_path, manifest, pairs, splits, seed, device, dist)
    runs = split_each(pairs, splits, device)
    del pairs  # `runs` holds the vectors now and lets them go before the last run trains
    if dist.rank != 0:
        for run in range(1, args.runs + 1):
            _one_run(run, args, cfg, base_config, next(runs), split_seeds[run - 1], device, None, dist)
        return 0
    with replacing(save_to, to_remove):
        n_val = base_config["n_val"]
        print(f"{PROG}: {base_config['n_pairs']} pairs of {base_config['in_dim']}-d features ({n_train} train, "
              f"{f'{n_val} validation, ' if n_val else ''}{n_test} test, "
              f"{'one split' if args.same_split else 'a new split per run'}), model {args.model}, {device.type}"
              + (f" x {dist.world_size} ranks" if dist.active else "") +
              f", {args.precision}, batch {batch_size or 'full'}, seed {seed}", file=sys.stderr)
        # next(runs) inside the call: the previous run's sets are gone before the next ones are made.
        results = [_one_run(run, args, cfg, base_config, next(runs), split_seeds[run - 1], device,
                            images_root, dist) for run in range(1, args.runs + 1)]
        _summarise_runs(save_to, args, base_config, out_dim, topk, results)
        return 0


def _summarise_runs(save_to: Path, args: argparse.Namespace, base_config: dict[str, Any], out_dim: int,
                    topk: tuple[int, ...], results: list[tuple[list[dict[str, float]], dict[str, float] | None]]) -> None:
    """Write the summary of all runs (and their average curves) and print its tables."""
    histories = [history for history, _ in results]
    if args.runs > 1:
        _log_average(save_to, histories)  # early-stopped runs: the epochs all of them reached
    summary = summarise([{k: v for k, v in h[-1].items() if k != "epoch"} for h in histories])
    best_rows = [row for _, row in results if row is not None]
    best_val = None
    if best_rows:
        best_val = {"epochs": [int(r["epoch"]) for r in best_rows],
                    **summarise([{k: v for k, v in r.items() if k != "epoch"} for r in best_rows])}
    collapse = None
    if args.objective != "contrastive":
        collapse = collapse_verdict([h[-1][OUTPUT_STD] for h in histories], out_dim)
    write_summary(save_to, base_config, summary, best_val=best_val, collapse=collapse)
    print(_table(summary, topk, args.runs))
    if best_val is not None:
        print(_table(best_val, topk, args.runs, f"at best val epoch {best_val['epochs']}"))
    if collapse is not None:
        print(f"collapse: {collapse['verdict']} (final output std {', '.join(f'{s:.4f}' for s in collapse['output_std'])}; "
              f"healthy about {collapse['healthy']:.4f}, collapsed below {collapse['threshold']:.4f})")


if __name__ == "__main__":
    sys.exit(run_ranked_cli(main, PROG))
