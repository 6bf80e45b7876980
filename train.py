"""train.py: learn an adaptation function on pairs of features and report top-k retrieval.

The paper's command (Risser-Maroix, Kurtz, Loménie, ICIP 2021):

    python train.py -d FEATURES.npy --model original -s RUNS -e 150 -r 1 -t 15 --test-split 0.25 -k 1 3 5 --gpu

This script parses the flags, builds one frozen `adaptation.experiment.ExperimentConfig`, chooses
the device, and calls `adaptation.experiment.run_experiment`, which owns the runs (what each writes:
`adaptation.runs`, `adaptation.checkpoint`); then it prints the summary table. The manual is
`--help` and the README (recipe, validation, objectives, torchrun).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import math
import sys
from typing import Sequence

from adaptation.cca import DEFAULT_RIDGE
from adaptation.experiment import ExperimentConfig, Summary, run_experiment, select_device
from adaptation.metrics import metric_names
from adaptation.models import MODELS
from adaptation.objectives import DEFAULT_EMA, OBJECTIVES
from adaptation.positive_training import OUTPUT_STD
from adaptation.training import PRECISIONS
from toolkit.cli import run_cli
from toolkit.distributed import Ranks
from toolkit.hardware import resolve_precision
from toolkit.utils import flag_names, require_utf8

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
                   help="features file of pairs written by extract.py (SAVE/MODEL/features_pca256.npy for the paper's recipe), or the original implementation's with --allow-pickle")
    p.add_argument("-s", "--save-to", required=True, metavar="DIR",
                   help="output folder: run1/, run2/, ... (TensorBoard, checkpoint, metrics), avg/, summary.json")
    p.add_argument("--model", choices=sorted(MODELS), default="original",
                   help="original: Linear(D,1024,no bias)+ReLU; linear: Linear(D,256,no bias), no ReLU; peterson: "
                        "x*relu(w); cca: shared CCA, one bias-free linear map fitted in closed form in seconds "
                        "(--cca-k, or --val-split to choose k); dummy: raw features, no training (default: original)")
    p.add_argument("--out-dim", type=_positive_int, default=None, metavar="N",
                   help="output width of --model original (default: 1024, the paper's) or linear (default: 256)")
    p.add_argument("--cca-k", type=_positive_int, default=None, metavar="K",
                   help="--model cca: directions kept, 1 to D; default: the k of best validation top-1 over every "
                        "k from 1 to D (needs --val-split)")
    p.add_argument("--cca-ridge", type=_float_check(lambda v: v >= 0, "zero or more"), default=None, metavar="R",
                   help=f"--model cca: ridge added to Cov(l-r), as a share of its mean eigenvalue (default: "
                        f"{DEFAULT_RIDGE:g}; 0: none, and a singular fit is refused)")
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
    p.add_argument("--precision", choices=("auto", *PRECISIONS), default="fp32",
                   help="bf16: autocast the model and similarity products to bfloat16, loss and evaluation in fp32; auto: "
                        "bf16 where it is native (CUDA with bf16, CPUs with AVX512-BF16 or AMX), else fp32; bf16 on a "
                        "CPU without them is emulated, many times slower (warned) (default: fp32)")
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
    p.add_argument("--subset", metavar="FILE", default=None,
                   help="train and test only on the pairs this file names: the paper's TLL_obj.csv as published, "
                        "a CSV with a name column, or one name a line")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the runs (run*/, avg/, summary.json) train.py wrote in --save-to; other files are kept; "
                        "a folder holding no runs, or an entry named like a run train.py did not write, is refused")
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line (argparse exits 2 on a malformed one)."""
    return build_parser().parse_args(argv)


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


CCA_NOTE = ("model cca is fitted in closed form (float64), once per run, on the training pairs (and their flipped "
            "copies): -e/--epochs, --lr, --weight-decay, --precision and --patience do not apply; -r runs differ "
            "by their splits")

FLAGS = {"save_to": "--save-to", "overwrite": "--overwrite", "test_split": "--test-split", "topk": "-k/--topk",
         "val_split": "--val-split", "batch_size": "--batch-size", "patience": "--patience", "model": "--model",
         "objective": "--objective", "allow_pickle": "--allow-pickle", "epochs": "-e/--epochs",
         "temperature": "-t", "lr": "--lr", "weight_decay": "--weight-decay", "precision": "--precision",
         "ema": "--ema", "out_dim": "--out-dim", "cca_k": "--cca-k", "cca_ridge": "--cca-ridge"}
"""Library parameter names as this script's flags, for error messages."""


def build_config(args: argparse.Namespace) -> ExperimentConfig:
    """The one frozen configuration of this invocation, from the parsed flags."""
    return ExperimentConfig(
        data=args.data, save_to=args.save_to, model=args.model, epochs=args.epochs, batch_size=args.batch_size,
        runs=args.runs, same_split=args.same_split, temperature=args.temperature, test_split=args.test_split,
        val_split=args.val_split, patience=args.patience, topk=tuple(dict.fromkeys(args.topk)), seed=args.seed,
        lr=args.lr, weight_decay=args.weight_decay, precision=args.precision, objective=args.objective,
        ema=args.ema, allow_pickle=args.allow_pickle, images=args.images, overwrite=args.overwrite,
        subset=args.subset, out_dim=args.out_dim, cca_k=args.cca_k, cca_ridge=args.cca_ridge)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, build the config, choose the device, run the experiment and print its summary; returns the exit status."""
    ranks = Ranks.from_env()
    # Under torchrun every rank parses the same command line; rank 0 alone says what is wrong with it.
    with contextlib.redirect_stderr(io.StringIO()) if ranks.rank else contextlib.nullcontext():
        args = parse_args(argv)
    require_utf8({"-d": args.data, "-s": args.save_to, "--subset": args.subset})  # every rank finds the same; rank 0 says it
    cfg = build_config(args)
    device, device_note = select_device(args.gpu, ranks)
    device_note = device_note and f"{PROG}: {device_note}"
    ranks = ranks.join(device)
    precision = resolve_precision(args.precision, device)
    cfg = dataclasses.replace(cfg, precision=precision.precision)

    cca_note = CCA_NOTE if cfg.model == "cca" else None
    notes = [f"{PROG}: {line}" for line in (device_note, precision.note, precision.warning, cca_note) if line][::-1]

    def log(line: str) -> None:
        while notes:  # the device choice is said once the input has passed its checks, before the first run
            print(notes.pop(), file=sys.stderr)
        print(f"{PROG}: {line}", file=sys.stderr)

    with flag_names(FLAGS):
        summary = run_experiment(cfg, device, ranks, log=log if ranks.rank == 0 else lambda line: None)
    if ranks.rank == 0:
        print_summary(summary, cfg)
    return 0


def print_summary(summary: Summary, cfg: ExperimentConfig) -> None:
    """The tables of the final figures (and at the best validation epoch), and the collapse verdict."""
    subset = summary.config.get("subset")
    if subset is not None:
        print(f"on {subset['kept']:,} of {subset['of']:,} pairs (subset {subset['file']}, sha256 {subset['sha256'][:12]})")
    print(_table(summary.final, cfg.topk, cfg.runs))
    if summary.best_val is not None:
        print(_table(summary.best_val, cfg.topk, cfg.runs, f"at best val epoch {summary.best_val['epochs']}"))
    collapse = summary.collapse
    if collapse is not None:
        print(f"collapse: {collapse['verdict']} (final output std {', '.join(f'{s:.4f}' for s in collapse['output_std'])}; "
              f"healthy about {collapse['healthy']:.4f}, collapsed below {collapse['threshold']:.4f})")


if __name__ == "__main__":
    sys.exit(run_cli(main, prog=PROG))
