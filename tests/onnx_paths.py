"""An in-memory `VisualSimilarity` for a real backbone, without an extraction or a training run.

The export tests need the three backbones' whole path (taps, normalisation, PCA, adaptation); an
extraction and a training run per backbone would take minutes on the CPU, so the path is assembled
from the same objects `from_run` builds: a `FeatureExtractor`, an adapt-pca `Processor` with a PCA
fitted on drawn images, and an untrained adaptation model.
"""

from __future__ import annotations

import numpy as np
import torch

from adaptation.models import build_model
from adaptation.similarity import VisualSimilarity
from featuresExtractor.drawn_images import render_pair
from featuresExtractor.encode import Encoder
from featuresExtractor.extractor import FeatureExtractor
from featuresExtractor.pca import PCAParams, StreamingPCA
from featuresExtractor.pooling import concat_parts
from featuresExtractor.processor import Processor


def drawn(n: int, start: int = 0) -> list:
    """n drawn images (PIL), both sides of consecutive pairs."""
    return [im for i in range(start, start + (n + 1) // 2) for im in render_pair(seed=3, index=i)][:n]


def memory_sim(backbone, n_components: int = 6, fit_images: int = 8, seed: int = 0) -> VisualSimilarity:
    """The run path of `backbone`: adapt-pca N ("layers" normalisation), PCA fitted on drawn images, an
    untrained `original` adaptation model; the manifest holds what `identity` reads."""
    fx = FeatureExtractor(backbone, "fp32", channels_last=False)
    proc = Processor("adapt-pca", n_components, "layers")
    pooled = fx.pooled(drawn(fit_images, start=50))
    fit = StreamingPCA(sum(fx.info.dims.values()), n_components)
    fit.update(concat_parts(pooled, proc.normalize, fx.info.embedding))
    output, stem = f"features_pca{n_components}.npy", f"pca{n_components}"
    spec = backbone.spec
    manifest = {"model": {"name": spec.name, "arch": spec.arch, "pretrained": spec.pretrained, "weights": backbone.weights,
                          "taps": [{"name": t.name, "pooled_dim": t.pooled_dim} for t in fx.info.taps]},
                "outputs": {output: {"dim": n_components}},
                "processor": {"name": proc.name, "n_components": n_components, "normalize": proc.normalize}}
    encoder = Encoder(fx, proc, output, {stem: PCAParams.from_sklearn(fit.fit())}, manifest)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model("original", n_components).eval()
    return VisualSimilarity(encoder, model, {"threshold": None}, torch.device("cpu"), f"{seed:064d}")
