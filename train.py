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
import sys
from typing import Sequence

import torch

from adaptation.cca import DEFAULT_RIDGE
from adaptation.experiment import ExperimentConfig, Summary, run_experiment
from adaptation.metrics import metric_names
from adaptation.models import MODELS
from adaptation.objectives import DEFAULT_EMA, OBJECTIVES
from adaptation.positive_training import OUTPUT_STD
from adaptation.training import PRECISIONS, TrainConfig
from toolkit.checks import default_of, flag_rule
from toolkit.cli import run_cli
from toolkit.device import choose_device
from toolkit.distributed import Ranks
from toolkit.hardware import resolve_precision
from toolkit.utils import flag_names, require_utf8

PROG = "train.py"
TRAIN_FLAGS = [f.name for f in dataclasses.fields(TrainConfig) if f.name != "seed"]  # --seed is the experiment's
EXPERIMENT_FLAGS = [f.name for f in dataclasses.fields(ExperimentConfig) if f.name not in ("data", "save_to", "train")]


def select_device(gpu: bool | None, ranks: Ranks = Ranks()) -> tuple[torch.device, str | None]:
    """The paper's `--gpu/--cpu` choice (`toolkit.device.choose_device`): CUDA when available unless `gpu` is False,
    `cuda:LOCAL_RANK` under torchrun.

    `gpu`: True (asked for CUDA), None (not asked either way) or False (the CPU). Returns the
    device and a line that says the choice (None: nothing to say), for the caller to print.
    """
    # --gpu without CUDA trains on the CPU, as the paper's train.py did: only a note, not an error.
    device = choose_device("cpu" if gpu is False else None, ranks, cpu_hint="--cpu")
    if gpu is False:
        return device, None
    if device.type == "cuda":
        where = ", one GPU per rank: cuda:LOCAL_RANK" if ranks.distributed else ""
        return device, (f"training on CUDA ({torch.cuda.get_device_name(device)}{where}); pass --cpu to "
                        f"train on the CPU")
    return device, f"{'--gpu given but ' if gpu else ''}CUDA is not available; training on the CPU"


def _default(name: str):
    """A flag's default, from the config field that writes it once."""
    return default_of(TrainConfig if name in TRAIN_FLAGS else ExperimentConfig, name)


def _rule(name: str) -> dict:
    """A flag's `type` and `default`, from the config field that writes them once."""
    return flag_rule(TrainConfig if name in TRAIN_FLAGS else ExperimentConfig, name)


def build_parser() -> argparse.ArgumentParser:
    """train.py's argument parser; its help is also the command-line reference of the HTML docs.

    Defaults and value rules come from the config fields (`ExperimentConfig`, `TrainConfig`), where they are written once.
    """
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Train an adaptation function on pairs of features; log top-k retrieval to TensorBoard.",
        allow_abbrev=False,
    )
    p.add_argument("-d", "--data", required=True, metavar="FILE",
                   help="features file of pairs written by extract.py (SAVE/MODEL/features_pca256.npy for the paper's recipe), or the original implementation's with --allow-pickle")
    p.add_argument("-s", "--save-to", required=True, metavar="DIR",
                   help="output folder: run1/, run2/, ... (TensorBoard, checkpoint, metrics), avg/, summary.json")
    p.add_argument("--model", choices=sorted(MODELS), **_rule("model"),
                   help="original: Linear(D,1024,no bias)+ReLU; linear: Linear(D,256,no bias), no ReLU; peterson: "
                        "x*relu(w); cca: shared CCA, one bias-free linear map fitted in closed form in seconds "
                        f"(--cca-k, or --val-split to choose k); dummy: raw features, no training (default: {_default('model')})")
    p.add_argument("--out-dim", **_rule("out_dim"), metavar="N",
                   help="output width of --model original (default: 1024, the paper's) or linear (default: 256)")
    p.add_argument("--cca-k", **_rule("cca_k"), metavar="K",
                   help="--model cca: directions kept, 1 to D; default: the k of best validation top-1 over every "
                        "k from 1 to D (needs --val-split)")
    p.add_argument("--cca-ridge", **_rule("cca_ridge"), metavar="R",
                   help=f"--model cca: ridge added to Cov(l-r), as a share of its mean eigenvalue (default: "
                        f"{DEFAULT_RIDGE:g}; 0: none, and a singular fit is refused)")
    p.add_argument("-e", "--epochs", **_rule("epochs"), help=f"epochs (default: {_default('epochs')})")
    p.add_argument("--batch-size", **_rule("batch_size"), metavar="B",
                   help="pairs per Adam step (the global batch under torchrun), shuffled each epoch; "
                        "default: all training pairs, one full-batch step per epoch (the paper's recipe)")
    p.add_argument("-r", "--runs", **_rule("runs"),
                   help=f"independent runs, each with its own split and initialisation, as in the paper (default: {_default('runs')})")
    p.add_argument("--same-split", action="store_true", default=_default("same_split"),
                   help="train every run on run 1's split, so runs differ only in their initialisation")
    p.add_argument("-t", "--temperature", **_rule("temperature"),
                   help="multiplies the cosines before the softmax, as in the paper's code "
                        f"(default: {_default('temperature'):g}; the paper's command uses 15)")
    # The share's rule is split_indices's (a UserError naming --test-split), checked once there.
    p.add_argument("--test-split", type=float, default=_default("test_split"),
                   help=f"fraction of pairs held out for testing, in (0, 1) (default: {_default('test_split')})")
    p.add_argument("--val-split", **_rule("val_split"),
                   help="share of the training pairs held out for validation: best.pt, a calibrated threshold, "
                        f"--patience (default: {_default('val_split'):g}, none)")
    p.add_argument("--patience", **_rule("patience"), metavar="P",
                   help="stop a run after P epochs without a better validation top-1 (needs --val-split)")
    p.add_argument("-k", "--topk", **_rule("topk"), nargs="+", metavar="K",
                   help=f"k values of the top-k metrics (default: {' '.join(map(str, _default('topk')))})")
    dev = p.add_mutually_exclusive_group()
    # As in the paper's train.py: CUDA when present unless --cpu; None = not asked either way.
    dev.add_argument("--gpu", dest="gpu", action="store_true", default=None,
                     help="train on CUDA (the default when CUDA is available; without it, the CPU, said on stderr)")
    dev.add_argument("--cpu", dest="gpu", action="store_false", help="train on the CPU even when CUDA is available")
    p.add_argument("--seed", **_rule("seed"),
                   help="fixes the splits and the initialisations (run i uses SEED+i-1), 0 to 2**32-1; "
                        "default: drawn at random and recorded")
    _add_later_flags(p)
    return p


def _add_later_flags(p: argparse.ArgumentParser) -> None:
    """The optimiser's, the objective's and the input's and output's flags."""
    p.add_argument("--lr", **_rule("lr"), help=f"Adam learning rate (default: {_default('lr'):g})")
    p.add_argument("--weight-decay", **_rule("weight_decay"),
                   help=f"Adam weight decay (default: {_default('weight_decay'):g})")
    p.add_argument("--precision", choices=("auto", *PRECISIONS), **_rule("precision"),
                   help="bf16: autocast the model and similarity products to bfloat16, loss and evaluation in fp32; auto: "
                        "bf16 where it is native (CUDA with bf16, CPUs with AVX512-BF16 or AMX), else fp32; bf16 on a "
                        f"CPU without them is emulated, many times slower (warned) (default: {_default('precision')})")
    p.add_argument("--objective", choices=OBJECTIVES, **_rule("objective"),
                   help="contrastive: the paper's loss with in-batch negatives; simsiam: positive pairs only, predictor + "
                        "stop-gradient (Chen and He, 2021); byol: positive pairs only, predictor + momentum target "
                        f"(Grill et al., 2020) (default: {_default('objective')})")
    p.add_argument("--ema", **_rule("ema"),
                   help=f"byol: base decay of the target, raised to 1 along a cosine over the steps (default: {DEFAULT_EMA})")
    p.add_argument("--allow-pickle", action="store_true", default=_default("allow_pickle"),
                   help="accept the original implementation's pickled features file; unpickling can run code, so only for files you trust")
    p.add_argument("--no-images", dest="images", action="store_false", default=_default("images"),
                   help="skip the TensorBoard retrieval grid (test queries with their top 5)")
    p.add_argument("--subset", metavar="FILE", **_rule("subset"),
                   help="train and test only on the pairs this file names: the paper's TLL_obj.csv as published, "
                        "a CSV with a name column, or one name a line")
    p.add_argument("--overwrite", action="store_true", default=_default("overwrite"),
                   help="replace the runs (run*/, avg/, summary.json) train.py wrote in --save-to; other files are kept; "
                        "a folder holding no runs, or an entry named like a run train.py did not write, is refused")


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


def build_config(args: argparse.Namespace, precision: str | None = None) -> ExperimentConfig:
    """The one frozen configuration of this invocation, from the parsed flags (its dataclasses check them).

    `precision`: `--precision` resolved on the device (`toolkit.hardware.resolve_precision`: `auto`
    becomes fp32 or bf16); None takes the flag as given.
    """
    values = {**vars(args), **({"precision": precision} if precision is not None else {})}
    return ExperimentConfig(
        data=args.data, save_to=args.save_to, train=TrainConfig(**{name: values[name] for name in TRAIN_FLAGS}),
        **{name: values[name] for name in EXPERIMENT_FLAGS})


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, build the config, choose the device, run the experiment and print its summary; returns the exit status."""
    ranks = Ranks.from_env()
    # Under torchrun every rank parses the same command line; rank 0 alone says what is wrong with it.
    with contextlib.redirect_stderr(io.StringIO()) if ranks.rank else contextlib.nullcontext():
        args = parse_args(argv)
    require_utf8({"-d": args.data, "-s": args.save_to, "--subset": args.subset})  # every rank finds the same; rank 0 says it
    device, device_note = select_device(args.gpu, ranks)
    ranks = ranks.join(device)
    precision = resolve_precision(args.precision, device)
    cfg = build_config(args, precision.precision)

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
    print(_table(summary.final, cfg.train.topk, cfg.runs))
    if summary.best_val is not None:
        print(_table(summary.best_val, cfg.train.topk, cfg.runs, f"at best val epoch {summary.best_val['epochs']}"))
    collapse = summary.collapse
    if collapse is not None:
        print(f"collapse: {collapse['verdict']} (final output std {', '.join(f'{s:.4f}' for s in collapse['output_std'])}; "
              f"healthy about {collapse['healthy']:.4f}, collapsed below {collapse['threshold']:.4f})")


if __name__ == "__main__":
    sys.exit(run_cli(main, prog=PROG))
