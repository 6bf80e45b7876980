"""Named forward hooks: run a tower once and collect chosen module outputs.

Modelled on torchvision's `create_feature_extractor` and timm's feature hooks, but
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

from .backbones import EMBEDDING, validate_taps

__all__ = ["Taps"]


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
