"""Extraction memory and time as the number of images grows (1k, 4k, 16k by default).

Runs `featuresExtractor.pipeline.extract` on flat folders of N generated 200x250
JPEGs with the tiny config (`tiny_rn`, random weights), so the loop, the chunk
store and the final processing are what is measured, in minutes. Each N runs in a
fresh subprocess, so its peak RSS is its own; the peak is taken over `extract()`
only (imports and model loading excluded, reported as the baseline).

The pipeline pools each batch as it goes, so memory may grow only with the stored
vectors: the script fits peak RSS against N and reports the slope in bytes per
stored vector, next to the size of one stored vector (all output files' float32
values for one image). A slope of a few vector sizes means a few copies at the
end (merge, concatenation, records, PCA); a slope that grows with batch data or
image size would be a leak.

To keep generation short, `--unique` distinct images are drawn and the rest of
each folder are hard links to them (decoding costs the same).

With `--ranks K`, it measures throughput instead: the same extraction of `--sizes N` images
as one `extract.py` process and as `torchrun --nproc_per_node K extract.py` (gloo), wall clock
of each whole command (start-up, extraction, rank 0's merge), and their ratio.

Usage:
    python bench/scale.py                          # 1k, 4k, 16k: a few minutes on 2 cores
    python bench/scale.py --sizes 1000 4000 16000 64000
    python bench/scale.py --sizes 500 2000 --processor adapt
    python bench/scale.py --ranks 2 --sizes 2000   # 2 gloo ranks against 1 process
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import benchlib  # bench/ is the script's folder, so it is on sys.path; the packages come from the install

import numpy as np

from synthetic.drawn_images import make_images, name_of
from toolkit.utils import UserError
from toolkit.cli import run_cli

CHILD_MARK = "SCALE-RESULT "


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/scale.py", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--sizes", nargs="+", type=int, default=[1000, 4000, 16000], help="numbers of images")
    p.add_argument("--unique", type=int, default=1000, help="distinct generated images; the rest are hard links")
    p.add_argument("--processor", nargs="+", default=["adapt-pca", "256"], metavar="NAME [N]",
                   help="extract.py's -p (pooled processors only)")
    p.add_argument("--model", default="tiny_rn", help="registry name; random weights")
    p.add_argument("--batch", type=int, default=2048, help="extract.py's -b (the CPU runs slices of at most 32)")
    p.add_argument("--workers", type=int, default=max(1, min(8, (os.cpu_count() or 2) - 1)),
                   help="DataLoader decode workers (extract.py's default)")
    p.add_argument("--work-dir", default=None, help="where images and outputs go (default: a temporary folder)")
    p.add_argument("--ranks", type=int, default=None,
                   help="measure K torchrun ranks (gloo) against one process on --sizes N images instead")
    p.add_argument("--merge-only", action="store_true",
                   help="measure only the end of a run (chunk store -> outputs) on chunks of random vectors of "
                        "the model's dims, no images: the part whose memory could grow with N, at sizes the "
                        "whole pipeline would take too long for here")
    p.add_argument("--child", nargs=2, metavar=("DATASET", "SAVE_TO"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def child(args: argparse.Namespace) -> int:
    """Inside the fresh subprocess: load the model, run one extraction, print the measurements."""
    import torch

    from featuresExtractor.backbones import load_backbone, resolve_spec
    from featuresExtractor.pipeline import ExtractConfig, extract

    torch.manual_seed(0)
    backbone = load_backbone(resolve_spec(args.model, pretrained="none"))
    dataset, save_to = args.child
    if args.merge_only:
        return merge_child(args, backbone, int(dataset), Path(save_to))
    cfg = ExtractConfig(dataset=dataset, save_to=save_to, processor=tuple(args.processor), batch_size=args.batch,
                        workers=args.workers, progress=False)
    base = benchlib.rss_bytes()
    benchlib.reset_peak_rss()
    start = time.perf_counter()
    report = extract(cfg, backbone)
    elapsed = time.perf_counter() - start
    peak = benchlib.peak_rss_bytes()
    manifest = json.loads((report.out_dir / "manifest.json").read_text())
    # One stored vector: the float32 values of every features file for one image.
    dims = [o["dim"] for o in manifest["outputs"].values() if o["kind"] == "features"]
    result = {"n": report.n_kept, "seconds": elapsed, "base_rss": base, "peak_rss": peak,
              "workers_peak_rss": benchlib.children_peak_rss_bytes(), "vector_bytes": 4 * sum(dims), "dims": dims}
    print(CHILD_MARK + json.dumps(result))
    return 0


def merge_child(args: argparse.Namespace, backbone, n: int, folder: Path) -> int:
    """Fill a chunk store with n items of random pooled vectors (32 a chunk), then time and measure the merge."""
    from featuresExtractor.extractor import FeatureExtractor
    from featuresExtractor.merge import write_outputs
    from featuresExtractor.processor import parse_processor
    from featuresExtractor.store import ChunkStore

    info = FeatureExtractor(backbone, "fp32", True).info
    proc = parse_processor(args.processor)
    store = ChunkStore(folder / ".partial")
    store.start({"bench": True})
    rng = np.random.default_rng(0)
    for start in range(0, n, 32):
        idx = list(range(start, min(n, start + 32)))
        store.write(idx, {k: rng.normal(size=(len(idx), 1, 1, d)).astype(np.float32) for k, d in info.dims.items()}, [])
    names = [name_of(i, "jpg") for i in range(n)]
    base = benchlib.rss_bytes()
    benchlib.reset_peak_rss()
    start = time.perf_counter()
    outputs = write_outputs(proc, store.rows(), names, ("feature",), 1, info.embedding, info.dims, folder)
    elapsed = time.perf_counter() - start
    dims = [o["dim"] for o in outputs.values() if o["kind"] == "features"]
    print(CHILD_MARK + json.dumps({"n": n, "seconds": elapsed, "base_rss": base, "peak_rss": benchlib.peak_rss_bytes(),
                                   "workers_peak_rss": 0, "vector_bytes": 4 * sum(dims), "dims": dims}))
    return 0


def make_dataset(src: Path, names: list[str], folder: Path, n: int) -> None:
    """A flat folder of `n` images: links to the generated ones, cycling through them."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        target = folder / name_of(i, "jpg")
        try:
            os.link(src / names[i % len(names)], target)
        except OSError:  # file systems without hard links
            shutil.copyfile(src / names[i % len(names)], target)


def run_child(args: argparse.Namespace, dataset: Path, save_to: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", str(dataset), str(save_to), "--model", args.model,
           "--batch", str(args.batch), "--workers", str(args.workers), "--processor", *args.processor,
           *(["--merge-only"] if args.merge_only else [])]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(CHILD_MARK)]
    if proc.returncode == 2:  # the pipeline refused the input (UserError): pass its one line on
        raise UserError(f"N={dataset.name[1:]}: " + proc.stderr.strip().splitlines()[-1].split("error: ", 1)[-1])
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"child run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len(CHILD_MARK):])


def timed_command(cmd: list[str], **env: str) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=benchlib.ROOT, capture_output=True, text=True, check=False,
                          env={**os.environ, "PYTHONPATH": str(benchlib.ROOT), **env})
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start


def ranks_throughput(args: argparse.Namespace) -> int:
    """One process against K gloo ranks on the same images: wall clock of each whole command."""
    info = benchlib.machine()
    n = args.sizes[0]
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="bench-ranks-"))
    try:
        src = work / "src"
        names = make_images(src, min(args.unique, n), seed=0, size=(200, 250), fmt="jpg")
        make_dataset(src, names, work / "data", n)
        flags = ["-d", str(work / "data"), "-b", str(args.batch), "-p", *args.processor, "--model", args.model,
                 "--pretrained", "none", "--no-progress", "--workers", str(args.workers)]
        one = timed_command([sys.executable, "extract.py", *flags, "-s", str(work / "one")])
        # torchrun gives each rank OMP_NUM_THREADS=1; the same for one process separates the thread count.
        one_1t = timed_command([sys.executable, "extract.py", *flags, "-s", str(work / "one1t")], OMP_NUM_THREADS="1")
        many = timed_command([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                              str(args.ranks), "extract.py", *flags, "-s", str(work / "many")])
        same = all((work / "one" / args.model / f).read_bytes() == (work / "many" / args.model / f).read_bytes()
                   for f in ("features.npy",))
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    result = {"n": n, "ranks": args.ranks, "one_process_s": one, "one_process_1_thread_s": one_1t, "ranks_s": many,
              "ratio": one / many, "ratio_vs_1_thread": one_1t / many, "same_features_bytes": same}
    print(f"N={n} images, model {args.model}: 1 process {one:.1f} s ({n / one:.1f} img/s), {args.ranks} gloo ranks "
          f"{many:.1f} s ({n / many:.1f} img/s): throughput ratio {one / many:.2f}; 1 process with OMP_NUM_THREADS=1 "
          f"{one_1t:.1f} s, ratio {one_1t / many:.2f}; features.npy identical: {same}; "
          f"workers {args.workers} per process; load avg {os.getloadavg()[0]:.2f} (start {info['load_avg_start'][0]:.2f})")
    return benchlib.finish("ranks", args, info, result=result)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return child(args)
    if args.ranks is not None:
        if args.ranks < 1 or len(args.sizes) != 1 or args.sizes[0] < args.ranks:
            raise UserError("--ranks K needs K >= 1 and one --sizes N with N >= K")
        return ranks_throughput(args)
    if min(args.sizes) < 1 or args.unique < 1:
        raise UserError("--sizes and --unique must be positive")
    if len(set(args.sizes)) < 2:
        raise UserError("give at least two different --sizes to fit memory against N")
    info = benchlib.machine()
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="bench-scale-"))
    rows = []
    try:
        t0 = time.perf_counter()
        src = work / "src"
        names = [] if args.merge_only else make_images(src, min(args.unique, max(args.sizes)), seed=0,
                                                       size=(200, 250), fmt="jpg")
        print(f"generated {len(names)} images in {time.perf_counter() - t0:.1f} s under {work}", file=sys.stderr)
        for n in sorted(args.sizes):
            dataset = work / f"n{n}"
            if args.merge_only:
                dataset = Path(str(n))  # the child makes its own chunks
            else:
                make_dataset(src, names, dataset, n)
            print(f"... N={n}", file=sys.stderr)
            r = run_child(args, dataset, work / f"out{n}")
            if not args.merge_only:
                shutil.rmtree(dataset)
            shutil.rmtree(work / f"out{n}")
            r["img_s"] = r["n"] / r["seconds"]
            r["growth"] = r["peak_rss"] - r["base_rss"]
            r["growth_per_vector"] = r["growth"] / r["n"]
            rows.append(r)
            # Each size as it finishes, so a run stopped before the largest size still reports the others.
            print(f"    N={r['n']}: {r['seconds']:.1f} s, {r['img_s']:.0f} img/s, peak RSS {r['peak_rss'] / 2**20:.0f} MiB "
                  f"(base {r['base_rss'] / 2**20:.0f}, growth {r['growth'] / 2**20:.1f} MiB); load avg "
                  f"{os.getloadavg()[0]:.2f}", file=sys.stderr, flush=True)
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)

    n = np.array([r["n"] for r in rows], dtype=np.float64)
    peak = np.array([r["peak_rss"] for r in rows], dtype=np.float64)
    slope, intercept = np.polyfit(n, peak, 1)
    vector_bytes = rows[0]["vector_bytes"]
    secs = np.array([r["seconds"] for r in rows])
    time_slope, time_fixed = np.polyfit(n, secs, 1)
    mib = 2**20
    print()
    print(benchlib.table([{**r, "seconds": r["seconds"], "base": r["base_rss"] / mib, "peak": r["peak_rss"] / mib,
                           "growth_mib": r["growth"] / mib, "workers": r["workers_peak_rss"] / mib} for r in rows], [
        ("n", "N images", "d"), ("seconds", "time s", ".1f"), ("img_s", "img/s", ".0f"),
        ("base", "base RSS MiB", ".0f"), ("peak", "peak RSS MiB", ".0f"), ("growth_mib", "growth MiB", ".1f"),
        ("growth_per_vector", "growth B/vector", ".0f"), ("workers", "worker RSS MiB", ".0f"),
    ]))
    summary = {"rss_slope_bytes_per_vector": slope, "rss_intercept_mib": intercept / mib,
               "vector_bytes": vector_bytes, "copies": slope / vector_bytes,
               "seconds_per_1k_images": 1000 * time_slope, "fixed_seconds": time_fixed}
    print(f"\npeak RSS grows {slope:.0f} B per stored vector (fit over N), one stored vector is {vector_bytes} B "
          f"(dims {rows[0]['dims']}, float32): {slope / vector_bytes:.1f} vector copies at the peak. Time: "
          f"{1000 * time_slope:.2f} s per 1k images + {time_fixed:.1f} s fixed. model {args.model}, processor "
          f"{' '.join(args.processor)}, workers {args.workers}; load avg {os.getloadavg()[0]:.2f} "
          f"(start {info['load_avg_start'][0]:.2f})")
    return benchlib.finish("scale", args, info, rows=rows, summary=summary)


if __name__ == "__main__":
    sys.exit(run_cli(main))
