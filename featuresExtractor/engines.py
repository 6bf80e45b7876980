"""Faster exact CPU engines for the extraction graph (the backbone and its pooled taps, fp32).

- `TapGraph`: a backbone's visual tower and taps as one module, images -> a tuple of pooled tap
  vectors, so that it can be traced, exported or compiled.
- `fold_batch_norms(module)`: each batch norm that only follows a convolution folded into that
  convolution's weights (`torch.nn.utils.fusion.fuse_conv_bn_eval`), in place; the module keeps its
  names, so taps still hook where they did. Exact up to float rounding (min cosine 1 - 2e-14 against
  torch on RN50x4's five taps). `folded_batch_norms` does it for a block and puts the modules back.
- `OnnxTaps`: the same graph exported to ONNX (`featuresExtractor.onnx_graph.write_graph`) and run by
  onnxruntime's CPU provider; `onnx_taps(backbone, image_shape)` builds it through the user's graph
  cache (`featuresExtractor.graph_cache`), keyed by the weights' sha256, the taps, the transform, the
  input shape and the library versions. Equal to torch within float rounding (min cosine 1 - 5e-14 on
  RN50x4's five taps).
- `resolve_engine`: what `--engine auto` runs in fp32 on the CPU: `onnxruntime` on the kernel families
  where bench/engines.py measured it at least 1.2x faster than torch (`ONNXRUNTIME_WINS`), when it is
  installed and the run has enough images to repay building the graph (`ONNXRUNTIME_MIN_IMAGES`);
  else `folded` where that was measured to win (`FOLDED_WINS`); `torch` everywhere else (CUDA,
  bf16/fp16, other CPUs). See bench/engines.py for the side-by-side figures.

Example:
    >>> from featuresExtractor.backbones import load_backbone, resolve_spec
    >>> bb = load_backbone(resolve_spec("tiny_rn"))
    >>> folded = fold_batch_norms(bb.visual)                       # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.util
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from toolkit.hardware import CpuKind, cpu_kind
from toolkit.utils import UserError

from .graph_cache import GraphCache, cache_folder
from .onnx_graph import DEFAULT_OPSET, write_graph
from .pooling import global_avg_pool
from .taps import Taps

__all__ = ["ENGINES", "ENGINE_CHOICES", "FOLDED_WINS", "ONNXRUNTIME_WINS", "ONNXRUNTIME_MIN_IMAGES", "OnnxTaps",
           "TapGraph", "fold_batch_norms", "folded_batch_norms", "conv_bn_pairs", "graph_key", "module_sha256",
           "onnx_taps", "onnxruntime_missing", "resolve_engine"]

ENGINES = ("torch", "folded", "onnxruntime")
"""The engines a `FeatureExtractor` runs: torch (the module as it is), folded (batch norms folded) and
onnxruntime (the pooled-tap graph exported to ONNX, fp32 on the CPU)."""
ENGINE_CHOICES = ("auto", *ENGINES)
"""What `--engine` accepts."""
FOLDED_WINS = {
    # AMD EPYC with AVX512-BF16 capped with ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2, batch 16:
    # quiet (load 1.5-1.7), 5 paired repeats 1.15x to 1.22x, median 1.20x; under load 17-19, 1.22x median
    "aten=AVX2,onednn=AVX2": "1.20x torch's speed measured on AVX2 kernels",
}
"""Kernel families (`toolkit.hardware.CpuKind.kernels`) where `folded` beat `torch` by >= 1.2x in fp32,
RN50x4 at extract.py's CPU batches (bench/engines.py), with the figure."""
ONNXRUNTIME_WINS = {
    # AMD EPYC (avx2 avx512f avx512_bf16, no AMX), batch 16, bench/engines.py, load 1.0-1.5 (bench/README.md):
    # 1.76x eager at the median of 5 paired repeats (1.60x to 1.90x); folded 1.21x, torch.compile 1.46x
    "aten=AVX512,onednn=AVX512": "measured 1.76x torch's speed on this kind of CPU",
}
"""Kernel families where `onnxruntime` beat `torch` by >= 1.2x in fp32 (bench/engines.py), with the figure.
onnxruntime picks its own kernels from the CPU; an AVX2-only CPU has no figure yet, so it is not listed."""
ONNXRUNTIME_MIN_IMAGES = 128
"""Below this many images `auto` does not build an onnxruntime graph: building RN50x4's took 10.3 s once
(export, session, first batch), against 0.077 s saved per image (bench/engines.py, quiet): it pays for
itself from about 130 images."""
ONNXRUNTIME_PACKAGES = ("onnxruntime", "onnx", "onnxscript")
"""What the onnxruntime engine needs: onnxruntime runs the graph, onnx and onnxscript export it (the [export] extra)."""


class TapGraph(nn.Module):
    """`(N, 3, H, W)` images -> tuple of `(N, C)` float32 pooled tap outputs, in `taps` order."""

    def __init__(self, visual: nn.Module, taps: Sequence[str]):
        super().__init__()
        self.visual, self.taps = visual, tuple(taps)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        with Taps(self.visual, self.taps, reduce=global_avg_pool) as taps:
            out = taps(images)
        return tuple(out.values())


def conv_bn_pairs(module: nn.Module) -> list[tuple[str, str]]:
    """(conv, batch norm) module paths where the norm is the only reader of the convolution's output.

    Found on the module's `torch.fx` graph (as `torch.fx.experimental.optimization.fuse` does);
    a module fx cannot trace has none (an empty list).
    """
    import torch.fx

    try:
        graph = torch.fx.symbolic_trace(module).graph
    except Exception:  # noqa: BLE001 - fx raises many kinds on untraceable code; no folding then
        return []
    modules = dict(module.named_modules())
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), nn.BatchNorm2d):
            continue
        src = node.args[0] if node.args else None
        if (isinstance(src, torch.fx.Node) and src.op == "call_module" and isinstance(modules.get(src.target), nn.Conv2d)
                and len(src.users) == 1):
            pairs.append((src.target, node.target))
    return pairs


def fold_batch_norms(module: nn.Module, keep: Sequence[str] = ()) -> dict[str, nn.Module]:
    """Fold every (conv, batch norm) pair of `conv_bn_pairs` in place (eval mode); returns the replaced modules.

    The norm becomes `nn.Identity`; pairs whose conv or norm is named in `keep` (a tap) are left as
    they are. The result maps each replaced path to its original module (`folded_batch_norms` puts
    them back).
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    replaced: dict[str, nn.Module] = {}
    for conv_name, bn_name in conv_bn_pairs(module):
        conv, bn = module.get_submodule(conv_name), module.get_submodule(bn_name)
        if bn_name in keep or conv_name in keep or bn.training or conv.training or bn.running_mean is None:
            continue
        with torch.no_grad():
            fused = fuse_conv_bn_eval(conv, bn)
        replaced[conv_name], replaced[bn_name] = conv, bn
        _set(module, conv_name, fused)
        _set(module, bn_name, nn.Identity())
    return replaced


@contextlib.contextmanager
def folded_batch_norms(module: nn.Module, keep: Sequence[str] = ()) -> Iterator[nn.Module]:
    """`fold_batch_norms` for the block; the original modules are put back after it."""
    replaced = fold_batch_norms(module, keep)
    try:
        yield module
    finally:
        for path, original in replaced.items():
            _set(module, path, original)


def onnxruntime_missing() -> str | None:
    """The first package the onnxruntime engine needs that is not installed, or None."""
    return next((name for name in ONNXRUNTIME_PACKAGES if importlib.util.find_spec(name) is None), None)


def resolve_engine(requested: str, device, precision: str, kind: CpuKind | None = None, n_images: int | None = None,
                   missing: Callable[[], str | None] = onnxruntime_missing) -> tuple[str, str | None]:
    """`--engine` -> (the engine that runs, the line saying what `auto` chose and why, or None).

    `auto`, in fp32 on the CPU: `onnxruntime` where it was measured to win (`ONNXRUNTIME_WINS`), when it
    is installed and `n_images` (None: unknown, taken as many) reaches `ONNXRUNTIME_MIN_IMAGES`; else
    `folded` where that was measured to win (`FOLDED_WINS`); `torch` elsewhere (CUDA, bf16/fp16, other
    CPUs). The line is None where auto keeps torch (a small run included). An explicit `onnxruntime`
    off the CPU, in another precision, or without its packages is a `UserError`.
    """
    on_cpu = torch.device(device).type == "cpu"
    if requested == "onnxruntime":
        if not on_cpu or precision != "fp32":
            raise UserError(f"--engine onnxruntime runs fp32 on the CPU (asked: {precision} on {device}); "
                            f"use --precision fp32 --device cpu, or --engine torch")
        if name := missing():
            raise UserError(f"--engine onnxruntime needs the package {name}, which is not installed: "
                            f"pip install 'adaptation-similarity[export]', or use --engine torch")
    if requested != "auto":
        return requested, None
    if not on_cpu or precision != "fp32":
        return "torch", None
    family = (cpu_kind() if kind is None else kind).kernels
    if family in ONNXRUNTIME_WINS:
        if not (name := missing()) and (n_images is None or n_images >= ONNXRUNTIME_MIN_IMAGES):
            return "onnxruntime", (f"engine auto -> onnxruntime: the graph exported to ONNX, fp32 "
                                   f"({ONNXRUNTIME_WINS[family]}); it is cached in {cache_folder()}")
        if name:  # worth a line: one install away from a measured win
            return _fallback(family, f"the package {name} is not installed (pip install 'adaptation-similarity[export]' "
                                     f"runs onnxruntime, {ONNXRUNTIME_WINS[family]})")
        # else a small run: the graph's build would not pay for itself
    return _fallback(family, None)


def _fallback(family: str, why: str | None) -> tuple[str, str | None]:
    """folded where it was measured to win, else torch; the line says why (None: torch, nothing to say)."""
    if family in FOLDED_WINS:
        return "folded", f"engine auto -> folded: {why or 'batch norms folded into the convolutions'} ({FOLDED_WINS[family]})"
    return "torch", (f"engine auto -> torch: {why}" if why else None)


def module_sha256(module: nn.Module) -> str:
    """The sha256 of a module's state: each entry's name, dtype, shape and bytes, in order."""
    h = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())  # the buffer itself, not a copy
    return h.hexdigest()


def graph_key(backbone, image_shape: Sequence[int]) -> dict:
    """What defines the onnxruntime engine's graph of `backbone` (the graph cache's key)."""
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    return {"graph": "TapGraph: images -> global-average-pooled taps, fp32", "model": backbone.spec.name,
            "weights_sha256": module_sha256(backbone.visual), "taps": list(backbone.spec.taps),
            "transform": repr(backbone.transform), "image_shape": list(image_shape), "opset": DEFAULT_OPSET,
            "versions": {name: installed(name) for name in ("torch", *ONNXRUNTIME_PACKAGES)}}


class OnnxTaps:
    """onnxruntime's session on a `TapGraph` graph, called like `featuresExtractor.taps.Taps`:
    `(n, 3, H, W)` float32 images -> {tap: `(n, C)` pooled tensor}."""

    reduce = staticmethod(global_avg_pool)  # what `Forwarder` reads: the outputs are pooled vectors

    def __init__(self, source: str | bytes, taps: Sequence[str], threads: int):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        options.log_severity_level = 3  # warnings about unused initialisers would reach the user's terminal
        self.session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        self.taps = tuple(taps)

    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = images.detach().to("cpu", torch.float32).contiguous().numpy()
        return {name: torch.from_numpy(out) for name, out in zip(self.taps, self.session.run(None, {"images": x}))}


def onnx_taps(backbone, image_shape: Sequence[int], cache: GraphCache | None = None) -> OnnxTaps | None:
    """The onnxruntime engine for `backbone`: its graph from the user's graph cache (built there when
    missing), as an `OnnxTaps`; None when the cache could give no graph (said in one line).

    Raises `UserError` (one line) when the model cannot be exported to ONNX.
    """
    cache = GraphCache(cache_folder()) if cache is None else cache
    taps = backbone.spec.taps

    def build(path: Path) -> None:
        graph = TapGraph(copy.deepcopy(backbone.visual).float().cpu(), taps).eval()
        write_graph(graph, path, image_shape, DEFAULT_OPSET, True, arch=backbone.spec.name, output_names=taps)

    source = cache.get(graph_key(backbone, image_shape), build)
    return None if source is None else OnnxTaps(source, taps, torch.get_num_threads())


def _set(root: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, new)
