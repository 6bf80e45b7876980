"""The backbone registry: which open_clip model to run and where to tap it.

A registry entry (`BackboneSpec`) maps a short name to an open_clip architecture,
its pretrained tag and the module paths to tap inside `model.visual`:

| name          | open_clip arch | pretrained | taps                                   |
|---------------|----------------|------------|----------------------------------------|
| `clip_rn50x4` | `RN50x4`       | `openai`   | layer1, layer2, layer3, layer4, attnpool |
| `tiny_rn`     | `TinyRN`       | none       | layer1, layer2, layer3, layer4, attnpool |

`clip_rn50x4` is the published pipeline. `tiny_rn` is open_clip's own
ModifiedResNet at layers [1,1,1,1], width 8 and 64 px, shipped here so that tests
and the offline demo run in seconds without weights.

Any other open_clip architecture name (`RN50`, `ViT-B-32`, ...) works too, with
default taps by family: ResNets get layer1-4 plus attnpool, other towers get the
image embedding only. A tap is a module path inside `model.visual`; the special
name `embedding` is the tower's own output.

The paper's other extractors (timm and torchvision models) are in `featuresExtractor.zoo`;
`resolve_spec` and `load_backbone` hand those names to it.

Example:
    >>> spec = resolve_spec("clip_rn50x4")
    >>> spec.arch, spec.taps
    ('RN50x4', ('layer1', 'layer2', 'layer3', 'layer4', 'attnpool'))
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from toolkit.utils import UserError, file_sha256, first_line, require_regular_file

__all__ = [
    "BackboneSpec", "Backbone", "BACKBONES", "EMBEDDING", "resolve_spec", "default_taps",
    "load_backbone", "read_state_dict", "file_sha256", "hf_cache_dir", "cached_weights", "weights_source",
]

#: The tap name that stands for the visual tower's own output (the image embedding).
EMBEDDING = "embedding"

RESNET_TAPS = ("layer1", "layer2", "layer3", "layer4", "attnpool")
_CONFIG_DIR = Path(__file__).parent / "model_configs"


@dataclass(frozen=True)
class BackboneSpec:
    """What to run: an open_clip architecture, a pretrained tag (or None) and taps."""

    name: str
    arch: str
    pretrained: str | None
    taps: tuple[str, ...] | None = None  # None: the family default, decided once the model is built
    library: str = "open_clip"  # or "timm" / "torchvision": built by featuresExtractor.zoo, `arch` is its model name


BACKBONES: dict[str, BackboneSpec] = {
    "clip_rn50x4": BackboneSpec("clip_rn50x4", "RN50x4", "openai", RESNET_TAPS),
    "tiny_rn": BackboneSpec("tiny_rn", "TinyRN", None, RESNET_TAPS),
}


def resolve_spec(name: str, layers: Sequence[str] | None = None, pretrained: str | None = "default") -> BackboneSpec:
    """Return the spec for a registry name or a plain open_clip architecture.

    `layers` overrides the taps. `pretrained` overrides the tag: "default" keeps the
    registry's, "none" or None means random initialisation.
    """
    import open_clip

    from . import zoo

    register_local_configs()
    if name in BACKBONES:
        spec = BACKBONES[name]
    elif name in zoo.ZOO:
        spec = zoo.zoo_spec(name)
    elif name in open_clip.list_models():
        tags = open_clip.list_pretrained_tags_by_model(name)
        spec = BackboneSpec(name, name, "openai" if "openai" in tags else (tags[0] if tags else None))
    elif (other := zoo.other_spec(name)) is not None:
        spec = other
    else:
        raise UserError(
            f"unknown model {name!r}: use one of the paper's names (extract.py --list-models), an open_clip "
            f"architecture, or a timm/torchvision model name (timm:NAME[.TAG], torchvision:NAME)"
        )
    if pretrained != "default":
        spec = replace(spec, pretrained=None if pretrained in (None, "none") else pretrained)
    if layers:
        spec = replace(spec, taps=tuple(layers))
    return spec


def default_taps(visual: nn.Module) -> tuple[str, ...]:
    """Taps by family: ResNet towers give layer1-4 and attnpool, others the embedding."""
    names = dict(visual.named_modules())
    if all(t in names for t in RESNET_TAPS):
        return RESNET_TAPS
    return (EMBEDDING,)


def validate_taps(visual: nn.Module, taps: Sequence[str]) -> None:
    """Fail with the list of valid module paths when a tap does not exist."""
    names = {n for n, _ in visual.named_modules() if n}
    bad = [t for t in taps if t != EMBEDDING and t not in names]
    if bad:
        shown = sorted(names, key=lambda n: (n.count("."), n))
        raise UserError(
            f"unknown tap(s) {bad} in model.visual; valid names: {EMBEDDING}, " + ", ".join(shown)
        )


@dataclass
class Backbone:
    """A loaded visual tower with its eval transform and the facts the manifest needs."""

    spec: BackboneSpec
    visual: nn.Module
    transform: Callable
    weights: dict  # how the weights were obtained: {"source": ..., ...}


def hf_cache_dir() -> str:
    """Where open_clip's pretrained downloads land (the Hugging Face hub cache)."""
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def register_local_configs() -> None:
    import open_clip

    if "TinyRN" not in open_clip.list_models():
        open_clip.add_model_config(_CONFIG_DIR)


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


def _download(spec: BackboneSpec) -> str:
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


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a CLIP checkpoint without unpickling arbitrary objects.

    Accepts a `.safetensors` file, a plain state dict (open_clip's format, optionally under "state_dict"
    and with DataParallel's "module." prefix) read with `weights_only=True`, or an
    OpenAI TorchScript archive (the files OpenAI published), whose tensors are read
    through `torch.jit.load`.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as err:  # truncated or corrupt header, bad offsets
            raise UserError(f"cannot read weights file {path} as safetensors: {first_line(err)}") from None
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            is_script = any(n.split("/", 1)[-1].startswith("code/") for n in zf.namelist())
        if is_script:
            try:
                return dict(torch.jit.load(str(path), map_location="cpu").state_dict())
            except RuntimeError as err:
                raise UserError(f"cannot read TorchScript checkpoint {path}: {first_line(err)}") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, OSError) as err:
        raise UserError(f"cannot read weights file {path} as a state dict: {first_line(err)}") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise UserError(f"{path} does not hold a state dict (found {type(obj).__name__})")
    return {(k[7:] if k.startswith("module.") else k): v for k, v in obj.items()}


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


def weights_source(spec: BackboneSpec, weights: str | os.PathLike | None, fetch: Callable[[BackboneSpec], str],
                   init_seed: int) -> tuple[Path | None, dict]:
    """(file to load or None, the manifest's record of where the weights came from).

    `weights` (a local file) wins; else `fetch(spec)` gives the pretrained tag's file;
    else the model will be randomly initialised from `init_seed`.
    """
    if weights is not None:
        path = Path(weights)
        if not path.exists():
            raise UserError(f"weights file {path}: no such file")
        require_regular_file(path, "weights file")  # a FIFO would block the hash and the read
        return path, {"source": "file", "path": str(path.resolve()), "sha256": file_sha256(path)}
    if spec.pretrained:
        path = Path(fetch(spec))
        return path, {"source": "pretrained", "tag": spec.pretrained, "sha256": file_sha256(path)}
    return None, {"source": "random-init", "seed": int(init_seed),
                  "note": "RANDOMLY INITIALISED backbone: features say nothing about the method"}


@contextlib.contextmanager
def _logging_disabled(level: int):
    previous = logging.root.manager.disable
    logging.disable(max(level, previous))
    try:
        yield
    finally:
        logging.disable(previous)


def load_backbone(spec: BackboneSpec, weights: str | os.PathLike | None = None,
                  device: str | torch.device = "cpu", init_seed: int = 0) -> Backbone:
    """Build the visual tower and its eval transform from one open_clip call.

    Weights come from `weights` (a local open_clip or OpenAI checkpoint, fp16 or fp32,
    read with `weights_only=True`), else from the spec's pretrained tag (downloaded
    into the Hugging Face cache on first use), else the model is randomly initialised.
    The tower is returned in eval mode with gradients off, on `device`. A random
    initialisation is drawn from `init_seed` (without touching the global RNG), so a
    random-init extraction can be reproduced later, e.g. by similarity.py.

    Example:
        >>> bb = load_backbone(resolve_spec("tiny_rn"))
        >>> bb.transform.transforms[0].size
        64
    """
    if spec.library != "open_clip":
        from .zoo import load_zoo_backbone

        return load_zoo_backbone(spec, weights=weights, device=device, init_seed=init_seed)
    import open_clip

    register_local_configs()
    preprocess = {}
    if spec.pretrained:
        cfg = open_clip.get_pretrained_cfg(spec.arch, spec.pretrained) or {}
        # The tag's preprocessing, so a local file is read exactly as the tag would be.
        preprocess = {k: cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in cfg}
    path, source = weights_source(spec, weights, _download, init_seed)

    # open_clip logs its own "initialized randomly" warning; ours is printed by extract.py.
    quiet = logging.WARNING if path is None else logging.NOTSET
    with torch.random.fork_rng(devices=[]), _logging_disabled(quiet):
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
