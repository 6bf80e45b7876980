"""Taps: named module outputs of a model, their defaults by family, and the hooks that collect them.

A tap is a module path from `model.named_modules()`, or `EMBEDDING` for the model's own
output. `validate_taps` checks names against the model, `default_taps` picks a family's
default when a model has none of its own, and `Taps` collects the outputs.

`Taps` is modelled on torchvision's `create_feature_extractor` and timm's feature hooks, but
non-invasive: the model is left untouched and every hook is removed on exit.

Example:
    >>> with Taps(visual, ["layer1", "attnpool"], reduce=global_avg_pool) as taps:   # doctest: +SKIP
    ...     feats = taps(images)          # OrderedDict: layer1 -> (N, 320), attnpool -> (N, 640)
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from toolkit.utils import UserError

from .pooling import global_avg_pool

__all__ = ["EMBEDDING", "RESNET_STAGES", "CLIP_RESNET_TAPS", "validate_taps", "default_taps", "Taps", "TapInfo", "tap_infos"]

#: The tap name that stands for the model's own output (the image embedding of a visual tower).
EMBEDDING = "embedding"
#: The four stages of a ResNet (torchvision's, timm's and CLIP's modified ResNet alike).
RESNET_STAGES = ("layer1", "layer2", "layer3", "layer4")
#: CLIP's ResNets: the four stages and the attention pool, whose output is the image embedding.
CLIP_RESNET_TAPS = RESNET_STAGES + ("attnpool",)


def validate_taps(model: nn.Module, taps: Sequence[str]) -> None:
    """Fail with the list of valid module paths when a tap does not exist."""
    names = {n for n, _ in model.named_modules() if n}
    bad = [t for t in taps if t != EMBEDDING and t not in names]
    if bad:
        shown = sorted(names, key=lambda n: (n.count("."), n))
        raise UserError(f"unknown tap(s) {bad} in model.visual; valid names: {EMBEDDING}, " + ", ".join(shown))


def default_taps(model: nn.Module) -> tuple[str, ...]:
    """Taps for a model without its own: the family's usual places.

    timm models: the last four stages their `feature_info` lists; CLIP ResNets: `CLIP_RESNET_TAPS`;
    other ResNets: `RESNET_STAGES`; anything else: `EMBEDDING`.
    """
    names = dict(model.named_modules())
    info = getattr(model, "feature_info", None)
    if isinstance(info, list):  # timm's list of {"module", "num_chs", "reduction"}
        stages = [f["module"] for f in info if f.get("reduction", 1) >= 4 and f["module"] in names]
        if stages:
            return tuple(stages[-4:])
    for family in (CLIP_RESNET_TAPS, RESNET_STAGES):
        if all(t in names for t in family):
            return family
    return (EMBEDDING,)


class Taps:
    """Context manager collecting the outputs of named modules of `model`.

    `names` are module paths from `model.named_modules()` (checked on entry, with an
    error listing the valid ones) or `EMBEDDING` for the model's own output.
    `reduce`, when given, is applied inside each hook, so large feature maps are
    pooled as soon as they are produced instead of being held until the end.
    Calling the object runs the model and returns an OrderedDict in `names` order.
    """

    def __init__(self, model: nn.Module, names: Sequence[str],
                 reduce: Callable[[torch.Tensor], torch.Tensor] | None = None):
        validate_taps(model, names)
        self.model, self.names, self.reduce = model, tuple(names), reduce
        self._handles: list = []
        self._out: dict[str, torch.Tensor] = {}

    def _hook(self, name: str):
        def hook(_module, _inputs, output):
            if isinstance(output, (tuple, list)):  # towers that also return tokens: keep the pooled output
                output = output[0]
            self._out[name] = self.reduce(output) if self.reduce else output
        return hook

    def __enter__(self) -> "Taps":
        modules = dict(self.model.named_modules())
        for name in self.names:
            module = self.model if name == EMBEDDING else modules[name]
            self._handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._out.clear()

    def __call__(self, images: torch.Tensor, tensors: Mapping[str, torch.Tensor] | None = None
                 ) -> "OrderedDict[str, torch.Tensor]":
        """Run the model on `images`; `tensors` replace its parameters and buffers for this call
        (`torch.func.functional_call`), e.g. meta tensors to learn the output shapes without arithmetic."""
        if not self._handles:
            raise RuntimeError("Taps must be used inside a `with` block")
        self._out.clear()
        if tensors is None:
            self.model(images)
        else:
            torch.func.functional_call(self.model, dict(tensors), (images,))
        out = OrderedDict((name, self._out[name]) for name in self.names)
        self._out.clear()
        return out


@dataclass(frozen=True)
class TapInfo:
    """One tap: its module path, raw output shape (without the batch axis) and pooled dimension."""

    name: str
    shape: tuple[int, ...]
    pooled_dim: int


def tap_infos(model: nn.Module, names: Sequence[str], image_shape: Sequence[int], meta: bool = True
              ) -> tuple[TapInfo, ...]:
    """Each tap's output shape and pooled dimension for one blank `image_shape` image.

    With `meta` (the default) the model's parameters and buffers are swapped for meta tensors of the
    same shapes for one forward, so shapes propagate through the library's own code without
    arithmetic or memory, whatever device the model is on; this raises `RuntimeError` or
    `NotImplementedError` where the model cannot run on the meta device (an operation without a meta
    kernel, a tensor it keeps outside its parameters and buffers). Without `meta`, one real forward.
    """
    device = "meta" if meta else next(itertools.chain(model.parameters(), model.buffers())).device
    tensors = {k: torch.empty_like(v, device="meta")
               for k, v in itertools.chain(model.named_parameters(remove_duplicate=False),
                                           model.named_buffers(remove_duplicate=False))} if meta else None
    with Taps(model, names) as taps, torch.inference_mode():
        out = taps(torch.zeros(1, *image_shape, device=device), tensors=tensors)
    return tuple(TapInfo(name, tuple(t.shape[1:]), int(global_avg_pool(t).shape[1])) for name, t in out.items())
