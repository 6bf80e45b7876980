"""Extraction throughput, end to end versus the forward pass alone, by precision and memory format.

For each precision (fp32, bf16 autocast) and memory format (NCHW, channels_last)
this measures, on the real RN50x4 architecture with random weights (no network):

* forward-only: `model.visual(x)` on pre-made tensors, at the pipeline's batch;
* pipeline: `featuresExtractor.pipeline.extract` with processor `adapt` on
  generated TLL-like pairs (200x250 JPEG, `synthetic.drawn_images`): decode,
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

`--pca-fit` times the PCA fit alone instead (`featuresExtractor.pca.StreamingPCA`, fed random
float32 vectors in the merge pass's blocks of about 8 MiB; generating them is not timed), at
TLL size (24,064 x 5,440 -> 256) and at 160 x 5,440 -> 8 by default, and reports the median
seconds, the solver the fit chose and the peak RSS; `--device cuda` fits on the GPU:

    python bench/extract.py --pca-fit --repeats 3
    python bench/extract.py --pca-fit 2000x5440:256 --repeats 3

`--whole-process` times the whole of extract.py instead, as a user runs it, fixed costs included
(interpreter start, imports, model build, shape probe, the loop, the PCA fit, the files): a fresh
`python extract.py` process on 40 generated pairs with flips (160 images), RN50x4 random init,
`--processor adapt-pca 8 -b 16`, the recipe compared with the paper's extractor, for each of
`--precisions` and `--engines` (interleaved in every repeat). The engines' graph cache is a fresh
folder (XDG_CACHE_HOME) for this call: the first run of an engine that builds a graph is reported
apart ("first s"), the median is over the later, warm runs:

    python bench/extract.py --whole-process --precisions fp32 bf16 --repeats 3
    python bench/extract.py --whole-process --precisions fp32 --engines torch folded onnxruntime --repeats 3

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

import benchlib  # bench/ is the script's folder, so it is on sys.path; the packages come from the install

import numpy as np
import torch

from featuresExtractor.backbones import load_backbone, resolve_spec
from featuresExtractor.extractor import CPU_SLICE
from featuresExtractor.pipeline import ExtractConfig, extract
from synthetic.drawn_images import make_pairs
from toolkit.utils import UserError
from toolkit.cli import run_cli

FORMATS = {"nchw": False, "cl": True}
PCA_SIZES = ("24064x5440:256", "160x5440:8")  # TLL with flips, and 40 pairs with flips
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
    p.add_argument("--pca-fit", nargs="*", default=None, metavar="NxD:K",
                   help="time the PCA fit alone on random vectors: N vectors of D dims to K components "
                        f"(default, with no value: {' '.join(PCA_SIZES)})")
    p.add_argument("--pca-torch", action="store_true",
                   help="--pca-fit with the torch code (torch.linalg.eigh) also on the CPU, where extract.py uses "
                        "numpy/scipy (syrk, LAPACK's subset eigensolver)")
    p.add_argument("--whole-process", action="store_true",
                   help="time whole extract.py processes (40 pairs with flips, RN50x4 random init, adapt-pca 8, "
                        "batch 16; each of --precisions and --engines) instead")
    p.add_argument("--engines", nargs="+", default=["auto"], choices=("auto", "torch", "folded", "onnxruntime"),
                   help="--whole-process: extract.py's --engine values to time")
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


WHOLE_PROCESS_PAIRS = 40
WHOLE_PROCESS_FLAGS = ["--data-aug", "-b", "16", "--processor", "adapt-pca", "8", "--model", "clip_rn50x4",
                       "--pretrained", "none", "--no-progress"]


def whole_process(args: argparse.Namespace, work: Path) -> list[dict]:
    """Wall and CPU seconds of whole `python extract.py` processes on 40 pairs with flips, one row per
    precision and engine: the first run (cold graph cache) apart, medians over the later runs."""
    import resource
    import subprocess

    data = work / "pairs"
    make_pairs(data, n_pairs=WHOLE_PROCESS_PAIRS, seed=0, size=(200, 250), fmt="jpg")
    script = Path(__file__).resolve().parent.parent / "extract.py"
    env = dict(os.environ, XDG_CACHE_HOME=str(work / "cache"))  # a cold graph cache for this call
    configs = [(p, e) for p in args.precisions for e in args.engines]
    runs: dict = {c: {"wall_s": [], "cpu_s": [], "load_avg": [], "said": ""} for c in configs}
    for r in range(args.repeats + 1):  # run 0 is each configuration's first (cold) run
        for precision, engine in configs:
            flags = [*WHOLE_PROCESS_FLAGS, "--precision", precision, "--engine", engine]
            print(f"... run {r}/{args.repeats}: extract.py {' '.join(flags)}", file=sys.stderr)
            out = work / f"out-{r}"
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            start = time.perf_counter()
            done = subprocess.run([sys.executable, str(script), "-d", str(data), "-s", str(out), "--workers",
                                   str(args.workers), *flags], check=True, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True, env=env)
            row = runs[(precision, engine)]
            row["wall_s"].append(time.perf_counter() - start)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            row["cpu_s"].append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
            row["load_avg"].append(os.getloadavg()[0])
            row["said"] = row["said"] or " ".join(line.split(": ", 1)[-1] for line in done.stderr.splitlines()
                                                  if "auto ->" in line)
            shutil.rmtree(out)
    images = WHOLE_PROCESS_PAIRS * 2 * 2
    rows = []
    for (precision, engine), row in runs.items():
        wall = benchlib.median(row["wall_s"][1:])
        rows.append({"precision": precision, "engine": engine, "images": images, "first_s": row["wall_s"][0],
                     "wall_s": wall, "img_s": images / wall, "cpu_s": benchlib.median(row["cpu_s"][1:]),
                     "said": row["said"], "raw": row})
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


def _pca_size(text: str) -> tuple[int, int, int]:
    try:
        nd, k = text.split(":")
        n, d = nd.lower().split("x")
        size = int(n), int(d), int(k)
    except ValueError:
        raise UserError(f"--pca-fit {text!r}: write each size as NxD:K, e.g. 24064x5440:256") from None
    if not 0 < size[2] <= min(size[0], size[1]) or size[0] < 2:
        raise UserError(f"--pca-fit {text!r}: K must be between 1 and min(N, D), and N at least 2")
    return size


def pca_fit_once(n: int, d: int, k: int, device: torch.device, seed: int = 0,
                 torch_code: bool = False) -> tuple[float, str, int]:
    """Seconds for feeding n random d-dim vectors to a `StreamingPCA` in merge-sized blocks and fitting k
    components (generating the vectors not counted); the solver it chose; the peak RSS during it.

    On the CPU the fit runs numpy/scipy code, as extract.py's does, unless `torch_code`."""
    from featuresExtractor.merge import BLOCK_BYTES
    from featuresExtractor.pca import StreamingPCA

    rng = np.random.default_rng(seed)
    scales = (0.999 ** np.arange(d)).astype(np.float32)  # decaying variances, as features have
    block = max(1, BLOCK_BYTES // (4 * d))
    benchlib.reset_peak_rss()
    fit = StreamingPCA(d, k, device=None if device.type == "cpu" and not torch_code else device)
    elapsed = 0.0
    for start in range(0, n, block):
        x = rng.standard_normal((min(block, n - start), d), dtype=np.float32) * scales
        t0 = time.perf_counter()
        fit.update(x)
        elapsed += time.perf_counter() - t0
    t0 = time.perf_counter()
    pca = fit.fit()
    _sync(device)
    return elapsed + time.perf_counter() - t0, pca.solver_, benchlib.peak_rss_bytes()


def pca_fit_rows(args: argparse.Namespace, device: torch.device) -> list[dict]:
    """One row per --pca-fit size: median fit seconds over --repeats (sizes interleaved), solver, peak RSS."""
    sizes = [_pca_size(t) for t in (args.pca_fit or PCA_SIZES)]
    import scipy.linalg, sklearn.decomposition  # noqa: F401  imported by the fit: not timed (extract.py imports them once)

    raw: dict = {size: [] for size in sizes}
    for r in range(args.repeats):
        for n, d, k in sizes:
            print(f"... repeat {r + 1}/{args.repeats}: PCA fit {n} x {d} -> {k}", file=sys.stderr)
            raw[(n, d, k)].append(pca_fit_once(n, d, k, device, seed=r, torch_code=args.pca_torch))
    return [{"vectors": n, "dim": d, "components": k, "fit_s": benchlib.median(t for t, _, _ in runs),
             "solver": runs[0][1], "peak_rss_mib": max(m for _, _, m in runs) / 2**20, "raw_s": [t for t, _, _ in runs]}
            for (n, d, k), runs in raw.items()]


def report_pca_fit(args: argparse.Namespace, device: torch.device, info: dict) -> int:
    """--pca-fit: measure, print the table, save the results."""
    rows = pca_fit_rows(args, device)
    return print_and_save("extract-pca-fit", rows, [
        ("vectors", "vectors", "d"), ("dim", "dim", "d"), ("components", "k", "d"), ("fit_s", "fit s", ".2f"),
        ("peak_rss_mib", "peak RSS MiB", ".0f"), ("solver", "solver", "s")],
        f"StreamingPCA fit (update in merge-sized blocks + fit), random vectors, {args.repeats} repeat(s), "
        f"device {args.device} ({info['cpu']}), {torch.get_num_threads()} threads", args, info)


def print_and_save(name: str, rows: list[dict], columns: Sequence[tuple[str, str, str]], what: str,
                   args: argparse.Namespace, info: dict) -> int:
    """Print `rows` as a table with a line saying `what` was measured under which load; save them as `name`."""
    print()
    print(benchlib.table(rows, columns))
    print(f"\n{what}; load avg {os.getloadavg()[0]:.2f} (start {info['load_avg_start'][0]:.2f}); medians")
    return benchlib.finish(name, args, info, rows=rows)


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
    if args.pca_fit is not None:
        return report_pca_fit(args, device, info)
    if args.compare:
        return print_and_save("extract-compare", compare(args, device), [
            ("model", "model", "s"), ("input", "input", "s"), ("precision", "prec", "s"),
            ("forward_img_s", "fwd img/s", ".2f"), ("vs_first", f"x {args.compare[0]}", ".2f"),
            ("vs_fp32", "x fp32", ".2f")],
            f"forward only, random weights, channels_last, batch {args.batch}, {args.repeats} repeat(s) of 2 "
            f"batches, device {args.device} ({info['cpu']}), {torch.get_num_threads()} threads", args, info)
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="bench-extract-"))
    if args.whole_process:
        try:
            rows = whole_process(args, work)
        finally:
            if not args.work_dir:
                shutil.rmtree(work, ignore_errors=True)
        print()
        print(benchlib.table(rows, [("precision", "precision", "s"), ("engine", "engine", "s"), ("images", "images", "d"),
                                    ("first_s", "first s", ".1f"), ("wall_s", "wall s", ".1f"), ("img_s", "img/s", ".2f"),
                                    ("cpu_s", "CPU s", ".1f"), ("said", "auto chose", "s")]))
        print(f"\nwhole process, fixed costs included: {WHOLE_PROCESS_PAIRS} pairs with flips, "
              f"{' '.join(WHOLE_PROCESS_FLAGS)}, workers {args.workers}; first run (cold graph cache) apart, medians "
              f"of {args.repeats} later run(s); {info['cpu']}; load avg {os.getloadavg()[0]:.2f} "
              f"(start {info['load_avg_start'][0]:.2f})")
        return benchlib.finish("extract-whole", args, info, rows=rows)
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
    return benchlib.finish("extract", args, info, rows=rows)


if __name__ == "__main__":
    sys.exit(run_cli(main))
