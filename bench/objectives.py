"""Which objective, which model? Test top-1 and MRR of contrastive, simsiam and byol, of the closed-form shared CCA
and of a linear map, and whether each collapsed.

    PYTHONPATH=. python bench/objectives.py                                  # planted pairs (600)
    PYTHONPATH=. python bench/objectives.py --features demo_out/features/clip_rn50x4/features_pca64.npy --label demo
    PYTHONPATH=. python bench/objectives.py --pairs 6016 --objectives contrastive --runs 1   # TLL-sized, planted

Runs the experiment of `train.py` (`adaptation.experiment.run_experiment`, in this process) once per objective with `-r RUNS` (3 runs: seeds SEED,
SEED+1, SEED+2 for the initialisation, one split: `--same-split`), 150 epochs and `-t 15`, the paper's command
otherwise; simsiam and byol in minibatches of `--batch-size`. Without `--features` it trains on
planted pairs with bench/train.py's planted settings (64 signal dimensions shared by a pair,
per-image noise 1.0, 192 nuisance dimensions of std 2.0, a flipped copy per pair), at 600
pairs rather than bench/train.py's 6016 so that the nine runs fit in about ten minutes on a
shared 2-core CPU.

Every run holds out `--val-split` of its training pairs (default 0.1) for validation: the table
gives test top-1 at the last epoch and at the best validation epoch (what best.pt holds). The model
rows, all with the contrastive loss where they train:

- `cca`: `--model cca`, k chosen on validation over every k from 1 to D (one run: a closed form on
  one split draws nothing).
- `linear`: `--model linear` (no ReLU), one experiment per `--linear-widths` width; the row is the
  width whose best validation top-1 (mean over runs) is highest, and says which.

"collapsed" is the collapse detector of `adaptation.objectives` on each run's final encoder
outputs over the training pairs: read from summary.json for simsiam and byol, computed here
from the checkpoint for contrastive, with the same function. The first row is `--model dummy`,
the raw features' cosines (one run: nothing is trained or drawn); the second the `original`
model as each run starts, before any step: what a run that learns nothing would score.

Prints a Markdown table and writes bench/results/objectives-TIMESTAMP.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import benchlib  # bench/ is the script's folder, so it is on sys.path; the packages come from the install
import numpy as np
import torch

from adaptation.checkpoint import CHECKPOINT, load_checkpoint
from adaptation.experiment import run_experiment
from adaptation.models import build_model
from adaptation.objectives import OBJECTIVES, is_collapsed, output_std
from synthetic.planted import planted_array
from adaptation.runs import read_summary
from adaptation.split import split_data
from adaptation.training import TrainConfig, evaluate
from featuresExtractor.pairs_file import load_pairs
from toolkit.utils import read_json


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/objectives.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--features", default=None, help="a pairs features file (default: planted pairs made here)")
    p.add_argument("--label", default=None, help="the data's name in the table (default: 'planted N' or the file)")
    p.add_argument("--pairs", type=int, default=600, help="planted: original pairs (default: 600)")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--objectives", nargs="+", choices=OBJECTIVES, default=list(OBJECTIVES))
    p.add_argument("--epochs", type=int, default=150)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=256, help="simsiam and byol minibatch (default: 256)")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more train.py flags, e.g. --lr 1e-2")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default: 1, the machine is shared)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", default=None, help="keep the runs in this folder (default: a temporary one)")
    p.add_argument("--val-split", default="0.1", help="share of the training pairs held out for validation")
    p.add_argument("--models", nargs="*", choices=("cca", "linear"), default=["cca", "linear"],
                   help="model rows beside the objectives' (default: cca linear)")
    p.add_argument("--linear-widths", type=int, nargs="+", default=[64, 128, 256],
                   help="linear: the widths tried, one chosen on validation (default: 64 128 256)")
    p.add_argument("--reuse", action="store_true",
                   help="with --keep: read runs already finished there instead of training them again")
    return p.parse_args(argv)


def _train_script():
    """The repository's train.py as a module (bench/train.py, this folder's benchmark, shadows the name)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_script", benchlib.ROOT / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BASELINE = "dummy"
"""The table's first row: `--model dummy`, the raw features' cosines, nothing trained."""


def command(features: Path, save_to: Path, objective: str, args: argparse.Namespace, model: str = "original",
            width: int | None = None) -> list[str]:
    """train.py's flags for one row (`objective` BASELINE: the raw features; `model` cca or linear: a model row)."""
    common = ["-d", str(features), "-s", str(save_to), "-t", "15", "--test-split", "0.25", "--val-split", args.val_split,
              "-k", "1", "3", "5", "--seed", str(args.seed), "--same-split", "--no-images"]
    if objective == BASELINE:
        return common + ["--model", "dummy", "-e", "1", "-r", "1"]
    if model == "cca":
        return common + ["--model", "cca", "-r", "1"]
    cmd = common + ["--model", model, "-e", str(args.epochs), "-r", str(args.runs), "--objective", objective]
    if width is not None:
        cmd += ["--out-dim", str(width)]
    if objective != "contrastive":
        cmd += ["--batch-size", str(args.batch_size)]
    return cmd + list(args.extra)


def contrastive_collapse(save_to: Path, runs: int, features: Path) -> tuple[list[float], list[bool], int]:
    """The collapse detector applied to contrastive runs, from their checkpoints, as train.py applies it.

    Returns each run's output std and verdict, and the output width (cca: the largest k of the runs).
    """
    pairs = load_pairs(features)
    row_of = {name: i for i, name in enumerate(pairs.names)}
    stds, flags, widths = [], [], []
    for run in range(1, runs + 1):
        model, ckpt = load_checkpoint(save_to / f"run{run}" / CHECKPOINT)
        train_idx = np.array([row_of[n] for n in ckpt["train_names"]])
        data = split_data(pairs, train_idx, np.array([row_of[n] for n in ckpt["test_names"]]))
        with torch.no_grad():
            std = output_std(torch.cat([model(data.train[0]), model(data.train[1])])).item()
        stds.append(std)
        flags.append(is_collapsed(std, model.out_dim))
        widths.append(model.out_dim)
    return stds, flags, max(widths)


def untrained(features: Path, runs: int, seed: int, baseline: Path) -> dict:
    """The `original` model at its initialisation in each run (train.py seeds run i with SEED + i - 1), on the test pairs.

    The split is the baseline run's (`baseline`: its checkpoint), the one every row shares.
    """
    pairs = load_pairs(features)
    ckpt = load_checkpoint(baseline)[1]
    row_of = {name: i for i, name in enumerate(pairs.names)}
    data = split_data(pairs, np.array([row_of[n] for n in ckpt["train_names"]]),
                      np.array([row_of[n] for n in ckpt["test_names"]]))
    cfg = TrainConfig(epochs=1, temperature=15.0, topk=(1, 3, 5))
    top1, mrr, stds = [], [], []
    for run in range(1, runs + 1):
        torch.manual_seed(seed + run - 1)
        model = build_model("original", pairs.in_dim)
        figures = evaluate(model, *data.test, cfg)
        top1.append(figures["top 1"].item())
        mrr.append(figures["MRR"].item())
        with torch.no_grad():
            stds.append(output_std(torch.cat([model(data.train[0]), model(data.train[1])])).item())
    return {"top1": top1, "mrr": mrr, "output_std": stds, "out_dim": model.out_dim}


def best_val_top1(run: Path) -> float:
    """A run's validation top-1 at its best validation epoch (metrics.json)."""
    record = read_json(run / "metrics.json")
    return record["epochs"][record["best_epoch"] - 1]["Val/top 1"]


def experiment_row(features: Path, save_to: Path, objective: str, args: argparse.Namespace, label: str,
                   train_script, model: str = "original", width: int | None = None) -> dict:
    """Run (or, with --reuse, read) one train.py experiment; returns its table row."""
    cmd = command(features, save_to, objective, args, model, width)
    print(f"$ python train.py {' '.join(cmd)}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    if args.reuse and (save_to / "summary.json").is_file():
        seconds = None
    else:
        # train.py's own parser and config, so --extra takes exactly train.py's flags.
        config = train_script.build_config(train_script.parse_args([*cmd, "--overwrite", "--cpu"]))
        run_experiment(config, torch.device("cpu"))
        seconds = time.perf_counter() - start
    summary = read_summary(save_to)
    final, best = summary["final"], summary.get("best_val") or summary["final"]
    runs = summary["config"]["runs"]
    if "collapse" in summary:
        stds, flags = summary["collapse"]["output_std"], summary["collapse"]["collapsed"]
        out_dim = summary["config"]["model_kwargs"].get("out_dim", summary["config"]["in_dim"])
    else:
        stds, flags, out_dim = contrastive_collapse(save_to, runs, features)
    chosen = None
    if model == "cca":
        ks = [read_json(save_to / f"run{r}" / "config.json")["cca"]["k"] for r in range(1, runs + 1)]
        chosen = f"k {', '.join(map(str, ks))} of {summary['config']['in_dim']}"
    elif model == "linear":
        chosen = f"width {width}"
    what = "none (dummy: raw features)" if objective == BASELINE else "none (closed form)" if model == "cca" else objective
    return {
        "data": label, "model": model if objective != BASELINE else "dummy", "objective": what, "chosen": chosen,
        "runs": runs, "seconds": seconds,
        "top1_mean": final["Test/top 1"]["mean"], "top1_std": final["Test/top 1"]["std"],
        "top1_best_val_mean": best["Test/top 1"]["mean"], "top1_best_val_std": best["Test/top 1"]["std"],
        "val_top1_best_mean": float(np.mean([best_val_top1(save_to / f"run{r}") for r in range(1, runs + 1)])),
        "best_val_epochs": (summary.get("best_val") or {}).get("epochs"),
        "mrr_mean": final["Test/MRR"]["mean"], "mrr_std": final["Test/MRR"]["std"],
        "top1_values": final["Test/top 1"]["values"], "output_std": stds, "collapsed": flags,
        "output_std_x_sqrt_d": [s * out_dim ** 0.5 for s in stds], "command": "python train.py " + " ".join(cmd),
        "n_test": summary["config"]["n_test"],
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    machine = benchlib.machine()
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench-objectives-"))
    if args.features:
        features = Path(args.features).resolve()
        label = args.label or features.name
    else:
        features = work / "planted" / "features.npy"
        features.parent.mkdir(parents=True, exist_ok=True)
        np.save(features, planted_array(args.pairs, args.dim, signal_dim=64, noise=1.0, nuisance=2.0, seed=args.seed))
        label = args.label or f"planted {args.pairs}"
    train_script = _train_script()
    folder = work / label.replace(" ", "_")
    rows = [experiment_row(features, folder / objective, objective, args, label, train_script)
            for objective in [BASELINE, *args.objectives]]
    if "cca" in args.models:
        rows.append(experiment_row(features, folder / "cca", "contrastive", args, label, train_script, model="cca"))
    if "linear" in args.models:
        tried = [experiment_row(features, folder / f"linear{w}", "contrastive", args, label, train_script,
                                model="linear", width=w) for w in args.linear_widths]
        best = max(tried, key=lambda r: r["val_top1_best_mean"])  # chosen on validation, never on test
        best["chosen"] += (f" (of {', '.join(str(w) for w in args.linear_widths)}; validation top-1 "
                           + ", ".join(f"{100 * r['val_top1_best_mean']:.1f}" for r in tried) + ")")
        best["seconds_all_widths"] = sum(r["seconds"] or 0.0 for r in tried)
        best["widths_tried"] = [{"width": w, "val_top1_best_mean": r["val_top1_best_mean"], "seconds": r["seconds"],
                                 "top1_best_val_mean": r["top1_best_val_mean"]} for w, r in zip(args.linear_widths, tried)]
        rows.append(best)
    init = untrained(features, args.runs, args.seed, folder / BASELINE / "run1" / CHECKPOINT)
    std_dev = (lambda v: float(np.std(v, ddof=1)) if len(v) > 1 else 0.0)
    rows.insert(1, {
        "data": label, "model": "original", "objective": "none (original at its initialisation)", "chosen": None,
        "runs": args.runs, "seconds": 0.0,
        "top1_mean": float(np.mean(init["top1"])), "top1_std": std_dev(init["top1"]),
        "top1_best_val_mean": None, "top1_best_val_std": None,
        "mrr_mean": float(np.mean(init["mrr"])), "mrr_std": std_dev(init["mrr"]), "top1_values": init["top1"],
        "output_std": init["output_std"], "collapsed": [is_collapsed(s, init["out_dim"]) for s in init["output_std"]],
        "output_std_x_sqrt_d": [s * init["out_dim"] ** 0.5 for s in init["output_std"]],
        "command": "(computed here: train.py's initialisation of each run, not trained)", "n_test": rows[0]["n_test"],
    })
    print(f"\n{label}: {args.epochs} epochs, {args.runs} runs (cca: 1), test set {rows[0]['n_test']} pairs, "
          f"validation {args.val_split} of the training pairs (mean ± std over runs, %)\n")
    print("| data | model | objective | test top-1 (last epoch) | test top-1 (best val epoch) | test MRR | chosen on "
          "validation | seconds | collapsed (runs) | output std × √d |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    pct = (lambda m, s: "–" if m is None else f"{100 * m:.2f} ± {100 * s:.2f}")
    for r in rows:
        seconds = r.get("seconds_all_widths", r["seconds"])
        print(f"| {r['data']} | {r['model']} | {r['objective']} | {pct(r['top1_mean'], r['top1_std'])} | "
              f"{pct(r['top1_best_val_mean'], r['top1_best_val_std'])} | {pct(r['mrr_mean'], r['mrr_std'])} | "
              f"{r['chosen'] or '–'} | {'–' if seconds is None else f'{seconds:.1f}'} | "
              f"{sum(r['collapsed'])} of {len(r['collapsed'])} | "
              f"{min(r['output_std_x_sqrt_d']):.2f}–{max(r['output_std_x_sqrt_d']):.2f} |")
    return benchlib.finish("objectives", args, machine, rows=rows, prefix="\n")


if __name__ == "__main__":
    sys.exit(main())
