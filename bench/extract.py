"""Extraction throughput, end to end versus the forward pass alone, by precision and memory format.

For each precision (fp32, bf16 autocast) and memory format (NCHW, channels_last)
this measures, on the real RN50x4 architecture with random weights (no network):

* forward-only: `model.visual(x)` on pre-made tensors, at the pipeline's batch;
* pipeline: `featuresExtractor.pipeline.extract` with processor `adapt` on
  generated TLL-like pairs (200x250 JPEG, `featuresExtractor.drawn_images`): decode,
  preprocess, forward with the taps, pooling, chunk writes and the final files.
  "e2e" is images / wall time of one `extract()` call, fixed costs included (the
  probe forward, setup, final files: large for a few images, nothing for TLL's
  24,064); "steady" is the loop alone, timed from the model's side: images over
  the time from the end of the first batch's forward to the end of the last;
* efficiency = pipeline images/s / forward-only images/s (target >= 0.9), e2e and
  steady; "in-model" is the share of the steady loop's wall time spent inside
  `model.visual` (pooling hooks included), measured within one run, so it is the
  least sensitive to other load on the machine;
* peak RSS of the process for each configuration (workers counted separately);
* how far bf16 features are from fp32 ones on the same images: minimum cosine and
  maximum absolute difference over the 5440-d `features.npy` vectors.

Configurations, and forward-only and pipeline runs within each, are interleaved in
every repeat so that load from other processes hits them alike; medians over
repeats are reported. A table is
printed and the numbers go to bench/results/extract-TIMESTAMP.json.

`--compare MODEL ...` measures the forward pass alone for several backbones instead (random
weights, channels_last, fp32 and bf16, at each model's own input size from its transform),
interleaved over repeats so load hits them alike, and reports each model's images/s and its
ratio to the first one:

    python bench/extract.py --compare clip_rn50x4 resnet50 efficientnet_b0 ViT --repeats 3

Usage:
    python bench/extract.py                                   # quick: about 2 minutes on 2 cores
    python bench/extract.py --pairs 12 --repeats 3            # the README figures (~10 min)
    python bench/extract.py --precisions bf16 --formats cl --device cuda --batch 256 --pairs 1024
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import benchlib  # bench/ is the script folder; this also puts the repo root on sys.path

import numpy as np
import torch

from featuresExtractor.backbones import load_backbone, resolve_spec
from featuresExtractor.extractor import CPU_SLICE
from featuresExtractor.pipeline import ExtractConfig, extract
from featuresExtractor.drawn_images import make_pairs
from toolkit.utils import UserError
from toolkit.cli import run_cli

FORMATS = {"nchw": False, "cl": True}
AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/extract.py", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--pairs", type=int, default=8, help="generated pairs (2 images each) per pipeline run")
    p.add_argument("--batch", type=int, default=8, help="images per forward pass (even; the CPU caps it at %d)" % CPU_SLICE)
    p.add_argument("--repeats", type=int, default=1, help="timed repeats per configuration (medians are reported)")
    p.add_argument("--precisions", nargs="+", choices=sorted(AUTOCAST), default=["fp32", "bf16"])
    p.add_argument("--formats", nargs="+", choices=sorted(FORMATS), default=["nchw", "cl"],
                   help="memory formats: nchw (contiguous) and cl (channels_last)")
    p.add_argument("--workers", type=int, default=max(1, min(8, (os.cpu_count() or 2) - 1)),
                   help="DataLoader decode workers (extract.py's default)")
    p.add_argument("--device", default="cpu", help="torch device")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--model", default="clip_rn50x4", help="registry name; random weights are used")
    p.add_argument("--work-dir", default=None, help="where images and outputs go (default: a temporary folder)")
    p.add_argument("--compare", nargs="+", default=None, metavar="MODEL",
                   help="forward-only images/s of these backbones (random weights), relative to the first")
    return p.parse_args(argv)


def compare(args: argparse.Namespace, device: torch.device) -> list[dict]:
    """Forward-only images/s per (model, precision), channels_last, models interleaved in every repeat."""
    gen = torch.Generator().manual_seed(0)
    backbones, inputs = {}, {}
    for name in args.compare:
        backbones[name] = load_backbone(resolve_spec(name, pretrained="none"), device=device)
        backbones[name].visual.to(memory_format=torch.channels_last)
        inputs[name] = torch.randn(args.batch, *backbone_shape(backbones[name]), generator=gen).to(device) \
            .contiguous(memory_format=torch.channels_last)
        for precision in args.precisions:  # warm-up: oneDNN builds its kernels on the first call
            forward_only(backbones[name].visual, inputs[name], 1, precision, device)
    times: dict = {(n, p): [] for n in args.compare for p in args.precisions}
    for r in range(args.repeats):
        for name in args.compare:
            for precision in args.precisions:
                print(f"... repeat {r + 1}/{args.repeats}: {name} {precision}", file=sys.stderr)
                times[(name, precision)].append(forward_only(backbones[name].visual, inputs[name], 2, precision,
                                                             device))
    rows = []
    for (name, precision), ts in times.items():
        rate = benchlib.median(2 * args.batch / t for t in ts)
        base = benchlib.median(2 * args.batch / t for t in times[(args.compare[0], precision)])
        fp32 = times.get((name, "fp32"))
        rows.append({"model": name, "input": "x".join(map(str, inputs[name].shape[2:])), "precision": precision,
                     "forward_img_s": rate, "vs_first": rate / base,
                     "vs_fp32": rate / benchlib.median(2 * args.batch / t for t in fp32) if fp32 else None,
                     "raw_s": ts})
    return rows


def _check(args: argparse.Namespace, device: torch.device) -> None:
    if args.pairs * 2 < 2 * args.batch or args.repeats < 1:
        raise UserError(f"--pairs must give at least two batches ({args.batch} pairs for --batch {args.batch}) for "
                        f"the steady-state figures, and --repeats must be at least 1")
    if args.batch < 2 or args.batch % 2:
        raise UserError(f"--batch must be even and at least 2: the pipeline runs whole pairs (got {args.batch})")
    if device.type == "cpu" and args.batch > CPU_SLICE:
        raise UserError(f"--batch {args.batch} is above the pipeline's CPU slice of {CPU_SLICE} images, so the "
                        f"forward-only baseline would not run the same batch; use --batch <= {CPU_SLICE}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda asked for but CUDA is not available")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def forward_only(visual: torch.nn.Module, x: torch.Tensor, n_batches: int, precision: str,
                 device: torch.device) -> float:
    """Seconds for `n_batches` forward passes of the pre-made batch `x` (already on device, in format)."""
    dtype = AUTOCAST[precision]
    with torch.inference_mode(), torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        _sync(device)
        start = time.perf_counter()
        for _ in range(n_batches):
            visual(x)
        _sync(device)
    return time.perf_counter() - start


class ForwardClock:
    """Records when each call of `module` starts and ends, and its batch size, while active.

    Inside `extract()` this shows the loop from the model's side: the gaps between
    forward calls are the pipeline's own overhead (waiting for decoded images,
    copies, pooling outside the model, chunk writes). Both come from the same run,
    so load from other processes does not skew the ratio the way it skews two
    separately timed runs.
    """

    def __init__(self, module: torch.nn.Module, device: torch.device):
        self.module, self.device = module, device
        self.calls: list[tuple[float, float, int]] = []
        self._start = 0.0
        self._handles: list = []

    def _pre(self, _module, inputs):
        _sync(self.device)
        self._start = time.perf_counter()
        self._batch = int(inputs[0].shape[0])

    def _post(self, _module, _inputs, _output):
        _sync(self.device)
        self.calls.append((self._start, time.perf_counter(), self._batch))

    def __enter__(self) -> "ForwardClock":
        self._handles = [self.module.register_forward_pre_hook(self._pre), self.module.register_forward_hook(self._post)]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()

    def steady(self) -> tuple[float, float]:
        """(images/s, share of wall time spent in the model) from the end of the first batch to the last.

        The first call is extract()'s probe and the first batch includes the loader's
        start-up, so both are left out, as are setup and the final processing.
        """
        batches = self.calls[1:]
        if len(batches) < 2:
            return float("nan"), float("nan")
        span = batches[-1][1] - batches[0][1]
        images = sum(b for _, _, b in batches[1:])
        busy = sum(end - start for start, end, _ in batches[1:])
        return images / span, busy / span


def pipeline_run(backbone, dataset: Path, save_to: Path, precision: str, channels_last: bool,
                 args: argparse.Namespace) -> tuple[float, Path, ForwardClock]:
    """Seconds for one whole `extract()` call; returns it with the output folder and the forward clock."""
    cfg = ExtractConfig(dataset=str(dataset), save_to=str(save_to), processor=("adapt",), precision=precision,
                        batch_size=args.batch, workers=args.workers, device=args.device,
                        channels_last=channels_last, progress=False)
    device = torch.device(args.device)
    with ForwardClock(backbone.visual, device) as clock:
        _sync(device)
        start = time.perf_counter()
        report = extract(cfg, backbone)
        _sync(device)
        elapsed = time.perf_counter() - start
    if report.n_kept != report.n_items:
        raise RuntimeError(f"pipeline skipped items: {report.skipped}")
    return elapsed, report.out_dir, clock


def load_vectors(out_dir: Path) -> np.ndarray:
    """All 5440-d vectors of `features.npy` (left then right rows), float64."""
    rec = np.load(out_dir / "features.npy", allow_pickle=False)
    return np.concatenate([rec["left"], rec["right"]]).astype(np.float64)


def distance(a: np.ndarray, b: np.ndarray) -> dict:
    """Minimum row cosine and maximum absolute difference between two vector sets."""
    cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)
    return {"min_cosine": float(cos.min()), "max_abs_diff": float(np.abs(a - b).max()), "rows": len(a)}


def _set_format(backbone, fmt: str, x: torch.Tensor) -> torch.Tensor:
    # extract() switches the model to channels_last itself but never back: set it both ways here.
    memory_format = torch.channels_last if FORMATS[fmt] else torch.contiguous_format
    backbone.visual.to(memory_format=memory_format)
    return x.contiguous(memory_format=memory_format)


def measure(backbone, configs: Sequence[tuple[str, str]], data: Path, one_pair: Path, work: Path,
            args: argparse.Namespace) -> tuple[list[dict], dict]:
    """Measure every (precision, memory format); return one row each and the features of their first runs.

    Configurations are interleaved within each repeat, and forward-only and pipeline
    runs within each configuration, so that load from other processes spreads over
    all of them instead of favouring whichever ran in a quiet minute.
    """
    device = torch.device(args.device)
    n_images = 2 * args.pairs
    n_batches = math.ceil(n_images / args.batch)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, *backbone_shape(backbone), generator=gen).to(device)
    for precision, fmt in configs:  # warm-up: the first call at each shape builds the oneDNN/cuDNN kernels
        print(f"... warm-up {precision} {fmt}", file=sys.stderr)
        forward_only(backbone.visual, _set_format(backbone, fmt, x), 1, precision, device)
        pipeline_run(backbone, one_pair, work / f"warm-{precision}-{fmt}", precision, FORMATS[fmt], args)
    raw = {c: {"forward_s": [], "pipeline_s": [], "steady_img_s": [], "model_share": [], "peak_rss": []}
           for c in configs}
    features: dict = {}
    for r in range(args.repeats):
        for precision, fmt in configs:
            print(f"... repeat {r + 1}/{args.repeats}: {precision} {fmt}", file=sys.stderr)
            m = raw[(precision, fmt)]
            benchlib.reset_peak_rss()
            m["forward_s"].append(forward_only(backbone.visual, _set_format(backbone, fmt, x), n_batches,
                                               precision, device))
            t, out, clock = pipeline_run(backbone, data, work / f"run-{precision}-{fmt}-{r}", precision,
                                         FORMATS[fmt], args)
            m["peak_rss"].append(benchlib.peak_rss_bytes())
            m["pipeline_s"].append(t)
            rate, busy = clock.steady()
            m["steady_img_s"].append(rate)
            m["model_share"].append(busy)
            if (precision, fmt) not in features:
                features[(precision, fmt)] = load_vectors(out)
            shutil.rmtree(out.parent)
    rows = []
    for (precision, fmt), m in raw.items():
        fwd_rate = [n_batches * args.batch / t for t in m["forward_s"]]
        e2e_rate = [n_images / t for t in m["pipeline_s"]]
        rows.append({
            "precision": precision, "format": fmt, "batch": args.batch, "images": n_images,
            "forward_img_s": benchlib.median(fwd_rate),
            "pipeline_img_s": benchlib.median(e2e_rate),
            "steady_img_s": benchlib.median(m["steady_img_s"]),
            # Each ratio pairs a forward-only and a pipeline run from the same repeat.
            "efficiency": benchlib.median(e / f for e, f in zip(e2e_rate, fwd_rate)),
            "efficiency_steady": benchlib.median(s / f for s, f in zip(m["steady_img_s"], fwd_rate)),
            "model_share": benchlib.median(m["model_share"]),
            "peak_rss_mib": max(m["peak_rss"]) / 2**20,
            "raw": {**m, "forward_batches": n_batches},
        })
    return rows, features


def backbone_shape(backbone) -> tuple[int, ...]:
    """The preprocessed image shape (3, H, W) the backbone's transform produces."""
    from PIL import Image

    return tuple(backbone.transform(Image.new("RGB", (64, 64))).shape)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    _check(args, device)
    if args.threads:
        torch.set_num_threads(args.threads)
    info = benchlib.machine()
    if args.compare:
        rows = compare(args, device)
        print()
        print(benchlib.table(rows, [("model", "model", "s"), ("input", "input", "s"), ("precision", "prec", "s"),
                                    ("forward_img_s", "fwd img/s", ".2f"), ("vs_first", f"x {args.compare[0]}", ".2f"),
                                    ("vs_fp32", "x fp32", ".2f")]))
        print(f"\nforward only, random weights, channels_last, batch {args.batch}, {args.repeats} repeat(s) of 2 "
              f"batches, device {args.device} ({info['cpu']}), {torch.get_num_threads()} threads; load avg {os.getloadavg()[0]:.2f} "
              f"(start {info['load_avg_start'][0]:.2f}); medians")
        path = benchlib.save_results("extract-compare", {"args": vars(args), "machine": info, "rows": rows})
        print(f"wrote {path}")
        return 0
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="bench-extract-"))
    try:
        data, one_pair = work / "pairs", work / "one_pair"
        t0 = time.perf_counter()
        names = make_pairs(data, n_pairs=args.pairs, seed=0, size=(200, 250), fmt="jpg")
        for side in ("left", "right"):  # the 1-pair set shares the first pair's files
            (one_pair / side).mkdir(parents=True, exist_ok=True)
            shutil.copy2(data / side / names[0], one_pair / side / names[0])
        print(f"generated {args.pairs} pairs (200x250 JPEG) in {time.perf_counter() - t0:.1f} s under {work}",
              file=sys.stderr)

        torch.manual_seed(0)  # the same random weights for every configuration
        backbone = load_backbone(resolve_spec(args.model, pretrained="none"), device=device)
        configs = [(precision, fmt) for precision in args.precisions for fmt in args.formats]
        rows, feats = measure(backbone, configs, data, one_pair, work, args)
        for row in rows:
            base = next((r for r in rows if r["precision"] == "fp32" and r["format"] == row["format"]), None)
            row["speedup_vs_fp32"] = row["forward_img_s"] / base["forward_img_s"] if base else None
            if base is not None and row is not base:
                row.update(distance(feats[("fp32", row["format"])], feats[(row["precision"], row["format"])]))
            elif row["format"] == "cl" and ("fp32", "nchw") in feats and row["precision"] == "fp32":
                row.update(distance(feats[("fp32", "nchw")], feats[("fp32", "cl")]))  # layout alone
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)

    print()
    print(benchlib.table(rows, [
        ("precision", "prec", "s"), ("format", "format", "s"), ("batch", "batch", "d"),
        ("forward_img_s", "fwd img/s", ".2f"), ("pipeline_img_s", "e2e img/s", ".2f"),
        ("steady_img_s", "steady img/s", ".2f"), ("efficiency", "eff e2e", ".3f"),
        ("efficiency_steady", "eff steady", ".3f"), ("model_share", "in-model", ".3f"),
        ("speedup_vs_fp32", "x fp32", ".2f"), ("min_cosine", "min cos", ".6f"),
        ("max_abs_diff", "max |d|", ".2e"), ("peak_rss_mib", "peak RSS MiB", ".0f"),
    ]))
    print(f"\nmodel {args.model} (random weights), {2 * args.pairs} images per run, {args.repeats} repeat(s), "
          f"workers {args.workers}, device {args.device}; worker peak RSS "
          f"{benchlib.children_peak_rss_bytes() / 2**20:.0f} MiB; load avg {os.getloadavg()[0]:.2f} "
          f"(start {info['load_avg_start'][0]:.2f}); medians. min cos / max |d|: against fp32 with the same format "
          f"(fp32 cl row: against fp32 nchw)")
    path = benchlib.save_results("extract", {"args": vars(args), "machine": info, "rows": rows})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
