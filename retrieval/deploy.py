"""A trained adaptation exported to ONNX, used without torch: the export folder and its onnxruntime encoder.

This module owns the export folder format; it writes, reads and validates it, and imports
neither torch nor open_clip (onnxruntime is imported when a folder is opened):

    DIR/
      encoder.onnx      one graph: preprocessed images (N, 3, H, W) float32 -> the run's adapted,
                        L2-normalised embedding (N, D): backbone, taps, pooling, per-part
                        normalisation, concatenation, PCA, adaptation model
      preprocess.json   the backbone's own eval transform as plain values: resize (the shorter
                        side, or an exact size), interpolation, centre crop, mean, std, decoding
      manifest.json     format, version, the sha256 of encoder.onnx and of preprocess.json (both
                        checked on load: either file's bytes change every score), the run's identity
                        (checkpoint sha256, backbone, weights, taps, PCA, dims), the calibrated
                        threshold, the opset the graph has (read from it), batch, package versions
                        and the export's check

`retrieval.export` makes the folder (it needs torch); `OnnxEncoder.load(DIR)` reads it and
turns images into embeddings through onnxruntime; `retrieval.visual_similarity.VisualSimilarity.from_onnx`
wraps that encoder with the same score / judge / search / embed / index methods as a run.

Example:
    >>> enc = OnnxEncoder.load("rn50x4_onnx")                  # doctest: +SKIP
    >>> enc.encode(["a.jpg", "b.jpg"]).shape                   # doctest: +SKIP
    (2, 128)
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
from PIL import Image

from featuresExtractor.transforms import DECODE, load_image, to_rgb
from toolkit.folders import FolderFormat, by_manifest, check_folder, replacing_folder
from toolkit.lock import sibling_lock
from toolkit.hashing import file_sha256
from toolkit.utils import UserError, first_line, read_json

__all__ = ["FORMAT", "VERSION", "ENCODER_FILE", "PREPROCESS_FILE", "MANIFEST_FILE", "INTERPOLATIONS", "Preprocess",
           "OnnxEncoder", "EXPORT_FOLDER", "read_manifest", "write_meta", "staged", "check_target", "onnxruntime", "EXTRA",
           "GraphLoadError"]

FORMAT = "visual-similarity-onnx"
VERSION = 2
"""2: the manifest records preprocess.json's sha256 too (version 1 exports are refused: export the run again)."""
ENCODER_FILE, PREPROCESS_FILE, MANIFEST_FILE = "encoder.onnx", "preprocess.json", "manifest.json"
EXTRA = "pip install 'adaptation-similarity[export]' (or: pip install onnx onnxruntime onnxscript)"
#: interpolation name (torchvision's InterpolationMode values) -> Pillow resampling filter, as torchvision maps them
INTERPOLATIONS = {"nearest": Image.NEAREST, "nearest-exact": Image.NEAREST, "bilinear": Image.BILINEAR,
                  "bicubic": Image.BICUBIC, "box": Image.BOX, "hamming": Image.HAMMING, "lanczos": Image.LANCZOS}
MAX_SIDE = 8192  # larger resize or crop sizes are taken for a damaged file
EMBED_BATCH = 32  # images per onnxruntime call with a dynamic batch (bounded memory)


def onnxruntime():
    """The onnxruntime module, or a `UserError` naming the extra to install."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise UserError(f"onnxruntime is not installed: {EXTRA}") from None
    return ort


def _side(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_SIDE


@dataclass(frozen=True)
class Preprocess:
    """A backbone's eval transform as plain values, applied with Pillow and numpy (as torchvision does on PIL images).

    Attributes:
        resize: the shorter side after resizing (aspect kept, torchvision's `Resize(int)`), or an exact (h, w).
        interpolation: a key of `INTERPOLATIONS`.
        crop: the centre crop (h, w), the graph's input size.
        mean, std: per-channel normalisation of [0, 1] RGB values.
    """

    resize: int | tuple[int, int]
    interpolation: str
    crop: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def to_dict(self) -> dict:
        """preprocess.json's content (the decoding `load_image` applies is recorded too)."""
        d = asdict(self)
        d["resize"] = self.resize if isinstance(self.resize, int) else list(self.resize)
        return {"format": f"{FORMAT}-preprocess", "version": VERSION, **d, "crop": list(self.crop),
                "mean": list(self.mean), "std": list(self.std), "scale": "1/255", "layout": "NCHW float32 RGB",
                "decode": dict(DECODE)}

    @classmethod
    def from_dict(cls, d: Any, where: str = PREPROCESS_FILE) -> "Preprocess":
        """The inverse of `to_dict`; a `UserError` naming the first missing or absurd value."""
        def bad(key: str, want: str) -> UserError:
            got = d.get(key, "missing") if isinstance(d, dict) else type(d).__name__
            return UserError(f"{where} is damaged: {key} is {got!r}, expected {want}; export the run again")

        if not isinstance(d, dict) or d.get("format") != f"{FORMAT}-preprocess":
            raise bad("format", f"{FORMAT}-preprocess")
        if d.get("version") != VERSION:
            raise bad("version", str(VERSION))
        resize = d.get("resize")
        if not (_side(resize) or (isinstance(resize, list) and len(resize) == 2 and all(map(_side, resize)))):
            raise bad("resize", f"a side or [height, width] in pixels, 1..{MAX_SIDE}")
        if d.get("interpolation") not in INTERPOLATIONS:
            raise bad("interpolation", f"one of {', '.join(INTERPOLATIONS)}")
        crop = d.get("crop")
        if not (isinstance(crop, list) and len(crop) == 2 and all(map(_side, crop))):
            raise bad("crop", f"[height, width] in pixels, 1..{MAX_SIDE}")
        smallest = [resize] * 2 if isinstance(resize, int) else resize
        if crop[0] > smallest[0] or crop[1] > smallest[1]:
            raise bad("crop", f"at most the resized size {resize}")
        for key, lo, hi in (("mean", 0.0, 1.0), ("std", 1e-3, 10.0)):
            v = d.get(key)
            if not (isinstance(v, list) and len(v) == 3 and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                                 and math.isfinite(x) and lo <= x <= hi for x in v)):
                raise bad(key, f"3 numbers in [{lo:g}, {hi:g}]")
        if d.get("decode") != DECODE:
            raise bad("decode", f"{DECODE} (this toolkit's decoding)")
        return cls(resize if isinstance(resize, int) else tuple(resize), d["interpolation"], tuple(crop),
                   tuple(float(x) for x in d["mean"]), tuple(float(x) for x in d["std"]))

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) after the resize; a shorter side as torchvision's `Resize(int)` computes it."""
        if not isinstance(self.resize, int):
            return self.resize[1], self.resize[0]
        short, long = (width, height) if width <= height else (height, width)
        new_long = int(self.resize * long / short)
        return (self.resize, new_long) if width <= height else (new_long, self.resize)

    def __call__(self, img: Image.Image) -> np.ndarray:
        """One RGB PIL image -> (3, crop_h, crop_w) float32, as the backbone's transform gives it."""
        size = self.resized_size(*img.size)
        if size != img.size:
            img = img.resize(size, INTERPOLATIONS[self.interpolation])
        (w, h), (ch, cw) = img.size, self.crop
        top, left = int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0))
        img = img.crop((left, top, left + cw, top + ch))
        x = np.asarray(img, dtype=np.float32) / np.float32(255)
        x = (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(x.transpose(2, 0, 1))

    def batch(self, images: Sequence[str | os.PathLike | Image.Image]) -> np.ndarray:
        """Decode (paths, with `load_image`) and preprocess images into one (n, 3, H, W) float32 array.

        Raises `featuresExtractor.transforms.BadImage` for an unreadable image.
        """
        return np.stack([self(to_rgb(im) if isinstance(im, Image.Image) else load_image(im)) for im in images])


def read_manifest(folder: str | os.PathLike) -> dict:
    """The validated manifest.json of an export folder; a `UserError` says what is wrong."""
    folder = Path(folder)
    path = folder / MANIFEST_FILE
    if not path.is_file():
        raise UserError(f"{folder} is not an ONNX export (no {MANIFEST_FILE}); make one with: "
                        f"similarity.py --run RUN export -o {folder}")
    m = read_json(path)
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise UserError(f"{path} is not an ONNX export manifest (format {FORMAT})")
    if m.get("version") != VERSION:
        raise UserError(f"{folder} is export format version {m.get('version')!r}; this toolkit reads version "
                        f"{VERSION}: export the run again")
    checks = [*((key, isinstance(m.get(key), str) and len(m[key]) == 64, "a sha256")
                for key in ("encoder_sha256", "preprocess_sha256")),
              ("identity", isinstance(m.get("identity"), dict), "a dict"),
              ("embedding_dim", isinstance(m.get("embedding_dim"), int) and not isinstance(m["embedding_dim"], bool)
               and m["embedding_dim"] > 0, "a positive integer"),
              ("batch", m.get("batch") is None or (type(m.get("batch")) is int and m["batch"] == 1), "null (dynamic) or 1"),
              ("threshold", m.get("threshold") is None or isinstance(m.get("threshold"), dict), "null or a dict")]
    for key, ok, want in checks:
        if not ok:
            raise UserError(f"{path} is damaged: {key} is {m.get(key, 'missing')!r}, expected {want}; "
                            f"export the run again")
    return m


def write_meta(folder: Path, preprocess: Preprocess, manifest: dict) -> None:
    """Write preprocess.json and manifest.json (with the format, version and the sha256 of encoder.onnx and
    preprocess.json) into `folder`."""
    (folder / PREPROCESS_FILE).write_text(json.dumps(preprocess.to_dict(), indent=2, sort_keys=True) + "\n")
    manifest = dict(manifest, format=FORMAT, version=VERSION, encoder_sha256=file_sha256(folder / ENCODER_FILE),
                    preprocess_sha256=file_sha256(folder / PREPROCESS_FILE))
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


class GraphLoadError(UserError):
    """onnxruntime refused encoder.onnx (`reason`: its words); the caller knows whether to say "export again"."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


EXPORT_FOLDER = FolderFormat("an ONNX export", (ENCODER_FILE, PREPROCESS_FILE, MANIFEST_FILE),
                             by_manifest(MANIFEST_FILE, FORMAT))
"""The export folder as `toolkit.folders` sees it: the three files it owns, and how one is told."""


def check_target(target: str | os.PathLike, overwrite: bool, flag: str = "-o") -> Path:
    """The real folder an export may be written to (`toolkit.folders.check_folder`); a `UserError` otherwise:
    an existing export without `overwrite`, or a folder holding anything but an export, even with it."""
    return check_folder(target, EXPORT_FOLDER, overwrite=overwrite, flag=flag)


@contextlib.contextmanager
def staged(target: str | os.PathLike, overwrite: bool = False, flag: str = "-o") -> Iterator[Path]:
    """Yield a new folder beside `target` to write an export into; put it in place whole when the block ends well.

    Under `target`'s lock (`toolkit.lock.sibling_lock`) and `toolkit.folders.replacing_folder`: a
    failure (an exception in the block, a full disk, a read-only place) or an interrupt leaves
    `target` as it was and nothing beside it.
    """
    with sibling_lock(target, flag) as real:
        real = check_target(real, overwrite, flag)  # again, under the lock: the export takes minutes
        try:
            with replacing_folder(real, EXPORT_FOLDER, flag) as tmp:
                yield tmp
        except OSError as err:
            raise UserError(f"cannot write {target} ({first_line(err)}); nothing was changed: free some space or "
                            f"choose a writable folder") from None


class OnnxEncoder:
    """An export folder opened with onnxruntime: images in, the run's adapted, L2-normalised embeddings out.

    Attributes:
        folder: the export folder.
        manifest: its validated manifest.json.
        preprocess: its `Preprocess`.
        dim: the embedding dimension.
        batch: the graph's fixed batch size, or None when it takes any.
    """

    def __init__(self, folder: Path, manifest: dict, preprocess: Preprocess, session):
        self.folder, self.manifest, self.preprocess, self.session = folder, manifest, preprocess, session
        self.dim, self.batch = int(manifest["embedding_dim"]), manifest["batch"]
        self._input = session.get_inputs()[0].name

    @classmethod
    def load(cls, folder: str | os.PathLike, threads: int | None = None) -> "OnnxEncoder":
        """Open an export folder: its manifest, preprocess.json and encoder.onnx (both sha256 checked), validated.

        `threads` sets onnxruntime's intra-op threads (default: its own choice). Raises `UserError`
        (`GraphLoadError` when onnxruntime refuses the graph).
        """
        folder = Path(folder)
        manifest = read_manifest(folder)
        for name, key in ((PREPROCESS_FILE, "preprocess_sha256"), (ENCODER_FILE, "encoder_sha256")):
            if not (folder / name).is_file():
                raise UserError(f"{folder} lacks {name}; export the run again")
            if file_sha256(folder / name) != manifest[key]:
                raise UserError(f"{folder / name} is damaged or edited (its sha256 differs from the manifest's); "
                                f"export the run again")
        preprocess = Preprocess.from_dict(read_json(folder / PREPROCESS_FILE), str(folder / PREPROCESS_FILE))
        graph = folder / ENCODER_FILE
        ort = onnxruntime()
        from onnxruntime.capi import onnxruntime_pybind11_state as state

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        try:
            session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
        except (state.Fail, state.InvalidGraph, state.InvalidProtobuf, state.NoSuchFile, state.InvalidArgument,
                state.NotImplemented, state.RuntimeException) as err:
            reason = first_line(err).replace(str(graph), ENCODER_FILE)[:200]
            raise GraphLoadError(f"cannot load {graph} ({reason}); export the run again", reason) from None
        inputs, outputs = session.get_inputs(), session.get_outputs()
        shape = inputs[0].shape if len(inputs) == 1 else None
        if shape is None or len(outputs) != 1 or len(shape) != 4 or list(shape[1:]) != [3, *preprocess.crop] \
                or (isinstance(shape[0], int) and shape[0] != manifest["batch"]):
            raise UserError(f"{graph} takes {shape} but {PREPROCESS_FILE} gives [N, 3, {preprocess.crop[0]}, "
                            f"{preprocess.crop[1]}] (batch {manifest['batch'] or 'any'}); export the run again")
        return cls(folder, manifest, preprocess, session)

    def run(self, x: np.ndarray) -> np.ndarray:
        """Preprocessed images (n, 3, H, W) float32 -> (n, dim) float32 embeddings, in batches the graph takes."""
        step = self.batch or EMBED_BATCH  # a fixed batch is 1 (retrieval.export)
        out = [self.session.run(None, {self._input: np.ascontiguousarray(x[s:s + step], dtype=np.float32)})[0]
               for s in range(0, len(x), step)]
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)

    def encode(self, images: Sequence[str | os.PathLike | Image.Image]) -> np.ndarray:
        """(n, dim) float32 adapted, L2-normalised embeddings of images (paths or PIL images).

        Raises `featuresExtractor.transforms.BadImage` for an unreadable image.
        """
        images = list(images)
        if not images:
            return np.zeros((0, self.dim), np.float32)
        return self.run(self.preprocess.batch(images)).astype(np.float32)

    def identity(self) -> dict:
        """What an index built with this export depends on: the run's identity plus this graph's sha256.

        The `encoder` entry differs from a run's (which has none), so an index built here is refused
        with the run's torch path and the other way round: their vectors agree only to the check's figure.
        """
        return {**self.manifest["identity"], "encoder": {"runtime": "onnxruntime",
                                                         "sha256": self.manifest["encoder_sha256"]}}
