"""Positive pairs only? Test top-1 and MRR of contrastive, simsiam and byol, and whether each collapsed.

    PYTHONPATH=. python bench/objectives.py                                  # planted pairs (600)
    PYTHONPATH=. python bench/objectives.py --features demo_out/features/clip_rn50x4/features_pca64.npy --label demo

Runs the experiment of `train.py` (`adaptation.experiment.run_experiment`, in this process) once per objective with `-r RUNS` (3 runs: seeds SEED,
SEED+1, SEED+2 for the initialisation, one split: `--same-split`), 150 epochs and `-t 15`, the paper's command
otherwise; simsiam and byol in minibatches of `--batch-size`. Without `--features` it trains on
planted pairs with bench/train.py's planted settings (64 signal dimensions shared by a pair,
per-image noise 1.0, 192 nuisance dimensions of std 2.0, a flipped copy per pair), at 600
pairs rather than bench/train.py's 6016 so that the nine runs fit in about ten minutes on a
shared 2-core CPU.

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
from adaptation.split import split_data, split_indices
from adaptation.training import TrainConfig, evaluate
from featuresExtractor.pairs_file import load_pairs


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


def command(features: Path, save_to: Path, objective: str, args: argparse.Namespace) -> list[str]:
    if objective == BASELINE:
        return ["-d", str(features), "--model", "dummy", "-s", str(save_to), "-e", "1", "-r", "1", "--test-split", "0.25",
                "-k", "1", "3", "5", "--seed", str(args.seed), "--same-split", "--no-images"]
    cmd = ["-d", str(features), "--model", "original", "-s", str(save_to), "-e", str(args.epochs), "-r", str(args.runs),
           "-t", "15", "--test-split", "0.25", "-k", "1", "3", "5", "--seed", str(args.seed), "--same-split",
           "--no-images", "--objective", objective]
    if objective != "contrastive":
        cmd += ["--batch-size", str(args.batch_size)]
    return cmd + list(args.extra)


def contrastive_collapse(save_to: Path, runs: int, features: Path) -> tuple[list[float], list[bool]]:
    """The collapse detector applied to contrastive runs, from their checkpoints, as train.py applies it."""
    pairs = load_pairs(features)
    stds, flags = [], []
    for run in range(1, runs + 1):
        model, ckpt = load_checkpoint(save_to / f"run{run}" / CHECKPOINT)
        data = split_data(pairs, *split_indices(len(pairs), ckpt["config"]["test_split"], ckpt["config"]["split_seed"]))
        with torch.no_grad():
            std = output_std(torch.cat([model(data.train[0]), model(data.train[1])])).item()
        stds.append(std)
        flags.append(is_collapsed(std, model.out_dim))
    return stds, flags


def untrained(features: Path, runs: int, seed: int) -> dict:
    """The `original` model at its initialisation in each run (train.py seeds run i with SEED + i - 1), on the test pairs."""
    pairs = load_pairs(features)
    data = split_data(pairs, *split_indices(len(pairs), 0.25, seed))
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
    rows = []
    train_script = _train_script()
    for objective in [BASELINE, *args.objectives]:
        save_to = work / label.replace(" ", "_") / objective
        cmd = command(features, save_to, objective, args)
        print(f"$ python train.py {' '.join(cmd)}", file=sys.stderr, flush=True)
        start = time.perf_counter()
        if args.reuse and (save_to / "summary.json").is_file():
            summary = read_summary(save_to)
            seconds = None
        else:
            # train.py's own parser and config, so --extra takes exactly train.py's flags.
            config = train_script.build_config(train_script.parse_args([*cmd, "--overwrite", "--cpu"]))
            run_experiment(config, torch.device("cpu"))
            seconds = time.perf_counter() - start
            summary = read_summary(save_to)
        final = summary["final"]
        out_dim = summary["config"]["model_kwargs"].get("out_dim", summary["config"]["in_dim"])
        if "collapse" in summary:
            stds, flags = summary["collapse"]["output_std"], summary["collapse"]["collapsed"]
        else:
            stds, flags = contrastive_collapse(save_to, summary["config"]["runs"], features)
        rows.append({
            "data": label, "objective": "none (dummy: raw features)" if objective == BASELINE else objective,
            "runs": summary["config"]["runs"], "seconds": seconds,
            "top1_mean": final["Test/top 1"]["mean"], "top1_std": final["Test/top 1"]["std"],
            "mrr_mean": final["Test/MRR"]["mean"], "mrr_std": final["Test/MRR"]["std"],
            "top1_values": final["Test/top 1"]["values"], "output_std": stds, "collapsed": flags,
            "output_std_x_sqrt_d": [s * out_dim ** 0.5 for s in stds], "command": "python train.py " + " ".join(cmd),
            "n_test": summary["config"]["n_test"],
        })
    init = untrained(features, args.runs, args.seed)
    std_dev = (lambda v: float(np.std(v, ddof=1)) if len(v) > 1 else 0.0)
    rows.insert(1, {
        "data": label, "objective": "none (original at its initialisation)", "runs": args.runs, "seconds": 0.0,
        "top1_mean": float(np.mean(init["top1"])), "top1_std": std_dev(init["top1"]),
        "mrr_mean": float(np.mean(init["mrr"])), "mrr_std": std_dev(init["mrr"]), "top1_values": init["top1"],
        "output_std": init["output_std"], "collapsed": [is_collapsed(s, init["out_dim"]) for s in init["output_std"]],
        "output_std_x_sqrt_d": [s * init["out_dim"] ** 0.5 for s in init["output_std"]],
        "command": "(computed here: train.py's initialisation of each run, not trained)", "n_test": rows[0]["n_test"],
    })
    print(f"\n{label}: {args.epochs} epochs, {args.runs} runs, test set {rows[0]['n_test']} pairs "
          f"(mean ± std over runs, %)\n")
    print("| data | objective | test top-1 | test MRR | collapsed (runs) | output std × √d |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['data']} | {r['objective']} | {100 * r['top1_mean']:.2f} ± {100 * r['top1_std']:.2f} | "
              f"{100 * r['mrr_mean']:.2f} ± {100 * r['mrr_std']:.2f} | {sum(r['collapsed'])} of {len(r['collapsed'])} | "
              f"{min(r['output_std_x_sqrt_d']):.2f}–{max(r['output_std_x_sqrt_d']):.2f} |")
    return benchlib.finish("objectives", args, machine, rows=rows, prefix="\n")


if __name__ == "__main__":
    sys.exit(main())
