"""The backbone registry: a model name -> its spec, its loader, its taps and their dims.

The registry on top of the loaders: `featuresExtractor.clip_models` (open_clip) and
`featuresExtractor.zoo` (the paper's 37 names, timm and torchvision). Two names of its own:

| name          | open_clip arch | pretrained | taps                                   |
|---------------|----------------|------------|----------------------------------------|
| `clip_rn50x4` | `RN50x4`       | `openai`   | layer1, layer2, layer3, layer4, attnpool |
| `tiny_rn`     | `TinyRN`       | none       | layer1, layer2, layer3, layer4, attnpool |

`clip_rn50x4` is the published pipeline. `tiny_rn` is open_clip's own
ModifiedResNet at layers [1,1,1,1], width 8 and 64 px, shipped here so that tests
and the offline demo run in seconds without weights.

Any other open_clip architecture name (`RN50`, `ViT-B-32`, ...) works too, with
default taps by family (`featuresExtractor.taps.default_taps`). A tap is a module path
inside `model.visual`; the special name `embedding` is the tower's own output.

Example:
    >>> spec = resolve_spec("clip_rn50x4")
    >>> spec.arch, spec.taps
    ('RN50x4', ('layer1', 'layer2', 'layer3', 'layer4', 'attnpool'))
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from typing import Sequence

import torch

from toolkit.utils import UserError

from . import clip_models, zoo
from .backbone_base import Backbone, BackboneSpec, logging_disabled
from .taps import CLIP_RESNET_TAPS, default_taps, tap_infos, validate_taps
from .transforms import TRANSFORMS, paper_transform

__all__ = ["BACKBONES", "resolve_spec", "load_backbone", "probe_dims", "list_models"]

BACKBONES: dict[str, BackboneSpec] = {
    "clip_rn50x4": BackboneSpec("clip_rn50x4", "RN50x4", "openai", CLIP_RESNET_TAPS),
    "tiny_rn": BackboneSpec("tiny_rn", "TinyRN", None, CLIP_RESNET_TAPS),
}


def resolve_spec(name: str, layers: Sequence[str] | None = None, pretrained: str | None = "default") -> BackboneSpec:
    """Return the spec for a registry name, a zoo name, an open_clip architecture or a timm/torchvision model.

    `layers` overrides the taps. `pretrained` overrides the tag: "default" keeps the
    registry's, "none" or None means random initialisation.
    """
    if name in BACKBONES:
        spec = BACKBONES[name]
    elif name in zoo.ZOO:
        spec = zoo.zoo_spec(name)
    elif (spec := clip_models.clip_spec(name) or zoo.other_spec(name)) is None:
        raise UserError(
            f"unknown model {name!r}: use one of the paper's names (extract.py --list-models), an open_clip "
            f"architecture, or a timm/torchvision model name (timm:NAME[.TAG], torchvision:NAME)"
        )
    if pretrained != "default":
        spec = replace(spec, pretrained=None if pretrained in (None, "none") else pretrained)
    if layers:
        spec = replace(spec, taps=tuple(layers))
    return spec


def load_backbone(spec: BackboneSpec, weights: str | os.PathLike | None = None,
                  device: str | torch.device = "cpu", init_seed: int = 0, transform: str = "library") -> Backbone:
    """Build the spec's model, its eval transform and its weights record.

    `transform` is "library" (the library's own eval transform) or "paper" (the paper's
    `Resize([224, 224])` with ImageNet mean and std, `transforms.paper_transform`, for every
    model but CLIP's, which keep CLIP's own transform as the paper's code did).

    Weights come from `weights` (a local checkpoint, read with `weights_only=True`), else
    from the spec's pretrained tag (from the library's cache, downloaded on first use),
    else the model is randomly initialised from `init_seed` (without touching the global
    RNG), so a random-init extraction can be reproduced later, e.g. by similarity.py.
    The model is returned in eval mode with gradients off, on `device`.

    Example:
        >>> bb = load_backbone(resolve_spec("tiny_rn"))
        >>> bb.transform.transforms[0].size
        64
    """
    if transform not in TRANSFORMS:
        raise UserError(f"transform must be one of {', '.join(TRANSFORMS)}, not {transform!r}")
    if spec.library == "open_clip":
        backbone = clip_models.load_clip_backbone(spec, weights=weights, device=device, init_seed=init_seed)
    else:
        backbone = zoo.load_zoo_backbone(spec, weights=weights, device=device, init_seed=init_seed)
    if transform == "paper" and spec.library != "open_clip":
        backbone = replace(backbone, transform=paper_transform())
    return replace(backbone, transform_choice=transform)


def probe_dims(spec: BackboneSpec) -> dict[str, int]:
    """Tap -> pooled dimension, from the model built on the meta device (no weights, no arithmetic)."""
    if spec.library == "open_clip":
        model, _ = clip_models.build_tower(spec.arch, {}, "meta")
        size = model.image_size if isinstance(model.image_size, tuple) else (model.image_size,) * 2
    else:
        with logging_disabled(logging.WARNING):
            model, transform, _ = zoo.build_model(spec, None, on="meta")
        if spec.library == "timm":
            from timm.data import resolve_model_data_config

            size = resolve_model_data_config(model)["input_size"][1:]
        else:
            size = (transform.crop_size[0],) * 2
    taps = spec.taps or default_taps(model)
    validate_taps(model, taps)
    return {t.name: t.pooled_dim for t in tap_infos(model, taps, (3, *size))}


def _cached(spec: BackboneSpec) -> str:
    if spec.pretrained in (None, zoo.FILE_ONLY):
        return "--weights only" if spec.pretrained == zoo.FILE_ONLY else "random init"
    if spec.library == "open_clip":
        return "cached" if clip_models.cached_weights(spec) else "not cached"
    return "cached" if zoo.weights_location(spec)[2] else "not cached"


def list_models(with_dims: bool = True) -> list[dict]:
    """One row per zoo name (and the registry's extra names): library, identifier, tag, taps, dims, cache status."""
    rows = []
    for name in list(zoo.ZOO) + [n for n in BACKBONES if n not in zoo.ZOO]:
        entry = zoo.ZOO.get(name)
        if entry is not None and not entry.library:
            rows.append({"name": name, "library": "-", "identifier": entry.identifier, "tag": "-", "taps": {},
                         "status": entry.status, "cached": "-", "note": f"{entry.note}; use {entry.alternative}"})
            continue
        spec = zoo.zoo_spec(name) if entry is not None else BACKBONES[name]
        dims = probe_dims(spec) if with_dims else {t: None for t in spec.taps or ()}
        rows.append({"name": name, "library": spec.library, "identifier": spec.arch, "tag": spec.pretrained or "-",
                     "taps": dims, "status": entry.status if entry else "available", "cached": _cached(spec),
                     "note": entry.note if entry else ""})
    return rows
