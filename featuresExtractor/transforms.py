"""Preprocessing and augmentation: image decoding to RGB, and the horizontal flip.

The resize, crop and normalisation come with the model, from open_clip (`backbones.load_backbone` returns the eval transform; for
RN50x4 that is a 288 px bicubic resize of the shortest side, a centre crop and the
OpenAI mean/std), timm or torchvision. The one written here is the paper's own
(`paper_transform`, for `--transform paper`). This module also makes sure every image
reaches the transform as 8-bit RGB, upright, and flips the *preprocessed* tensor for `--data-aug`.

Upright means the EXIF orientation tag is applied (`PIL.ImageOps.exif_transpose`), so a
phone photo is encoded as it is displayed. This is a deliberate difference from the
paper's code, which ignores the tag and encodes such photos sideways; on images without an
orientation tag (the TLL dataset) both decode the same pixels. The manifest records it
(`decode.exif_orientation`).

Example:
    >>> from PIL import Image
    >>> to_rgb(Image.new("I;16", (4, 4), 65535)).getpixel((0, 0))
    (255, 255, 255)
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps

if TYPE_CHECKING:  # decoding is torch-free: ONNX exports (retrieval.deploy) decode images without torch
    import torch

__all__ = ["IMAGE_EXTENSIONS", "DECODE", "TRANSFORMS", "IMAGENET_MEAN", "IMAGENET_STD", "paper_transform", "is_image_file",
           "to_rgb", "load_image", "decode_image", "hflip", "BadImage"]

#: File extensions treated as images; anything else in a dataset folder is ignored.
IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp")


#: How `load_image` decodes, as recorded in the manifest.
DECODE = {"exif_orientation": "applied (PIL.ImageOps.exif_transpose)", "mode": "RGB, alpha composited on white"}


#: `--transform` choices: each library's own eval transform, or the paper's for every non-CLIP model.
TRANSFORMS = ("library", "paper")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def paper_transform():
    """The transform the paper's code gave every non-CLIP model (its transforms.py).

    `ToTensor`, then `Resize([224, 224])` (a squeeze to a square: no crop, the aspect not
    kept) on the tensor, then ImageNet mean and std. The resize is bilinear without
    antialiasing, as torchvision resized tensors when the paper ran (antialias=False was the
    default for tensors before torchvision 0.17).
    """
    from torchvision import transforms as T

    return T.Compose([T.ToTensor(), T.Resize([224, 224], antialias=False), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


class BadImage(Exception):
    """An image that cannot be used (corrupt, truncated, empty, too large)."""


def is_image_file(path: Path) -> bool:
    """True for visible files with an image extension (hidden files like .DS_Store are not)."""
    return not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB.

    Transparent images are composited on white (dropping alpha would expose
    whatever colour the transparent pixels happen to hold). 16-bit and 32-bit
    greyscale are rescaled to 8 bits instead of being clipped at 255.
    """
    if img.mode == "RGB":
        return img
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        a = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") else max(float(a.max()), 1.0)
        if img.mode == "I" and a.max() <= 255:
            top = 255.0
        a = np.clip(a / top * 255.0, 0, 255).round().astype(np.uint8)
        return Image.fromarray(a, mode="L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def load_image(path: str | Path) -> Image.Image:
    """Decode `path` fully into an upright RGB image, or raise `BadImage` with the reason.

    The EXIF orientation is applied (see the module docstring). Pillow's
    decompression-bomb warning is treated as an error, and the image is decoded
    eagerly so a truncated file fails here, not later in a worker.
    """
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise BadImage("empty file (0 bytes)")
    except OSError as err:
        raise BadImage(f"{type(err).__name__}: {err}") from None
    return _decode(path)


def decode_image(data: bytes) -> Image.Image:
    """`load_image` for an image held in memory (an upload): the same checks, the same upright RGB result."""
    if not data:
        raise BadImage("empty file (0 bytes)")
    return _decode(io.BytesIO(data))


def _decode(source: Path | io.BytesIO) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as img:
                img.load()
                return to_rgb(ImageOps.exif_transpose(img))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        # Pillow reports unreadable data as OSError/SyntaxError/ValueError depending on the codec.
        text = str(err).replace(f" {source!r}", "") if isinstance(source, io.BytesIO) else str(err)  # no object repr
        raise BadImage(f"{type(err).__name__}: {text}") from None


def hflip(x: torch.Tensor) -> torch.Tensor:
    """Mirror a preprocessed (..., H, W) tensor left-right."""
    import torch

    return torch.flip(x, dims=(-1,))
