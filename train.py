"""Train an adaptation function on pairs of features and report top-k retrieval.

Reproduces the seed's recipe (Risser-Maroix, Kurtz, Loménie, ICIP 2021):

    python train.py -d FEATURES.npy --model original -s RUNS -e 150 -r 1 -t 15 --test-split 0.25 -k 1 3 5 --gpu

`FEATURES.npy` is a pairs features file written by extract.py (`DIR/MODEL/features.npy` or
`features_pca256.npy`), or the seed's pickled file with `--allow-pickle`.

Each run `i` writes to `RUNS/run{i}/`:

- TensorBoard scalars `Train/Loss`, `Test/Loss`, `Train/top k`, `Test/top k`,
  `Test/left2right top k`, `Test/right2left top k`, `Test/MRR` (and the other train figures),
  plus the configuration as text;
- `config.json`: the configuration, including `data`, the absolute path of the features file;
- `metrics.json`: every epoch's figures;
- `model_and_optimizer.pt`: see `adaptation.models.load_checkpoint`.

With `-r` above 1, `RUNS/avg/` holds the mean curves. `RUNS/summary.json` holds the final test
(and train) figures as mean and std over runs, and the same table is printed.

"top k" is the seed's figure: a test pair counts as found when its partner ranks within the
first k left-to-right OR right-to-left among all test pairs; the paper's 39.39% average top-1
is this figure. See `adaptation.metrics` for the exact definitions.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from adaptation.data import load_pairs, split_data, split_indices
from adaptation.metrics import metric_names
from adaptation.models import MODELS, build_model, model_kwargs
from adaptation.training import PRECISIONS, TrainConfig, make_optimizer, train
from featuresExtractor.utils import UserError, atomic_path, read_json, run_cli, write_json

PROG = "train.py"
CHECKPOINT = "model_and_optimizer.pt"
FORMAT_VERSION = 1
_OURS = re.compile(r"^(run\d+|avg|summary\.json)$")


def _positive_int(text: str) -> int:
    value = int(text)
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
                   help="features file of pairs written by extract.py (DIR/MODEL/features.npy), or the seed's with --allow-pickle")
    p.add_argument("-s", "--save-to", required=True, metavar="DIR",
                   help="output folder: run1/, run2/, ... (TensorBoard, checkpoint, metrics), avg/, summary.json")
    p.add_argument("--model", choices=sorted(MODELS), default="original",
                   help="original: Linear(D,1024,no bias)+ReLU; peterson: x*relu(w); dummy: raw features, no training (default: original)")
    p.add_argument("-e", "--epochs", type=_positive_int, default=150, help="full-batch epochs (default: 150)")
    p.add_argument("-r", "--runs", type=_positive_int, default=1,
                   help="independent runs, each with its own initialisation, on the same split (default: 1)")
    p.add_argument("-t", "--temperature", type=_float_check(lambda v: v > 0, "a positive number"), default=1.0,
                   help="multiplies the cosines before the softmax, as in the seed (default: 1; the seed command uses 15)")
    p.add_argument("--test-split", type=_float_check(lambda v: True, "a number"), default=0.25,
                   help="fraction of pairs held out for testing, in (0, 1) (default: 0.25)")
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
                   help="accept the seed's pickled features file; unpickling can run code, so only for files you trust")
    p.add_argument("--no-images", dest="images", action="store_false",
                   help="skip the TensorBoard retrieval grid (test queries with their top 5)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the runs (run*/, avg/, summary.json) already in --save-to; other files there are kept")
    return p.parse_args(argv)


def _check_save_to(save_to: Path, overwrite: bool) -> list[Path]:
    """What --overwrite will remove; refuse a non-empty folder without it. Deletes nothing itself."""
    if save_to.exists() and not save_to.is_dir():
        raise UserError(f"--save-to {save_to} exists and is not a folder")
    entries = sorted(save_to.iterdir()) if save_to.is_dir() else []
    if entries and not overwrite:
        raise UserError(f"--save-to {save_to} already exists and is not empty; choose another folder or pass --overwrite")
    return [e for e in entries if _OURS.match(e.name)]


def _select_device(gpu: bool) -> torch.device:
    if gpu and torch.cuda.is_available():
        return torch.device("cuda")
    if gpu:
        print(f"{PROG}: --gpu given but CUDA is not available; training on the CPU", file=sys.stderr)
    return torch.device("cpu")


def _config_text(config: dict[str, Any]) -> str:
    rows = "\n".join(f"| {k} | `{v}` |" for k, v in sorted(config.items()))
    return "| setting | value |\n|---|---|\n" + rows


def _summarise(finals: list[dict[str, float]]) -> dict[str, dict]:
    """Mean and std over runs of each final figure; std is the sample std (ddof=1), 0 for one run."""
    summary: dict[str, dict] = {}
    for name in finals[0]:
        values = [f[name] for f in finals]
        std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
        summary[name] = {"mean": float(np.mean(values)), "std": std, "values": values}
    return summary


def _table(summary: dict[str, dict], topk: Sequence[int], runs: int) -> str:
    """The test figures, then the train loss and top-k, as percentages (losses as they are)."""
    shown = [f"Test/{m}" for m in metric_names(topk)] + ["Test/Loss", "Train/Loss"] + [f"Train/top {k}" for k in topk]
    lines = [f"{'final metric':<26}{'mean':>9}{'std':>9}   (over {runs} run{'s' if runs > 1 else ''}; top-k and MRR in %)"]
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
        sim = similarity_matrix(model(data.test[0]), model(data.test[1]))
    grid = pair_retrieval_grid(sim, data.test_names, root, n_queries=6, k=5)
    writer.add_image("Test/retrieval", np.asarray(grid), epoch, dataformats="HWC")


@contextlib.contextmanager
def _replacing(save_to: Path, old: list[Path]):
    """Run the block with `old` (earlier runs that --overwrite replaces) set aside.

    They are deleted once the block has succeeded; if it fails or is interrupted, what
    it wrote is removed and they are put back, so a failed run loses nothing.
    """
    aside = save_to / ".replaced"
    if aside.exists():
        raise UserError(f"{aside} holds runs set aside by an interrupted --overwrite; move them back into "
                        f"{save_to} or delete {aside}, then re-run")
    if old:
        aside.mkdir(parents=True)
        for path in old:
            path.rename(aside / path.name)
    done = False
    try:
        yield
        done = True
    finally:
        if done:
            shutil.rmtree(aside, ignore_errors=True)
        else:
            for path in (save_to.iterdir() if save_to.is_dir() else []):
                if _OURS.match(path.name):
                    shutil.rmtree(path) if path.is_dir() else path.unlink()
            if aside.is_dir():
                for path in aside.iterdir():
                    path.rename(save_to / path.name)
                aside.rmdir()


def main(argv: Sequence[str] | None = None) -> int:
    """Train, log and save as described in the module docstring. Returns the exit status."""
    args = parse_args(argv)
    save_to = Path(args.save_to)
    to_remove = _check_save_to(save_to, args.overwrite)
    topk = tuple(dict.fromkeys(args.topk))

    # Everything that can be wrong with the input is found before anything is written.
    data_path = Path(args.data).resolve()
    pairs = load_pairs(data_path, allow_pickle=args.allow_pickle)
    seed = args.seed if args.seed is not None else int(np.random.SeedSequence().entropy % 2**31)
    train_idx, test_idx = split_indices(len(pairs), args.test_split, seed, topk)
    cfg = TrainConfig(
        epochs=args.epochs, temperature=args.temperature, lr=args.lr,
        weight_decay=args.weight_decay, topk=topk, precision=args.precision,
    )
    device = _select_device(args.gpu)
    data = split_data(pairs, train_idx, test_idx, device)

    from torch.utils.tensorboard import SummaryWriter  # slow import, only needed from here on
    from tqdm.auto import tqdm

    manifest = data_path.parent / "manifest.json"
    images_root = _dataset_root(manifest) if args.images else None
    save_to.mkdir(parents=True, exist_ok=True)
    # Earlier runs replaced by --overwrite are set aside, and come back if this one fails.
    with _replacing(save_to, to_remove):
        base_config: dict[str, Any] = {
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
            "device": device.type,
            "allow_pickle": args.allow_pickle,
            "torch": str(torch.__version__),
            **cfg.to_dict(),
        }
        print(f"{PROG}: {len(pairs)} pairs of {pairs.in_dim}-d features ({base_config['n_train']} train + "
              f"{base_config['n_train_flipped']} flipped copies, {base_config['n_test']} test), "
              f"model {args.model}, {device.type}, {args.precision}, seed {seed}", file=sys.stderr)

        histories: list[list[dict[str, float]]] = []
        for run in range(1, args.runs + 1):
            run_dir = save_to / f"run{run}"
            run_seed = seed + run - 1
            torch.manual_seed(run_seed)
            model = build_model(args.model, pairs.in_dim).to(device)
            optimizer = make_optimizer(model, cfg)
            config = {**base_config, "run": run, "run_seed": run_seed}
            write_json(run_dir / "config.json", config)

            writer = SummaryWriter(str(run_dir))
            writer.add_text("config", _config_text(config))
            writer.add_text("model", f"```\n{model}\n```")
            bar = tqdm(total=cfg.epochs, desc=f"run {run}/{args.runs}", unit="epoch", file=sys.stderr)

            def log(epoch: int, metrics: dict[str, float]) -> None:
                for name, value in metrics.items():
                    writer.add_scalar(name, value, epoch)
                bar.update(1)
                bar.set_postfix(loss=f"{metrics['Train/Loss']:.3f}", test_top1=f"{metrics[f'Test/top {topk[0]}']:.3f}", refresh=False)

            start = time.perf_counter()
            try:
                history = train(model, data, cfg, optimizer, on_epoch=log)
                if images_root is not None:
                    _log_retrieval_grid(writer, model, data, images_root, cfg.epochs)
            finally:
                bar.close()
                writer.close()
            seconds = time.perf_counter() - start
            final = {k: v for k, v in history[-1].items() if k != "epoch"}
            write_json(run_dir / "metrics.json", {"run": run, "seconds": seconds, "epochs": history})
            checkpoint = {
                "format_version": FORMAT_VERSION,
                "epoch": cfg.epochs,
                "state_dict": model.state_dict(),
                "optimizer": optimizer.state_dict() if optimizer is not None else None,
                "config": config,
                "model_name": args.model,
                "in_dim": pairs.in_dim,
                "model_kwargs": config["model_kwargs"],
                "test_names": list(data.test_names),
                "final_metrics": final,
            }
            with atomic_path(run_dir / CHECKPOINT, suffix=".pt") as tmp:
                torch.save(checkpoint, tmp)
            histories.append(history)
            print(f"{PROG}: run {run}: {seconds:.1f} s, test top {topk[0]} {100 * final[f'Test/top {topk[0]}']:.2f}%", file=sys.stderr)

        if args.runs > 1:
            writer = SummaryWriter(str(save_to / "avg"))
            for epoch_rows in zip(*histories):
                for name in epoch_rows[0]:
                    if name != "epoch":
                        writer.add_scalar(name, float(np.mean([r[name] for r in epoch_rows])), epoch_rows[0]["epoch"])
            writer.close()

        summary = _summarise([{k: v for k, v in h[-1].items() if k != "epoch"} for h in histories])
        write_json(save_to / "summary.json", {"config": base_config, "final": summary})
        print(_table(summary, topk, args.runs))
        return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
