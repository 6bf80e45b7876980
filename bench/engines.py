"""CPU engines for the extraction graph, side by side: RN50x4's backbone plus its taps, fp32, random init.

The graph is what extract.py runs on the CPU: `model.visual` with the taps layer1..layer4 and
attnpool, each pooled (`featuresExtractor.pooling.global_avg_pool`), on (B, 3, 288, 288) inputs at
extract.py's CPU batch sizes (16: `-b 16 --data-aug` as in `bench/extract.py --whole-process`;
32: the CPU slice every larger `-b` runs). Engines:

* `eager`: torch eager, channels_last, forward hooks (today's `--engine torch`);
* `folded`: the same eager module with each batch norm folded into the convolution before it
  (`featuresExtractor.engines.fold_batch_norms`), hooks unchanged;
* `jit`: `torch.jit.trace` + `torch.jit.freeze` + `optimize_for_inference` (BN folded, oneDNN fusions);
* `compile`: `torch.compile` (inductor, with freezing);
* `onnxruntime`: the graph exported with `torch.onnx.export(dynamo=True)`, run by onnxruntime's CPU
  provider with as many intra-op threads as torch uses.

Engines are interleaved in every repeat so that load from other processes hits them alike; each
figure is the median seconds per batch over repeats, and the ratio is eager / engine within the
same repeats. The build cost (trace, export, compile, first run) is timed once per engine. The
vectors are compared with eager's: minimum cosine per tap over the batch.

    python bench/engines.py --batches 16 32 --repeats 3
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 python bench/engines.py   # an AVX2 machine's kernels

Prints a table and writes bench/results/engines-TIMESTAMP.json.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

import benchlib  # bench/ is the script folder; this also puts the repo root on sys.path

# bench/onnx.py would shadow the onnx package that torch.onnx imports: the script folder goes once benchlib is in.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import numpy as np
import torch

from featuresExtractor.backbones import load_backbone, resolve_spec
from featuresExtractor.engines import TapGraph, fold_batch_norms

ENGINES = ("eager", "folded", "jit", "compile", "onnxruntime")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/engines.py", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="clip_rn50x4")
    p.add_argument("--batches", nargs="+", type=int, default=[16, 32])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES))
    return p.parse_args(argv)


def _eager(backbone, batch):
    graph = TapGraph(backbone.visual, backbone.spec.taps).eval()
    graph.visual.to(memory_format=torch.channels_last)
    return lambda x: graph(x.contiguous(memory_format=torch.channels_last))


def _folded(backbone, batch):
    visual = copy.deepcopy(backbone.visual)
    fold_batch_norms(visual)
    graph = TapGraph(visual, backbone.spec.taps).eval()
    graph.visual.to(memory_format=torch.channels_last)
    return lambda x: graph(x.contiguous(memory_format=torch.channels_last))


def _jit(backbone, batch):
    graph = TapGraph(copy.deepcopy(backbone.visual), backbone.spec.taps).eval()
    graph.visual.to(memory_format=torch.channels_last)
    x = torch.zeros(batch, *backbone_shape(backbone)).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        traced = torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(graph, (x,), check_trace=False)))
    return lambda x: traced(x.contiguous(memory_format=torch.channels_last))


def _compile(backbone, batch):
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True
    graph = TapGraph(copy.deepcopy(backbone.visual), backbone.spec.taps).eval()
    graph.visual.to(memory_format=torch.channels_last)
    compiled = torch.compile(graph, dynamic=False)
    return lambda x: compiled(x.contiguous(memory_format=torch.channels_last))


def _onnxruntime(backbone, batch):
    import onnxruntime as ort

    path = Path(tempfile.mkdtemp()) / "graph.onnx"
    graph = TapGraph(copy.deepcopy(backbone.visual), backbone.spec.taps).eval()
    x = torch.zeros(2, *backbone_shape(backbone))
    with torch.inference_mode(False), torch.no_grad():
        program = torch.onnx.export(graph, (x,), dynamo=True, opset_version=18, input_names=["images"],
                                    dynamic_shapes={"images": {0: torch.export.Dim("batch")}}, external_data=False,
                                    optimize=True, verbose=False)
    program.save(str(path))
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda x: tuple(torch.from_numpy(o) for o in session.run(None, {"images": x.numpy()}))


BUILDERS: dict[str, Callable] = {"eager": _eager, "folded": _folded, "jit": _jit, "compile": _compile,
                                 "onnxruntime": _onnxruntime}


def backbone_shape(backbone) -> tuple[int, ...]:
    from PIL import Image

    return tuple(backbone.transform(Image.new("RGB", (64, 64))).shape)


def min_cosine(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    return min(float(torch.nn.functional.cosine_similarity(x.double(), y.double(), dim=1).min()) for x, y in zip(a, b))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    info = benchlib.machine()
    print(f"machine: {info}", file=sys.stderr)
    backbone = load_backbone(resolve_spec(args.model, pretrained="none"))
    backbone.visual.eval()
    gen = torch.Generator().manual_seed(0)
    rows = []
    for batch in args.batches:
        x = torch.randn(batch, *backbone_shape(backbone), generator=gen)
        runners, builds = {}, {}
        for name in args.engines:
            start = time.perf_counter()
            with torch.inference_mode(name not in ("jit", "compile", "onnxruntime")), torch.no_grad():
                runners[name] = BUILDERS[name](backbone, batch)
                first = runners[name](x)
            builds[name] = time.perf_counter() - start
            print(f"built {name} at batch {batch} in {builds[name]:.1f} s", file=sys.stderr)
            del first
        times = {name: [] for name in runners}
        outs = {}
        for r in range(args.repeats):
            for name, run in runners.items():
                with torch.inference_mode(name not in ("jit", "compile")), torch.no_grad():
                    start = time.perf_counter()
                    outs[name] = run(x)
                    times[name].append(time.perf_counter() - start)
            print(f"batch {batch} repeat {r + 1}: " + ", ".join(f"{n} {t[-1]:.2f}s" for n, t in times.items())
                  + f"; load {os.getloadavg()[0]:.1f}", file=sys.stderr)
        for name in runners:
            ratios = [e / t for e, t in zip(times["eager"], times[name])] if "eager" in times else []
            rows.append({"batch": batch, "engine": name, "s_per_batch": benchlib.median(times[name]),
                         "img_s": batch / benchlib.median(times[name]), "vs_eager": benchlib.median(ratios) if ratios else None,
                         "build_s": builds[name], "min_cos": min_cosine(outs["eager"], outs[name]) if "eager" in outs else None,
                         "raw_s": times[name]})
    columns = [("batch", "batch", "d"), ("engine", "engine", "s"), ("s_per_batch", "s/batch", ".2f"),
               ("img_s", "img/s", ".2f"), ("vs_eager", "x eager", ".2f"), ("build_s", "build s", ".1f"),
               ("min_cos", "min cos", ".7f")]
    print(benchlib.table(rows, columns))
    path = benchlib.save_results("engines", {"machine": info, "args": vars(args), "rows": rows})
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
