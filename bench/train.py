"""Training throughput: seconds per run at TLL scale, beside the matrix-product floor.

    python bench/train.py                      # 6016 pairs, 256-d, 150 epochs: the full measurement
    python bench/train.py --pairs 2000 --epochs 20 --models original   # a quick look

For each device (the CPU, and CUDA when present), model and precision, it times one call of
`adaptation.training.train` on planted pairs (each pair shares a latent signal under larger
nuisance dimensions, with a flipped copy per pair, split 0.75/0.25 as the seed command does),
and reports the final test top-1 next to the time.

The **floor** is what the recipe cannot avoid: per training set and epoch, the three big
products of the similarity (`A @ B.T` forward, `G @ B` and `G.T @ A` backward, A and B of shape
N x out_dim, G of shape N x N), timed alone in the same precision on the same machine, times the
number of sets and epochs. `ratio` = run time / floor.

Prints a table and writes bench/results/train-TIMESTAMP.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Sequence

import benchlib  # bench/ is the script's folder; benchlib also puts the repository on sys.path
import torch

from adaptation.data import split_data, split_indices
from adaptation.models import build_model
from adaptation.synthetic import planted_pairs
from adaptation.training import PRECISIONS, TrainConfig, make_optimizer, train

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/train.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=6016, help="original pairs (default: 6016, TLL)")
    p.add_argument("--dim", type=int, default=256, help="feature dimension (default: 256, the PCA size)")
    p.add_argument("--epochs", type=int, default=150)
    p.add_argument("--test-split", type=float, default=0.25)
    p.add_argument("--temperature", type=float, default=15.0)
    p.add_argument("--models", nargs="+", default=["original", "peterson", "dummy"])
    p.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS))
    p.add_argument("--devices", nargs="+", default=None, help="default: cpu, plus cuda when present")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per setting; the median is reported")
    p.add_argument("--floor-reps", type=int, default=5, help="timings of the product triple; the median is used")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def product_floor(sizes: Sequence[int], width: int, dtype: torch.dtype, device: torch.device, reps: int) -> float:
    """Seconds per epoch of the three similarity products for training sets of `sizes` rows."""
    total = 0.0
    for n in sizes:
        g = torch.Generator(device="cpu").manual_seed(n)
        a = torch.randn(n, width, generator=g).to(device, dtype)
        b = torch.randn(n, width, generator=g).to(device, dtype)
        grad = torch.randn(n, n, generator=g).to(device, dtype)
        times = []
        for i in range(reps + 1):
            _sync(device)
            start = time.perf_counter()
            a @ b.T
            grad @ b
            grad.T @ a
            _sync(device)
            if i:  # the first call warms up the kernels
                times.append(time.perf_counter() - start)
        total += statistics.median(times)
    return total


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = args.devices or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    pairs = planted_pairs(args.pairs, args.dim, seed=args.seed)
    train_idx, test_idx = split_indices(len(pairs), args.test_split, seed=args.seed, topk=(1,))
    rows = []
    for dev_name in devices:
        device = torch.device(dev_name)
        data = split_data(pairs, train_idx, test_idx, device)
        sizes = [len(left) for left, _ in data.train_sets]
        for model_name in args.models:
            for precision in args.precisions:
                if model_name == "dummy" and precision != args.precisions[0]:
                    continue  # nothing is trained: the precision changes nothing
                cfg = TrainConfig(epochs=args.epochs, temperature=args.temperature, topk=(1,), precision=precision)
                times, final = [], {}
                # An untimed epoch first: oneDNN picks its kernels and the allocator warms up.
                warm = build_model(model_name, pairs.in_dim).to(device)
                warm_cfg = TrainConfig(epochs=1, temperature=args.temperature, topk=(1,), precision=precision)
                train(warm, data, warm_cfg, make_optimizer(warm, warm_cfg))
                for _ in range(args.repeats):
                    torch.manual_seed(args.seed)
                    model = build_model(model_name, pairs.in_dim).to(device)
                    _sync(device)
                    start = time.perf_counter()
                    history = train(model, data, cfg, make_optimizer(model, cfg))
                    _sync(device)
                    times.append(time.perf_counter() - start)
                    final = history[-1]
                seconds = statistics.median(times)
                floor = None
                if model_name != "dummy":
                    per_epoch = product_floor(sizes, model.out_dim, DTYPES[precision], device, args.floor_reps)
                    floor = per_epoch * args.epochs
                row = {
                    "device": dev_name, "model": model_name, "precision": precision if model_name != "dummy" else "-",
                    "seconds": seconds, "seconds_all": times, "s_per_epoch": seconds / args.epochs,
                    "floor_s": floor, "ratio": seconds / floor if floor else None,
                    "floor_gflops": (sum(6 * n * n * model.out_dim for n in sizes) / (floor / args.epochs) / 1e9) if floor else None,
                    "test_top1": final["Test/top 1"], "train_loss": final["Train/Loss"],
                }
                rows.append(row)
                print(f"{dev_name} {model_name} {row['precision']}: {seconds:.1f} s, floor "
                      f"{'-' if floor is None else f'{floor:.1f} s'}, test top-1 {100 * row['test_top1']:.2f}%",
                      file=sys.stderr, flush=True)
    columns = [("device", "device", ""), ("model", "model", ""), ("precision", "precision", ""),
               ("seconds", "run s", ".1f"), ("s_per_epoch", "s/epoch", ".3f"), ("floor_s", "floor s", ".1f"),
               ("ratio", "run/floor", ".2f"), ("floor_gflops", "floor GFLOP/s", ".0f"), ("test_top1", "test top-1", ".4f")]
    print(f"{args.pairs} pairs x {args.dim}-d (+ flipped copies), test split {args.test_split}, {args.epochs} epochs, "
          f"t={args.temperature}, median of {args.repeats}")
    print(benchlib.table(rows, columns))
    path = benchlib.save_results("train", {"args": vars(args), "machine": benchlib.machine(), "rows": rows})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
