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

from collections import OrderedDict
from typing import Callable, Sequence

import torch
from torch import nn

from toolkit.utils import UserError

__all__ = ["EMBEDDING", "RESNET_STAGES", "CLIP_RESNET_TAPS", "validate_taps", "default_taps", "Taps"]

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

    def __call__(self, images: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        if not self._handles:
            raise RuntimeError("Taps must be used inside a `with` block")
        self._out.clear()
        self.model(images)
        out = OrderedDict((name, self._out[name]) for name in self.names)
        self._out.clear()
        return out
