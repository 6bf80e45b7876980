"""An in-memory `VisualSimilarity` for a real backbone, without an extraction or a training run.

The export tests need the three backbones' whole path (taps, normalisation, PCA, adaptation); an
extraction and a training run per backbone would take minutes on the CPU, so the path is assembled
from the same objects `from_run` builds: a `FeatureExtractor`, an adapt-pca `Processor` with a PCA
(centred on drawn images, random orthonormal components: an eigendecomposition of RN50x4's
5440 x 5440 covariance takes minutes here), and an untrained adaptation model.
"""

from __future__ import annotations

import numpy as np
import torch

from adaptation.models import build_model
from retrieval.visual_similarity import VisualSimilarity
from synthetic.drawn_images import render_pair
from featuresExtractor.encode import Encoder
from featuresExtractor.extractor import FeatureExtractor
from featuresExtractor.pca import PCAParams
from featuresExtractor.pooling import concat_parts
from featuresExtractor.processor import AdaptPCA


def drawn(n: int, start: int = 0) -> list:
    """n drawn images (PIL), both sides of consecutive pairs."""
    return [im for i in range(start, start + (n + 1) // 2) for im in render_pair(seed=3, index=i)][:n]


def memory_sim(backbone, n_components: int = 6, fit_images: int = 8, seed: int = 0) -> VisualSimilarity:
    """The run path of `backbone`: adapt-pca N ("layers" normalisation), a PCA centred on drawn images, an
    untrained `original` adaptation model; the manifest holds what `identity` reads."""
    fx = FeatureExtractor(backbone, "fp32", channels_last=False)
    proc = AdaptPCA(n_components, "layers")
    full = concat_parts(fx.pooled(drawn(fit_images, start=50)), proc.normalize, fx.info.embedding)
    rng = np.random.default_rng(seed)
    components = np.linalg.qr(rng.normal(size=(full.shape[1], n_components)))[0].T.astype(np.float32)
    ones = np.ones(n_components, np.float32)
    pca = PCAParams(components, full.mean(axis=0).astype(np.float32), ones, ones / n_components)
    output, stem = f"features_pca{n_components}.npy", f"pca{n_components}"
    spec = backbone.spec
    manifest = {"model": {"name": spec.name, "arch": spec.arch, "pretrained": spec.pretrained, "weights": backbone.weights,
                          "taps": [{"name": t.name, "pooled_dim": t.pooled_dim} for t in fx.info.taps]},
                "outputs": {output: {"dim": n_components}},
                "processor": {"name": proc.name, "n_components": n_components, "normalize": proc.normalize}}
    encoder = Encoder(fx, proc, output, {stem: pca}, manifest)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model("original", n_components).eval()
    return VisualSimilarity(encoder, model, {"threshold": None}, torch.device("cpu"), f"{seed:064d}")
