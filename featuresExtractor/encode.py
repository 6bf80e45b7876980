"""Encode new images exactly as an earlier extraction encoded its dataset.

`Encoder.from_features_file(path)` reads the `manifest.json` beside a features file
written by extract.py, rebuilds the same backbone (weights, taps, precision), and
loads the same PCA. `Encoder.encode(images)` then returns, for any image, the vector
that extract.py would have stored for it in that file: same decoding, transform,
pooling, normalisation and projection (through `Processor.project`).

Example:
    >>> enc = Encoder.from_features_file("out/clip_rn50x4/features_pca256.npy")   # doctest: +SKIP
    >>> enc.encode(["a.jpg", "b.jpg"]).shape                                       # doctest: +SKIP
    (2, 256)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from toolkit.utils import UserError

from toolkit.hashing import file_sha256

from .backbone_base import Backbone
from .backbones import load_backbone, resolve_spec
from .extractor import CPU_SLICE, FeatureExtractor
from .pca import PCAParams, load_pca
from .manifest import check_output, read_manifest, transform_choice
from .processor import CONCATENATION, Processor

__all__ = ["Encoder", "model_taps"]


@dataclass
class Encoder:
    """A feature extractor plus the processing of one features file: images in, that file's vectors out."""

    extractor: FeatureExtractor
    processor: Processor
    output: str  # the features file name whose vectors `encode` reproduces
    pcas: dict[str, PCAParams]
    manifest: dict

    @property
    def backbone(self) -> Backbone:
        return self.extractor.backbone

    @property
    def dim(self) -> int:
        return int(self.manifest["outputs"][self.output]["dim"])

    @classmethod
    def from_features_file(cls, features_path: str | os.PathLike, device: str | torch.device = "cpu",
                           weights: str | os.PathLike | None = None) -> "Encoder":
        """Rebuild the extraction behind `features_path` (a file extract.py wrote).

        `weights` overrides where a file-based checkpoint is now (its sha256 must
        match the manifest's).
        """
        features_path = Path(features_path)
        manifest = read_manifest(features_path)
        info = manifest["outputs"].get(features_path.name)
        if not info or info.get("kind") != "features":
            raise UserError(f"{features_path.name} is not a features file listed in its manifest")
        model = manifest["model"]
        spec = resolve_spec(model["name"], model_taps(manifest), pretrained=model["pretrained"] or "none")
        if (model.get("library", "open_clip"), model.get("identifier", model["arch"])) != (spec.library, spec.arch):
            raise UserError(f"--model {model['name']} now means {spec.library} {spec.arch}, but the features were "
                            f"extracted with {model.get('library', 'open_clip')} {model.get('identifier', model['arch'])}")
        source = model["weights"]
        if source["source"] == "file":
            path = Path(weights or source["path"])
            if not path.is_file():
                raise UserError(f"the extraction used weights {source['path']}, which is gone; pass the file again")
            if file_sha256(path) != source["sha256"]:
                raise UserError(f"{path} is not the weights file the features were extracted with (sha256 differs)")
            backbone = load_backbone(spec, weights=path, device=device, transform=transform_choice(manifest))
        else:
            backbone = load_backbone(spec, device=device, init_seed=int(source.get("seed", 0)),
                                     transform=transform_choice(manifest))
            if source.get("sha256") and backbone.weights.get("sha256") not in (None, source["sha256"]):
                raise UserError(f"the cached {spec.arch} '{spec.pretrained}' weights differ from the extraction's")
        proc = Processor.from_record(manifest["processor"])
        base = features_path.parent
        pcas = {}
        for stem in proc.pca_stems(spec.taps):
            pcas[stem] = load_pca(base / f"{stem}.npz")
            check_output(manifest, base, f"{stem}.npz")  # the PCA extract.py fitted, not one edited since
        extractor = FeatureExtractor(backbone, manifest.get("precision", "fp32"), bool(manifest.get("channels_last", True)))
        return cls(extractor, proc, features_path.name, pcas, manifest)

    def pooled(self, images: Sequence[str | os.PathLike | Image.Image], batch_size: int = CPU_SLICE) -> dict[str, np.ndarray]:
        """Tap -> (n, dim) pooled vectors for images (paths or PIL images), unflipped."""
        return self.extractor.pooled(images, slice_size=batch_size)

    @property
    def concatenation_dim(self) -> int:
        """The width of the concatenated vectors (`features.npy`) of this extraction."""
        return int(sum(t["pooled_dim"] for t in self.manifest["model"]["taps"]))

    def from_concatenation(self, full: np.ndarray) -> np.ndarray:
        """This encoder's vectors from rows of an `adapt`/`adapt-pca` `features.npy` (the concatenation)."""
        if not self.processor.concatenates:
            raise UserError(f"a {self.processor.name} extraction has no concatenated features to start from")
        if self.output == CONCATENATION:
            return np.asarray(full, dtype=np.float32)
        (stem,) = self.processor.pca_stems(self.backbone.spec.taps)
        return self.pcas[stem].transform(full)

    def encode(self, images: Sequence[str | os.PathLike | Image.Image]) -> np.ndarray:
        """(n, dim) float32 vectors, as the features file holds them, for `images`.

        Raises `featuresExtractor.transforms.BadImage` for an unreadable image.
        """
        vectors = self.processor.project(self.pooled(images), self.extractor.info.embedding, self.pcas)
        return vectors[self.output].astype(np.float32)


def model_taps(manifest: dict) -> list[str]:
    """The tap names an extraction's manifest records, in order."""
    return [t["name"] for t in manifest["model"]["taps"]]
