"""Apply a trained adaptation to new images: embed, score a pair, search a gallery.

A run folder of train.py records the features file it was trained on; beside that
file, extract.py's `manifest.json` and `pca{N}.npz` say how its vectors were made.
`VisualSimilarity.from_run` rebuilds that whole path (backbone, taps, normalisation,
PCA, adaptation), so a new image is treated exactly as the training images were.

Example:
    >>> from adaptation.similarity import VisualSimilarity
    >>> sim = VisualSimilarity.from_run("runs/run1")                    # doctest: +SKIP
    >>> sim.score("cat.jpg", "cloud.jpg")                               # doctest: +SKIP
    0.8123
    >>> [m.name for m in sim.search("cat.jpg", "gallery/", k=3)]        # doctest: +SKIP
    ['cloud.jpg', 'rock.jpg', 'dog.jpg']
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from featuresExtractor.dataset import discover
from featuresExtractor.encode import Encoder
from featuresExtractor.pipeline import read_manifest
from featuresExtractor.transforms import BadImage, load_image
from toolkit.utils import UserError, first_line

from .checkpoint import CHECKPOINT, load_checkpoint

__all__ = ["VisualSimilarity", "Gallery", "Match"]

GALLERY_CHUNK = 64
ImageLike = str | os.PathLike | Image.Image


@dataclass(frozen=True)
class Match:
    """One search result: the gallery item's name, its image (path, if known) and adapted cosine."""

    name: str
    score: float
    image: str | None


@dataclass
class Gallery:
    """Gallery items: names, where their images are (if known), and their raw feature vectors."""

    names: list[str]
    images: list[str | None]
    vectors: np.ndarray  # (n, in_dim), before adaptation
    skipped: dict[str, str]  # unreadable images: name -> reason


class VisualSimilarity:
    """A trained adaptation with the feature extraction it was trained on."""

    def __init__(self, encoder: Encoder, model: torch.nn.Module, checkpoint: dict, device: torch.device):
        self.encoder, self.model, self.checkpoint, self.device = encoder, model, checkpoint, device

    @classmethod
    def from_run(cls, run_dir: str | os.PathLike, device: str | torch.device | None = None,
                 weights: str | os.PathLike | None = None) -> "VisualSimilarity":
        """Load `run_dir/model_and_optimizer.pt` and the extraction its features came from.

        `device` defaults to CUDA when available. `weights` points at the backbone
        checkpoint when the extraction used `--weights` and the file has moved.
        Raises `UserError` for a missing checkpoint, manifest or PCA, or a mismatch.
        """
        run_dir = Path(run_dir)
        ckpt_path = run_dir / CHECKPOINT
        if not ckpt_path.is_file():
            raise UserError(f"no {CHECKPOINT} in {run_dir}: pass a run folder written by train.py, e.g. RUNS/run1")
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model, ckpt = load_checkpoint(ckpt_path, device)
        data = ckpt["config"].get("data")
        if not data:
            raise UserError(f"{ckpt_path} does not record its features file; retrain with this toolkit's train.py")
        encoder = Encoder.from_features_file(data, device=device, weights=weights)
        if encoder.dim != int(ckpt["in_dim"]):
            raise UserError(f"{ckpt_path} expects {ckpt['in_dim']}-d features but {Path(data).name} "
                            f"(via its PCA) gives {encoder.dim}-d ones")
        return cls(encoder, model, ckpt, device)

    def raw(self, images: Sequence[ImageLike]) -> np.ndarray:
        """The features before adaptation, as extract.py would have stored them: (n, in_dim)."""
        return self.encoder.encode(list(images))

    def adapt(self, raw: np.ndarray) -> torch.Tensor:
        """Apply the adaptation to raw feature rows: (n, in_dim) -> (n, out_dim), on the CPU."""
        with torch.inference_mode():
            return self.model(torch.as_tensor(raw, dtype=torch.float32, device=self.device)).float().cpu()

    def embed(self, images: Sequence[ImageLike]) -> torch.Tensor:
        """Adapted vectors for images (paths or PIL images): (n, out_dim), not normalised."""
        return self.adapt(self.raw(images))

    def score(self, a: ImageLike, b: ImageLike) -> float:
        """The adapted cosine similarity of two images (the method's similarity function)."""
        return self.score_raw(self.raw([a, b]))

    def score_raw(self, raw: np.ndarray) -> float:
        """The adapted cosine of two raw feature rows, (2, in_dim) as `raw` returns them."""
        e = self.adapt(raw)
        return float(F.cosine_similarity(e[:1], e[1:], eps=1e-8))

    def gallery(self, source: str | os.PathLike | Sequence[ImageLike]) -> Gallery:
        """A gallery from a folder of images (extracted now), a flat features file, or a list of images."""
        if isinstance(source, (str, os.PathLike)) and Path(source).is_file():
            return self._gallery_file(Path(source))
        if isinstance(source, (str, os.PathLike)):
            layout = discover(source)
            if layout.kind != "flat":
                raise UserError(f"{source} holds left/ and right/: a gallery is a flat folder of images")
            items = [str(layout.path(i, "feature")) for i in range(len(layout))]
        else:
            items = list(source)
        names, images, vectors, skipped = [], [], [], {}
        # Decoded images are large (about 1 MB each at 288 px), so only a chunk is held at a time.
        for start in tqdm(range(0, len(items), GALLERY_CHUNK), desc="gallery", unit="chunk", leave=False,
                          disable=len(items) <= GALLERY_CHUNK):
            decoded = []
            for n, item in enumerate(items[start:start + GALLERY_CHUNK], start=start):
                name = Path(item).name if not isinstance(item, Image.Image) else f"image{n}"
                try:
                    decoded.append(item if isinstance(item, Image.Image) else load_image(item))
                except BadImage as err:
                    skipped[name] = str(err)
                    continue
                names.append(name)
                images.append(None if isinstance(item, Image.Image) else str(item))
            if decoded:
                vectors.append(self.raw(decoded))
        if not names:
            raise UserError("the gallery has no readable image")
        return Gallery(names, images, np.concatenate(vectors), skipped)

    def _gallery_file(self, path: Path) -> Gallery:
        try:
            rec = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as err:  # truncated, pickled or not a .npy at all
            raise UserError(f"cannot read gallery file {path}: {first_line(err)}") from None
        if not isinstance(rec, np.ndarray) or rec.dtype.names is None or "feature" not in rec.dtype.names:
            raise UserError(f"{path} is not a gallery features file (a flat folder extracted by extract.py)")
        mine, theirs = self.encoder.manifest, read_manifest(path)
        same = ("model", "arch", "weights", "taps", "precision")
        diff = [k for k in same if mine["config"].get(k) != theirs["config"].get(k)]
        if diff:
            raise UserError(f"{path} was extracted with another model (differs in {', '.join(diff)}); extract the "
                            f"gallery with the run's settings")
        proc = self.encoder.processor
        if path.name != "features.npy" or theirs["processor"]["normalize"] != proc.normalize \
                or proc.name not in ("adapt", "adapt-pca"):
            raise UserError(f"use the gallery's concatenated features.npy extracted with: -p adapt --normalize "
                            f"{proc.normalize} (this run projects them with its own PCA)")
        rows = rec[~rec["augmented"]]
        vectors = self.encoder.from_concatenation(rows["feature"])
        root = Path(theirs["dataset"]["path"])
        names = [str(n) for n in rows["name"]]
        images = [str(root / n) if (root / n).is_file() else None for n in names]
        return Gallery(names, images, vectors.astype(np.float32), {})

    def search(self, query: ImageLike, gallery: str | os.PathLike | Sequence[ImageLike] | Gallery,
               k: int = 5) -> list[Match]:
        """The k gallery items most similar to `query`, best first (ties: gallery order)."""
        if not isinstance(gallery, Gallery):
            gallery = self.gallery(gallery)
        if not 1 <= k <= len(gallery.names):
            raise UserError(f"k={k} but the gallery has {len(gallery.names)} item(s); use 1 <= k <= {len(gallery.names)}")
        q = self.embed([query])
        scores = F.cosine_similarity(q, self.adapt(gallery.vectors), eps=1e-8)
        order = torch.sort(scores, descending=True, stable=True).indices[:k].tolist()
        return [Match(gallery.names[i], float(scores[i]), gallery.images[i]) for i in order]
