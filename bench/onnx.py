"""ONNX export against the torch path: images/s on this CPU, and start-up time of from_onnx against from_run.

For each model (random weights, no network) this makes a small run (drawn pairs, extract.py with
adapt-pca N, two epochs of train.py), exports it (`similarity.py --run RUN export --dynamic-batch`)
and measures, interleaved over repeats so load from other processes hits them alike (medians):

* graph images/s on preprocessed batches (`--batch` images, the model's own input size):
  onnxruntime (fp32, its default threads) against the torch path as `VisualSimilarity` runs it
  (`retrieval.export.EmbeddingGraph`: taps, pooling, normalisation, PCA, adaptation) in fp32 and
  in bf16 autocast, channels_last, `torch.get_num_threads()` threads;
* embed images/s from decoded images (PIL) to embeddings: `VisualSimilarity.embed` of
  `from_onnx` (Pillow/numpy preprocessing + onnxruntime) against `from_run`'s (fp32);
* start-up: a fresh Python process importing `retrieval.visual_similarity` and opening the run
  (`from_run`) or the export (`from_onnx`), wall time to ready, and the export's own time and size.

A table is printed with the CPU and the load average; `--save` writes bench/results/onnx-TIMESTAMP.json.

Usage:
    python bench/onnx.py                                    # RN50x4 and resnet50 (~10 min on 2 quiet cores)
    python bench/onnx.py --models resnet50 --repeats 1 --batch 4     # a quick look
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import benchlib

from toolkit.cli import run_cli

ROOT = benchlib.ROOT


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/onnx.py", description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--models", nargs="+", default=["clip_rn50x4", "resnet50"], help="backbones (random weights)")
    p.add_argument("--batch", type=int, default=8, help="images per forward (default 8)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats of each configuration (default 3)")
    p.add_argument("--pairs", type=int, default=8, help="drawn pairs of the small run (default 8)")
    p.add_argument("--pca", type=int, default=16, help="adapt-pca N of the small run (default 16)")
    p.add_argument("--save", action="store_true", help="write bench/results/onnx-TIMESTAMP.json")
    return p.parse_args(argv)


STARTUP = """import sys, time
t = time.perf_counter()
from retrieval.visual_similarity import VisualSimilarity
sim = VisualSimilarity.from_onnx(sys.argv[2]) if sys.argv[1] == "onnx" else VisualSimilarity.from_run(sys.argv[2], device="cpu")
print(time.perf_counter() - t)
"""


def startup(kind: str, where: Path) -> tuple[float, float]:
    """(seconds to ready inside the process, wall seconds of the whole process) for a fresh Python."""
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", STARTUP, kind, str(where)], capture_output=True, text=True, check=True,
                         cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    return float(out.stdout.split()[-1]), time.perf_counter() - t


def timed(fn, n_images: int) -> float:
    t = time.perf_counter()
    fn()
    return n_images / (time.perf_counter() - t)


def bench_model(model: str, args, tmp: Path) -> dict:
    import numpy as np
    import torch

    from retrieval.export import EmbeddingGraph
    from retrieval.visual_similarity import VisualSimilarity
    from synthetic.drawn_images import render_pair

    t = time.perf_counter()
    run = benchlib.small_run(model, tmp / model, args.pairs, args.pca)
    made_s = time.perf_counter() - t
    out = tmp / f"{model}_onnx"
    t = time.perf_counter()
    benchlib.script(["similarity.py", "--run", run, "export", "-o", out, "--dynamic-batch"])
    export_s = time.perf_counter() - t
    torch_sim = VisualSimilarity.from_run(run, device="cpu")
    onnx_sim = VisualSimilarity.from_onnx(out)
    images = [im for i in range(-(-args.batch // 2)) for im in render_pair(seed=1, index=i)][:args.batch]
    x = onnx_sim.encoder.preprocess.batch(images)
    graph = EmbeddingGraph(torch_sim.encoder, torch_sim.model).eval().to(memory_format=torch.channels_last)
    xt = torch.from_numpy(x).contiguous(memory_format=torch.channels_last)

    def torch_graph(dtype):
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            graph(xt)

    configs = {
        "graph onnxruntime fp32": lambda: onnx_sim.encoder.run(x),
        "graph torch fp32": lambda: torch_graph("fp32"),
        "graph torch bf16": lambda: torch_graph("bf16"),
        "embed onnxruntime fp32": lambda: onnx_sim.embed(images),
        "embed torch fp32": lambda: torch_sim.embed(images),
    }
    for fn in configs.values():  # warm-up: first calls allocate and pick kernels
        fn()
    speeds: dict[str, list[float]] = {k: [] for k in configs}
    starts: dict[str, list[tuple[float, float]]] = {"from_onnx": [], "from_run": []}
    for _ in range(args.repeats):
        for k, fn in configs.items():
            speeds[k].append(timed(fn, len(images)))
        starts["from_onnx"].append(startup("onnx", out))
        starts["from_run"].append(startup("run", run))
    got = onnx_sim.embed(images)
    want = torch_sim.embed(images).numpy()
    want /= np.linalg.norm(want, axis=1, keepdims=True)
    median = {k: benchlib.median(v) for k, v in speeds.items()}
    rows = [{"model": model, "what": k, "images_per_s": v, "vs_torch_fp32": v / median[f"{k.split()[0]} torch fp32"]}
            for k, v in median.items()]
    return {"model": model, "rows": rows, "run_made_s": made_s, "export_s": export_s,
            "onnx_mb": (out / "encoder.onnx").stat().st_size / 1e6,
            "startup": {k: {"ready_s": benchlib.median(a for a, _ in v), "process_s": benchlib.median(b for _, b in v)}
                        for k, v in starts.items()},
            "min_cosine": float((got * want).sum(1).min()), "batch": len(images)}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    import onnxruntime
    import torch

    info = benchlib.machine()
    info["onnxruntime"] = onnxruntime.__version__
    print(f"CPU: {info['cpu']}, {info['cores']} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"onnxruntime {onnxruntime.__version__}; load average {os.getloadavg()[0]:.2f} at the start", flush=True)
    results = []
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        for model in args.models:
            r = bench_model(model, args, Path(tmp))
            results.append(r)
            s = r["startup"]
            print(f"{model}: export {r['export_s']:.0f} s ({r['onnx_mb']:.0f} MB), min cosine {r['min_cosine']:.6f}; "
                  f"start-up from_onnx {s['from_onnx']['ready_s']:.2f} s (process {s['from_onnx']['process_s']:.2f} s), "
                  f"from_run {s['from_run']['ready_s']:.2f} s (process {s['from_run']['process_s']:.2f} s)", flush=True)
    print(benchlib.table([row for r in results for row in r["rows"]],
                         [("model", "model", "s"), ("what", f"batch {args.batch}", "s"),
                          ("images_per_s", "images/s", ".2f"), ("vs_torch_fp32", "x torch fp32", ".2f")]))
    print(f"load average {os.getloadavg()[0]:.2f} at the end")
    return benchlib.finish("onnx", args, info, results=results) if args.save else 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main, prog="bench/onnx.py"))
