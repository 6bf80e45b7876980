"""What every backbone loader shares: the spec and loaded-backbone types, reading a weights file.

A leaf module: the open_clip loader (`featuresExtractor.clip_models`), the timm and
torchvision loader (`featuresExtractor.zoo`) and the registry on top of both
(`featuresExtractor.backbones`) import it; it imports none of them.

Example:
    >>> spec = BackboneSpec("tiny_rn", "TinyRN", None)
    >>> spec.library, spec.taps
    ('open_clip', None)
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from toolkit.hashing import file_sha256
from toolkit.utils import UserError, first_line, require_regular_file

__all__ = ["BackboneSpec", "Backbone", "read_state_dict", "weights_source", "build_and_load", "assignable", "hf_cache_dir",
           "logging_disabled"]


@dataclass(frozen=True)
class BackboneSpec:
    """What to run: an architecture of a library, a pretrained tag (or None) and taps."""

    name: str
    arch: str  # the open_clip architecture, timm model or torchvision builder
    pretrained: str | None
    taps: tuple[str, ...] | None = None  # None: the family default, decided once the model is built
    library: str = "open_clip"  # or "timm" / "torchvision" (built by featuresExtractor.zoo)


@dataclass
class Backbone:
    """A loaded visual tower with its eval transform and the facts the manifest needs."""

    spec: BackboneSpec
    visual: nn.Module
    transform: Callable
    weights: dict  # how the weights were obtained: {"source": ..., ...}
    transform_choice: str = "library"  # `--transform`: "library" or "paper" (see featuresExtractor.transforms)


def hf_cache_dir() -> str:
    """Where open_clip's and timm's pretrained downloads land (the Hugging Face hub cache)."""
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a checkpoint's tensors without unpickling arbitrary objects.

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


def build_and_load(build: Callable[[str], nn.Module], load: Callable[[nn.Module, bool], object]
                   ) -> tuple[nn.Module, object]:
    """(model, what `load` returned): a model built and given its weights, without a random initialisation first.

    `build(device)` builds the model on `device` ("meta" or "cpu"); `load(model, assign)` puts the weights
    in it, by assignment when `assign` (`load_state_dict(..., assign=True)`), by copy otherwise. The model
    is built on the meta device, where parameters take no memory and initialisers do nothing, and the
    weights are assigned. When the weights leave a tensor unset (a classifier a backbone-only file lacks,
    a buffer the model computes when it is built), the model is built again on the CPU, initialised,
    and loaded by copy, as without this shortcut.
    """
    model = build("meta")
    result = load(model, True)
    if not any(t.is_meta for t in itertools.chain(model.parameters(), model.buffers())):
        return model, result
    model = build("cpu")
    return model, load(model, False)


def assignable(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """`state` with each tensor in the dtype of the model's own (what a copy into it would have done).

    `load_state_dict(assign=True)` keeps the file's dtype; an fp16 checkpoint would make an fp16 model.
    """
    own = model.state_dict(keep_vars=True)
    return {k: v.to(own[k].dtype) if k in own and v.is_floating_point() else v for k, v in state.items()}


@contextlib.contextmanager
def logging_disabled(level: int) -> Iterator[None]:
    """Silence log records up to `level` inside the block (the libraries' own "initialised randomly" notes)."""
    previous = logging.root.manager.disable
    logging.disable(max(level, previous))
    try:
        yield
    finally:
        logging.disable(previous)
