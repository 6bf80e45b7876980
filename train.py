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
the paper's recipe. The same flags run data-parallel under torchrun (gloo on the CPU, NCCL with
`--gpu`, one GPU per rank); only rank 0 writes:

    torchrun --nproc_per_node 2 train.py -d FEATURES.npy -s RUNS --batch-size 4096 ...

With `-r` above 1, `RUNS/avg/` holds the mean curves. `RUNS/summary.json` holds the final test
(and train) figures as mean and std over runs, and the same table is printed.

"top k" is the paper's figure: a test pair counts as found when its partner ranks within the
first k left-to-right OR right-to-left among all test pairs; the paper's 39.39% average top-1
is this figure. See `adaptation.metrics` for the exact definitions.
"""

from __future__ import annotations

import argparse
import copy
import contextlib
import io
import math
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from adaptation.calibration import calibrate
from adaptation.checkpoint import BEST_CHECKPOINT, CHECKPOINT, save_checkpoint
from adaptation.losses import similarity_matrix
from adaptation.distributed import Dist, all_reduce_min, broadcast_int, from_env, init_group, run_ranked_cli
from adaptation.metrics import metric_names
from adaptation.models import MODELS, build_model, model_kwargs
from adaptation.runs import AVERAGE, average_curves, check_save_to, replacing, run_dir, summarise, write_summary
from adaptation.selection import best_epoch, patience_exhausted, split_validation
from adaptation.split import split_data, split_indices
from adaptation.training import PRECISIONS, TrainConfig, largest_fitting_batch, make_optimizer, step_bytes, train
from featuresExtractor.pairs_file import load_pairs
from toolkit.utils import UserError, flag_names, read_json, write_json

PROG = "train.py"


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _float_check(predicate, what: str):
    def parse(text: str) -> float:
        value = float(text)
        if not math.isfinite(value) or not predicate(value):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value

    return parse


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line (argparse exits 2 on a malformed one)."""
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Train an adaptation function on pairs of features; log top-k retrieval to TensorBoard.",
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
                   help="independent runs, each with its own initialisation, on the same split (default: 1)")
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
    dev.add_argument("--gpu", dest="gpu", action="store_true", help="train on CUDA if present, else on the CPU (said on stderr)")
    dev.add_argument("--cpu", dest="gpu", action="store_false", help="train on the CPU (default)")
    p.add_argument("--seed", type=int, default=None,
                   help="fixes the split and the initialisations (run i uses SEED+i-1); default: drawn at random and recorded")
    p.add_argument("--lr", type=_float_check(lambda v: v > 0, "a positive number"), default=1e-3, help="Adam learning rate (default: 1e-3)")
    p.add_argument("--weight-decay", type=_float_check(lambda v: v >= 0, "zero or more"), default=0.0,
                   help="Adam weight decay (default: 0)")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="bf16: autocast the model and similarity products to bfloat16, loss and evaluation in fp32 (default: fp32)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="accept the original implementation's pickled features file; unpickling can run code, so only for files you trust")
    p.add_argument("--no-images", dest="images", action="store_false",
                   help="skip the TensorBoard retrieval grid (test queries with their top 5)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the runs (run*/, avg/, summary.json) already in --save-to; other files there are kept")
    return p.parse_args(argv)


def _select_device(gpu: bool, dist: Dist) -> torch.device:
    """CUDA (`cuda:LOCAL_RANK` under torchrun) with --gpu when present, else the CPU."""
    if gpu and torch.cuda.is_available():
        if not dist.active:
            return torch.device("cuda")
        count = torch.cuda.device_count()
        if count < dist.local_world_size:
            raise UserError(f"--gpu with {dist.local_world_size} ranks on this machine needs {dist.local_world_size} "
                            f"GPUs, found {count}; use torchrun --nproc_per_node {count}, or --cpu")
        local_rank = int(__import__("os").environ.get("LOCAL_RANK", "0"))
        return torch.device("cuda", local_rank)
    if gpu and dist.rank == 0:
        print(f"{PROG}: --gpu given but CUDA is not available; training on the CPU", file=sys.stderr)
    return torch.device("cpu")


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
    lines = [f"{title:<26}{'mean':>9}{'std':>9}   (over {runs} run{'s' if runs > 1 else ''}; top-k and MRR in %)"]
    for name in shown:
        scale = 1.0 if name.endswith("Loss") else 100.0
        lines.append(f"{name:<26}{summary[name]['mean'] * scale:>9.2f}{summary[name]['std'] * scale:>9.2f}")
    return "\n".join(lines)


def _dataset_root(manifest: Path) -> Path | None:
    """The pairs folder an extract.py manifest records, when it is still there."""
    if not manifest.is_file():
        return None
    dataset = read_json(manifest).get("dataset", {})
    root = Path(dataset.get("path", ""))
    return root if dataset.get("kind") == "pairs" and (root / "left").is_dir() and (root / "right").is_dir() else None


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
         "lr": "--lr", "weight_decay": "--weight-decay", "precision": "--precision"}
"""Library parameter names as this script's flags, for error messages."""


def _base_config(args: argparse.Namespace, cfg: TrainConfig, data_path: Path, manifest: Path, pairs, data,
                 seed: int, device: torch.device, dist: Dist = Dist()) -> dict[str, Any]:
    """What every run of this invocation shares, as written to config.json and summary.json."""
    return {
        "data": str(data_path),
        "manifest": str(manifest) if manifest.is_file() else None,
        "model": args.model,
        "in_dim": pairs.in_dim,
        "model_kwargs": model_kwargs(build_model(args.model, pairs.in_dim)),
        "runs": args.runs,
        "seed": seed,
        "test_split": args.test_split,
        "n_pairs": len(pairs),
        "n_train": len(data.train_names),
        "n_train_flipped": 0 if data.flipped is None else len(data.flipped[0]),
        "n_test": len(data.test_names),
        "val_split": args.val_split,
        "n_val": len(data.val_names),
        "patience": args.patience,
        "device": device.type,
        "world_size": dist.world_size,
        "allow_pickle": args.allow_pickle,
        "torch": str(torch.__version__),
        **cfg.to_dict(),
    }


def _one_run(run: int, args: argparse.Namespace, cfg: TrainConfig, base_config: dict[str, Any], data,
             device: torch.device, images_root: Path | None,
             dist: Dist = Dist()) -> tuple[list[dict[str, float]], dict[str, float] | None]:
    """Train run number `run`, logging to TensorBoard, and write its folder.

    Returns its history, and its row at the best validation epoch (None without validation pairs).
    Under torchrun every rank trains; only rank 0 writes anything.
    """
    folder = run_dir(args.save_to, run)
    run_seed = base_config["seed"] + run - 1
    torch.manual_seed(run_seed)
    model = build_model(args.model, base_config["in_dim"]).to(device)
    optimizer = make_optimizer(model, cfg)
    config = {**base_config, "run": run, "run_seed": run_seed}
    first_k = cfg.topk[0]
    keeper = _BestKeeper(model, optimizer, data, first_k, args.patience, keep=dist.rank == 0) \
        if data.val is not None else None
    if dist.rank != 0:
        stop = (lambda epoch, metrics: keeper.update(epoch, metrics)) if keeper is not None else None
        return train(model, data, cfg, optimizer, on_epoch=stop, dist=dist), None

    from torch.utils.tensorboard import SummaryWriter  # slow import, only needed from here on
    from tqdm.auto import tqdm

    write_json(folder / "config.json", config)

    writer = SummaryWriter(str(folder))
    writer.add_text("config", _config_text(config))
    writer.add_text("model", f"```\n{model}\n```")
    bar = tqdm(total=cfg.epochs, desc=f"run {run}/{args.runs}", unit="epoch", file=sys.stderr)

    def log(epoch: int, metrics: dict[str, float]) -> bool:
        for name, value in metrics.items():
            writer.add_scalar(name, value, epoch)
        bar.update(1)
        bar.set_postfix(loss=f"{metrics['Train/Loss']:.3f}", test_top1=f"{metrics[f'Test/top {first_k}']:.3f}", refresh=False)
        return keeper is not None and keeper.update(epoch, metrics)

    start = time.perf_counter()
    try:
        history = train(model, data, cfg, optimizer, on_epoch=log, dist=dist)
        if images_root is not None:
            _log_retrieval_grid(writer, model, data, images_root, len(history))
    finally:
        bar.close()
        writer.close()
    seconds = time.perf_counter() - start
    final = {k: v for k, v in history[-1].items() if k != "epoch"}
    record: dict[str, Any] = {"run": run, "seconds": seconds, "epochs": history}
    extra: dict[str, Any] = {}
    best_row = None
    if keeper is not None:
        threshold = _calibrated(model, data)
        record.update(keeper.summary(len(history), cfg.epochs), threshold=threshold)
        extra = {"val_names": list(data.val_names), "threshold": threshold}
        best_row = history[keeper.epoch - 1]
        best_model = copy.deepcopy(model)
        best_model.load_state_dict(keeper.state)
        save_checkpoint(folder / BEST_CHECKPOINT, best_model, None, model_name=args.model, epoch=keeper.epoch,
                        config=config, test_names=data.test_names,
                        final_metrics={k: v for k, v in best_row.items() if k != "epoch"},
                        optimizer_state=keeper.optimizer, **{**extra, "threshold": keeper.threshold})
    write_json(folder / "metrics.json", record)
    save_checkpoint(folder / CHECKPOINT, model, optimizer, model_name=args.model, epoch=len(history), config=config,
                    test_names=data.test_names, final_metrics=final, **extra)
    print(f"{PROG}: run {run}: {seconds:.1f} s, test top {first_k} {100 * final[f'Test/top {first_k}']:.2f}%", file=sys.stderr)
    return history, best_row


def _log_average(save_to: Path, histories: list[list[dict[str, float]]]) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(save_to / AVERAGE))
    for row in average_curves(histories):
        for name, value in row.items():
            if name != "epoch":
                writer.add_scalar(name, value, row["epoch"])
    writer.close()


def main(argv: Sequence[str] | None = None) -> int:
    """Train, log and save as described in the module docstring. Returns the exit status."""
    dist = from_env()
    # Under torchrun every rank parses the same command line; rank 0 alone says what is wrong with it.
    with contextlib.redirect_stderr(io.StringIO()) if dist.rank else contextlib.nullcontext():
        args = parse_args(argv)
    save_to = Path(args.save_to)
    topk = tuple(dict.fromkeys(args.topk))
    device = _select_device(args.gpu, dist)
    init_group(dist, device)
    # Everything that can be wrong with the input is found before anything is written; under
    # torchrun every rank checks, and none goes on until all have (rank 0 then writes).
    failure = None
    try:
        with flag_names(FLAGS):
            to_remove = check_save_to(save_to, args.overwrite)
            data_path = Path(args.data).resolve()
            pairs = load_pairs(data_path, allow_pickle=args.allow_pickle)
            drawn = args.seed if args.seed is not None else int(np.random.SeedSequence().entropy % 2**31)
            seed = broadcast_int(drawn, dist)  # every rank must draw the same split and batches
            train_idx, test_idx = split_indices(len(pairs), args.test_split, seed, topk)
            if args.patience is not None and args.val_split == 0:
                raise UserError("--patience needs validation pairs; add --val-split (e.g. 0.1)")
            train_idx, val_idx = split_validation(train_idx, args.val_split, seed)
            batch_size = _batch_size(args.batch_size, len(train_idx), dist)
            cfg = TrainConfig(epochs=args.epochs, temperature=args.temperature, lr=args.lr,
                              weight_decay=args.weight_decay, topk=topk, precision=args.precision,
                              batch_size=batch_size, seed=seed)
    except UserError as err:
        failure = err
    if all_reduce_min(0.0 if failure else 1.0, dist) < 1.0:
        raise failure or UserError("another rank refused the input")
    data = split_data(pairs, train_idx, test_idx, device, val_idx)
    out_dim = build_model(args.model, pairs.in_dim).out_dim
    _check_memory(batch_size, len(train_idx), pairs.in_dim, out_dim, len(test_idx), device, dist)

    manifest = data_path.parent / "manifest.json"
    images_root = _dataset_root(manifest) if args.images else None
    base_config = _base_config(args, cfg, data_path, manifest, pairs, data, seed, device, dist)
    if dist.rank != 0:
        for run in range(1, args.runs + 1):
            _one_run(run, args, cfg, base_config, data, device, None, dist)
        return 0
    save_to.mkdir(parents=True, exist_ok=True)
    with replacing(save_to, to_remove):
        print(f"{PROG}: {len(pairs)} pairs of {pairs.in_dim}-d features ({base_config['n_train']} train + "
              f"{base_config['n_train_flipped']} flipped copies, {base_config['n_test']} test), "
              f"model {args.model}, {device.type}" + (f" x {dist.world_size} ranks" if dist.active else "") +
              f", {args.precision}, batch {batch_size or 'full'}, seed {seed}", file=sys.stderr)
        results = [_one_run(run, args, cfg, base_config, data, device, images_root, dist)
                   for run in range(1, args.runs + 1)]
        histories = [history for history, _ in results]
        if args.runs > 1:
            _log_average(save_to, histories)  # early-stopped runs: the epochs all of them reached
        summary = summarise([{k: v for k, v in h[-1].items() if k != "epoch"} for h in histories])
        best_rows = [row for _, row in results if row is not None]
        best_val = None
        if best_rows:
            best_val = {"epochs": [int(r["epoch"]) for r in best_rows],
                        **summarise([{k: v for k, v in r.items() if k != "epoch"} for r in best_rows])}
        write_summary(save_to, base_config, summary, best_val=best_val)
        print(_table(summary, topk, args.runs))
        if best_val is not None:
            print(_table(best_val, topk, args.runs, f"at best val epoch {best_val['epochs']}"))
        return 0


if __name__ == "__main__":
    sys.exit(run_ranked_cli(main, PROG, from_env()))
