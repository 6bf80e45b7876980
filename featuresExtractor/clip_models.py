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

from .backbone_base import (Backbone, BackboneSpec, assignable, build_and_load, hf_cache_dir, logging_disabled, read_state_dict,
                            weights_source)
from .taps import default_taps, validate_taps

__all__ = ["register_local_configs", "clip_spec", "cached_weights", "download", "build_tower", "load_clip_backbone"]

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


def _visual_state(state_dict: dict, path: Path, arch: str) -> dict:
    # Only the image tower is used, so a visual-only checkpoint is enough.
    own = {k[len("visual."):]: v for k, v in state_dict.items() if k.startswith("visual.")}
    if not own:
        raise UserError(f"cannot load weights from {path} into {arch}: no 'visual.*' tensors in the file")
    return own


def _load_visual(visual: nn.Module, own: dict, path: Path, arch: str, assign: bool) -> None:
    # fp16 tensors become the model's fp32 (assignable casts them, as a copy would).
    try:
        visual.load_state_dict(assignable(own, visual), strict=True, assign=assign)
    except RuntimeError as err:
        detail = " ".join(str(err).split())[:300]
        raise UserError(f"cannot load weights from {path} into {arch}: {detail}") from None


def _vision_cfg(arch: str) -> dict | None:
    """The tower's config with the final LayerNorm after the pooling where that changes no output.

    open_clip's ViT applies `ln_post` to the whole token sequence unless `final_ln_after_pool`;
    OpenAI's applies it to the class token alone, so a tap on `ln_post` gives OpenAI's
    pre-projection class token only with the flag. For class-token pooling ("tok") the pooled
    output is the same either way (LayerNorm acts on each token alone), so the flag is set there.
    """
    import open_clip

    cfg = open_clip.get_model_config(arch)
    vision = dict((cfg or {}).get("vision_cfg") or {})
    if not vision or "layers" in vision and isinstance(vision["layers"], (list, tuple)) or "timm_model_name" in vision:
        return None  # a ResNet tower (layers per stage) or a timm tower: no ln_post
    if vision.get("pool_type", "tok") != "tok" or vision.get("attentional_pool"):
        return None
    return {**vision, "final_ln_after_pool": True}


def build_tower(arch: str, preprocess: dict, on: str = "cpu") -> tuple[nn.Module, object]:
    """(visual tower, eval transform) of an open_clip architecture, randomly initialised on `on`.

    On "meta" nothing is allocated or initialised (for loading weights by assignment, or for
    learning shapes). `preprocess` overrides the transform's mean, std, interpolation and resize mode.
    """
    import open_clip

    register_local_configs()
    vision_cfg = _vision_cfg(arch)
    # open_clip logs its own "initialized randomly" warning; ours is printed by extract.py.
    with torch.device(on), logging_disabled(logging.WARNING):
        model, _, transform = open_clip.create_model_and_transforms(
            arch, pretrained=None, device=on,
            image_mean=preprocess.get("mean"), image_std=preprocess.get("std"),
            image_interpolation=preprocess.get("interpolation"), image_resize_mode=preprocess.get("resize_mode"),
            **({"vision_cfg": vision_cfg} if vision_cfg else {}))
    return model.visual, transform  # the text tower is not needed


def load_clip_backbone(spec: BackboneSpec, weights: str | os.PathLike | None = None,
                       device: str | torch.device = "cpu", init_seed: int = 0) -> Backbone:
    """Build an open_clip visual tower and its eval transform from one open_clip call.

    Weights come from `weights` (a local open_clip or OpenAI checkpoint, fp16 or fp32,
    read with `weights_only=True`), else from the spec's pretrained tag (downloaded
    into the Hugging Face cache on first use), else the model is randomly initialised
    from `init_seed` (without touching the global RNG). With weights, the tower is built
    on the meta device and the weights assigned (`backbone_base.build_and_load`): no random
    initialisation that the weights would replace. The tower is returned in eval mode with
    gradients off, on `device`.
    """
    import open_clip

    register_local_configs()
    preprocess = {}
    if spec.pretrained:
        cfg = open_clip.get_pretrained_cfg(spec.arch, spec.pretrained) or {}
        # The tag's preprocessing, so a local file is read exactly as the tag would be.
        preprocess = {k: cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in cfg}
    path, source = weights_source(spec, weights, download, init_seed)
    built = {}

    def build(on: str) -> nn.Module:
        built["visual"], built["transform"] = build_tower(spec.arch, preprocess, on)
        return built["visual"]

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        if path is None:
            visual = build("cpu")
        else:
            own = _visual_state(read_state_dict(path), path, spec.arch)
            visual, _ = build_and_load(build, lambda m, assign: _load_visual(m, own, path, spec.arch, assign))
    visual = visual.eval().requires_grad_(False).to(device)
    taps = spec.taps or default_taps(visual)
    validate_taps(visual, taps)
    return Backbone(replace(spec, taps=tuple(taps)), visual, built["transform"], source)
