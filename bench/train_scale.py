"""Training past the N x N wall: peak RSS and seconds per epoch of train.py as the pairs grow.

    PYTHONPATH=. python bench/train_scale.py                                   # the default grid below
    PYTHONPATH=. python bench/train_scale.py --pairs 6000 20000 --batch-sizes 4096 full --ranks 1 --epochs 1

For each number of planted pairs (256-d, one flipped copy each, as extract.py writes them), it
writes a features file and runs `train.py` itself as a user would (`-t 15`, `--no-images`, a fixed
seed), once per batch size (`full` = the default, all training pairs) and number of gloo ranks
(`torchrun --nproc_per_node K` for K > 1), each in a fresh process. It reports the seconds per
epoch from the run's metrics.json (training and the test evaluation) and the peak RSS of the
largest process (a rank under torchrun). A run that train.py refuses (its memory check) is
reported as refused, with its one line.

`--test-split` defaults to 0.02 so that the test evaluation, which is the same for every batch
size, stays a small part of the epoch; `--eval-pairs N` separately times the streamed evaluation
of an N-pair test set (raw `--eval-dim` features, `dummy` model) to show it fits in memory.

Prints a table and writes bench/results/train_scale-TIMESTAMP.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import benchlib
import numpy as np

from synthetic.planted import planted_array

WRAP = ("import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, rc)")
"""Runs the command in a fresh process whose only children are the run's: their peak RSS (KiB) alone."""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/train_scale.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, nargs="+", default=[6000, 20000, 40000, 100000, 200000])
    p.add_argument("--batch-sizes", nargs="+", default=["4096", "full"], help="integers, or `full`")
    p.add_argument("--ranks", type=int, nargs="+", default=[1], help="gloo ranks (torchrun for more than 1)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--test-split", type=float, default=0.02)
    p.add_argument("--eval-pairs", type=int, default=0, help="also time the evaluation of a test set this large")
    p.add_argument("--eval-dim", type=int, default=64)
    p.add_argument("--timeout", type=float, default=600, help="seconds per run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="cuda: train.py --gpu (NCCL under torchrun, one GPU per rank)")
    p.add_argument("--precisions", nargs="+", choices=["fp32", "bf16"], default=["fp32"])
    p.add_argument("--torchrun", action="store_true",
                   help="launch through torchrun even for 1 rank (e.g. to time NCCL's path on one GPU)")
    return p.parse_args(argv)


def _run(cmd: list[str], timeout: float, env: dict) -> tuple[int, float, str]:
    """(return code, peak RSS in bytes of the largest process, stderr's last line)."""
    proc = subprocess.run([sys.executable, "-c", WRAP, *cmd], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=benchlib.ROOT)
    rss_kib, rc = proc.stdout.strip().splitlines()[-1].split()
    lines = [line for line in proc.stderr.splitlines() if line.startswith("train.py")]
    return int(rc), int(rss_kib) * 1024, lines[-1] if lines else proc.stderr.strip()[-300:]


def train_row(features: Path, pairs: int, batch: str, ranks: int, precision: str, args, work: Path) -> dict:
    save_to = work / f"runs-{pairs}-{batch}-{ranks}-{precision}"
    cmd = ["train.py", "-d", str(features), "-s", str(save_to), "-e", str(args.epochs), "-t", "15",
           "--test-split", str(args.test_split), "--no-images", "--seed", str(args.seed), "-k", "1",
           "--precision", precision, "--gpu" if args.device == "cuda" else "--cpu"]
    if batch != "full":
        cmd += ["--batch-size", batch]
    if ranks > 1 or args.torchrun:
        cmd = ["-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port",
               str(29500 + pairs % 1000), *cmd]
    paths = [str(benchlib.ROOT), os.environ.get("PYTHONPATH")]  # packages carried to a device machine stay visible
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
    if ranks > 1:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // ranks))
    rc, rss, last = _run([sys.executable, *cmd], args.timeout, env)
    row = {"pairs": pairs, "batch": batch, "ranks": ranks, "precision": precision, "device": args.device, "rc": rc,
           "peak_rss_gb": rss / 1e9, "load1": os.getloadavg()[0]}
    if rc == 0:
        metrics = json.loads((save_to / "run1" / "metrics.json").read_text())
        row["s_per_epoch"] = metrics["seconds"] / args.epochs
        row["test_top1"] = metrics["epochs"][-1]["Test/top 1"]
    else:
        row["message"] = last
    return row


def eval_row(n: int, dim: int) -> dict:
    """Time the streamed evaluation of an n-pair test set in this process (peak RSS measured around it)."""
    import torch

    from adaptation.evaluation import evaluate_vectors

    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, dim, generator=g)
    b = a + 0.5 * torch.randn(n, dim, generator=g)
    benchlib.reset_peak_rss()
    before = benchlib.rss_bytes()
    start = time.perf_counter()
    figures = evaluate_vectors(a, b, 15.0, (1,))
    seconds = time.perf_counter() - start
    return {"eval_pairs": n, "dim": dim, "seconds": seconds, "peak_rss_gb": benchlib.peak_rss_bytes() / 1e9,
            "extra_gb": (benchlib.peak_rss_bytes() - before) / 1e9, "top1": figures["top 1"].item(),
            "full_matrix_gb": 4 * n * n / 1e9}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    machine = benchlib.machine()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for pairs in args.pairs:
            features = work / f"planted-{pairs}" / "features.npy"
            features.parent.mkdir()
            np.save(features, planted_array(pairs, args.dim, signal_dim=64, noise=1.0, nuisance=2.0, seed=args.seed))
            for batch in args.batch_sizes:
                for ranks in args.ranks:
                    for precision in args.precisions:
                        row = train_row(features, pairs, batch, ranks, precision, args, work)
                        rows.append(row)
                        print(json.dumps(row), file=sys.stderr, flush=True)
            features.unlink()
    columns = [("pairs", "pairs", "d"), ("batch", "batch", ""), ("ranks", "ranks", "d"), ("precision", "precision", ""),
               ("s_per_epoch", "s/epoch", ".2f"), ("peak_rss_gb", "peak RSS GB", ".2f"),
               ("test_top1", "test top-1", ".3f"), ("load1", "load avg", ".1f")]
    print(f"train.py on planted {args.dim}-d pairs (+ flipped copies), test split {args.test_split}, "
          f"{args.epochs} epoch(s), t=15, on {args.device}; CPU {machine['cpu']}, {machine['cores']} cores"
          + (f", GPU {machine['cuda_device']}" if machine.get("cuda_device") else ""))
    print(benchlib.table(rows, columns))
    for row in rows:
        if row["rc"] != 0:
            print(f"{row['pairs']} pairs, batch {row['batch']}, {row['ranks']} rank(s): exit {row['rc']}: {row['message']}")
    evals = [eval_row(args.eval_pairs, args.eval_dim)] if args.eval_pairs else []
    for e in evals:
        print(f"streamed evaluation of {e['eval_pairs']} test pairs ({e['dim']}-d): {e['seconds']:.1f} s, "
              f"peak RSS {e['peak_rss_gb']:.2f} GB (+{e['extra_gb']:.2f} GB for the evaluation; the full matrix "
              f"alone would be {e['full_matrix_gb']:.0f} GB)")
    return benchlib.finish("train_scale", args, machine, rows=rows, evals=evals)


if __name__ == "__main__":
    sys.exit(main())
