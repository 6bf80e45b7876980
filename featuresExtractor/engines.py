"""Faster exact CPU engines for the extraction graph (the backbone and its pooled taps, fp32).

- `TapGraph`: a backbone's visual tower and taps as one module, images -> a tuple of pooled tap
  vectors, so that it can be traced, exported or compiled.
- `fold_batch_norms(module)`: each batch norm that only follows a convolution folded into that
  convolution's weights (`torch.nn.utils.fusion.fuse_conv_bn_eval`), in place; the module keeps its
  names, so taps still hook where they did. Exact up to float rounding (min cosine 1 - 2e-14 against
  torch on RN50x4's five taps). `folded_batch_norms` does it for a block and puts the modules back.
- `resolve_engine`: what `--engine auto` runs: `folded` on the kernel families where bench/engines.py
  measured it at least 1.2x faster than torch in fp32 (`FOLDED_WINS`), `torch` everywhere else. No
  compiled or exported graph is a default: see bench/engines.py for the side-by-side figures.

Example:
    >>> from featuresExtractor.backbones import load_backbone, resolve_spec
    >>> bb = load_backbone(resolve_spec("tiny_rn"))
    >>> folded = fold_batch_norms(bb.visual)                       # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
from torch import nn

from toolkit.hardware import CpuKind, cpu_kind

from .pooling import global_avg_pool
from .taps import Taps

__all__ = ["ENGINES", "ENGINE_CHOICES", "FOLDED_WINS", "TapGraph", "fold_batch_norms", "folded_batch_norms",
           "conv_bn_pairs", "resolve_engine"]

ENGINES = ("torch", "folded")
"""The engines a `FeatureExtractor` runs: torch (the module as it is) and folded (batch norms folded)."""
ENGINE_CHOICES = ("auto", *ENGINES)
"""What `--engine` accepts."""
FOLDED_WINS = {
    # AMD EPYC with AVX512-BF16 capped with ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2, batch 16,
    # load average 17-19 (paired repeats 1.47x, 1.22x, 1.21x)
    "aten=AVX2,onednn=AVX2": "1.22x torch's speed measured on AVX2 kernels",
}
"""Kernel families (`toolkit.hardware.CpuKind.kernels`) where `folded` beat `torch` by >= 1.2x in fp32,
RN50x4 at extract.py's CPU batches (bench/engines.py), with the figure."""


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


def resolve_engine(requested: str, device, precision: str, kind: CpuKind | None = None) -> tuple[str, str | None]:
    """`--engine` -> (the engine that runs, the line saying what `auto` chose and why, or None).

    `auto` takes `folded` where it was measured to win by at least 1.2x (`FOLDED_WINS`: fp32 on the
    CPU kinds listed there, bench/engines.py), `torch` elsewhere (CUDA, bf16/fp16, other CPUs).
    """
    if requested != "auto":
        return requested, None
    if torch.device(device).type != "cpu" or precision != "fp32":
        return "torch", None
    kind = cpu_kind() if kind is None else kind
    family = kind.kernels
    if family in FOLDED_WINS:
        return "folded", f"engine auto -> folded: batch norms folded into the convolutions ({FOLDED_WINS[family]})"
    return "torch", None


def _set(root: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, new)
