"""The open_clip loader: a CLIP visual tower, its eval transform and its weights.

`load_clip_backbone(spec)` builds the tower from one open_clip call and loads the weights
from a local file, the pretrained tag's file (the Hugging Face cache, downloaded once) or a
random initialisation from a fixed seed. `clip_spec(name)` is the spec of any open_clip
architecture name. The repository's own small architecture `TinyRN` (open_clip's
ModifiedResNet at layers [1,1,1,1], width 8, 64 px, for tests and the offline demo) is
registered with open_clip from `model_configs/` on first use.

Example:
    >>> bb = load_clip_backbone(BackboneSpec("tiny_rn", "TinyRN", None))
    >>> bb.spec.taps, bb.transform.transforms[0].size
    (('layer1', 'layer2', 'layer3', 'layer4', 'attnpool'), 64)
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from toolkit.utils import UserError

from .backbone_base import Backbone, BackboneSpec, hf_cache_dir, logging_disabled, read_state_dict, weights_source
from .taps import default_taps, validate_taps

__all__ = ["register_local_configs", "clip_spec", "cached_weights", "download", "load_clip_backbone"]

_CONFIG_DIR = Path(__file__).parent / "model_configs"


def register_local_configs() -> None:
    """Make the repository's own architectures (`TinyRN`) known to open_clip."""
    import open_clip

    if "TinyRN" not in open_clip.list_models():
        open_clip.add_model_config(_CONFIG_DIR)


def clip_spec(name: str) -> BackboneSpec | None:
    """The spec of an open_clip architecture name (its `openai` tag when it has one), else None."""
    import open_clip

    register_local_configs()
    if name not in open_clip.list_models():
        return None
    tags = open_clip.list_pretrained_tags_by_model(name)
    return BackboneSpec(name, name, "openai" if "openai" in tags else (tags[0] if tags else None))


def cached_weights(spec: BackboneSpec) -> str | None:
    """The local path of the spec's pretrained weights if already downloaded, else None (no network)."""
    import open_clip
    from huggingface_hub import try_to_load_from_cache

    cfg = open_clip.get_pretrained_cfg(spec.arch, spec.pretrained) if spec.pretrained else None
    if not cfg or not cfg.get("hf_hub"):
        return None
    # open_clip's convention: "org/repo/" means its default file name, "org/repo/file" names one.
    repo, filename = os.path.split(cfg["hf_hub"])
    filename = filename or "open_clip_pytorch_model.bin"
    stem = filename.rsplit(".", 1)[0]
    for name in (f"{stem}.safetensors", filename):
        found = try_to_load_from_cache(repo, name)
        if isinstance(found, str):
            return found
    return None


def download(spec: BackboneSpec) -> str:
    """The local file of the spec's pretrained tag, from the cache or downloaded; a `UserError` when neither works."""
    import open_clip
    from open_clip.pretrained import download_pretrained

    cfg = open_clip.get_pretrained_cfg(spec.arch, spec.pretrained)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(spec.arch)
        raise UserError(f"no pretrained tag {spec.pretrained!r} for {spec.arch}; known tags: {tags or 'none'}, or 'none'")
    try:
        return download_pretrained(cfg)
    except OSError as err:  # hub misses and network failures both surface as OSError subclasses
        raise UserError(
            f"cannot get the {spec.arch} '{spec.pretrained}' weights ({type(err).__name__}): they are not in the "
            f"Hugging Face cache ({hf_cache_dir()}) and the download failed. Either pass --weights FILE "
            f"(an open_clip or OpenAI checkpoint), or run once while online to fill that cache "
            f"(HF_HOME moves it), then set HF_HUB_OFFLINE=1 to skip network checks"
        ) from None


def _load_visual_weights(visual: nn.Module, state_dict: dict, path: Path, arch: str) -> None:
    # Only the image tower is used, so a visual-only checkpoint is enough; fp16 tensors
    # are cast by load_state_dict into the fp32 parameters.
    own = {k[len("visual."):]: v for k, v in state_dict.items() if k.startswith("visual.")}
    if not own:
        raise UserError(f"cannot load weights from {path} into {arch}: no 'visual.*' tensors in the file")
    try:
        visual.load_state_dict(own, strict=True)
    except RuntimeError as err:
        detail = " ".join(str(err).split())[:300]
        raise UserError(f"cannot load weights from {path} into {arch}: {detail}") from None


def load_clip_backbone(spec: BackboneSpec, weights: str | os.PathLike | None = None,
                       device: str | torch.device = "cpu", init_seed: int = 0) -> Backbone:
    """Build an open_clip visual tower and its eval transform from one open_clip call.

    Weights come from `weights` (a local open_clip or OpenAI checkpoint, fp16 or fp32,
    read with `weights_only=True`), else from the spec's pretrained tag (downloaded
    into the Hugging Face cache on first use), else the model is randomly initialised
    from `init_seed` (without touching the global RNG). The tower is returned in eval
    mode with gradients off, on `device`.
    """
    import open_clip

    register_local_configs()
    preprocess = {}
    if spec.pretrained:
        cfg = open_clip.get_pretrained_cfg(spec.arch, spec.pretrained) or {}
        # The tag's preprocessing, so a local file is read exactly as the tag would be.
        preprocess = {k: cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in cfg}
    path, source = weights_source(spec, weights, download, init_seed)

    # open_clip logs its own "initialized randomly" warning; ours is printed by extract.py.
    quiet = logging.WARNING if path is None else logging.NOTSET
    with torch.random.fork_rng(devices=[]), logging_disabled(quiet):
        torch.manual_seed(init_seed)
        model, _, transform = open_clip.create_model_and_transforms(
            spec.arch, pretrained=None,
            image_mean=preprocess.get("mean"), image_std=preprocess.get("std"),
            image_interpolation=preprocess.get("interpolation"), image_resize_mode=preprocess.get("resize_mode"),
        )
    if path is not None:
        _load_visual_weights(model.visual, read_state_dict(path), path, spec.arch)
    visual = model.visual.eval().requires_grad_(False).to(device)
    del model  # the text tower is not needed
    taps = spec.taps or default_taps(visual)
    validate_taps(visual, taps)
    return Backbone(replace(spec, taps=tuple(taps)), visual, transform, source)
