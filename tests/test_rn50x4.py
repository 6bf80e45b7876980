"""The real RN50x4 architecture (random weights): tap shapes, 5440 dims, its own transform."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_pairs
from featuresExtractor.backbones import load_backbone, resolve_spec
from featuresExtractor.extractor import FeatureInfo
from featuresExtractor.pipeline import ExtractConfig, extract


@pytest.fixture(scope="module")
def rn50x4():
    torch.manual_seed(0)
    return load_backbone(resolve_spec("clip_rn50x4", pretrained="none"))


def test_transform_comes_from_open_clip(rn50x4):
    import open_clip

    cfg = open_clip.get_pretrained_cfg("RN50x4", "openai")
    steps = rn50x4.transform.transforms
    normalize = steps[-1]
    assert tuple(normalize.mean) == tuple(cfg["mean"]) and tuple(normalize.std) == tuple(cfg["std"])
    assert steps[0].size == rn50x4.visual.image_size == 288
    assert "bicubic" in str(steps[0].interpolation).lower()
    x = rn50x4.transform(Image.new("RGB", (200, 250), (10, 20, 30)))
    assert x.shape == (3, 288, 288)


def test_tap_shapes_and_5440_dims(rn50x4, tmp_path):
    info = FeatureInfo.probe(rn50x4, (3, 288, 288))
    shapes, dims = info.shapes, info.dims
    assert shapes == {"layer1": (320, 72, 72), "layer2": (640, 36, 36), "layer3": (1280, 18, 18),
                      "layer4": (2560, 9, 9), "attnpool": (640,)}
    assert sum(dims.values()) == 5440
    make_pairs(tmp_path / "tll", 1)
    extract(ExtractConfig(dataset=str(tmp_path / "tll"), save_to=str(tmp_path / "o"), processor=("adapt",),
                          precision="bf16", progress=False), rn50x4)
    rec = np.load(tmp_path / "o" / "clip_rn50x4" / "features.npy")
    assert rec["left"].shape == (1, 5440) and np.isfinite(rec["left"]).all()
    # adapt normalises all five parts: the squared norm of the concatenation is 5
    np.testing.assert_allclose((rec["left"] ** 2).sum(), 5.0, rtol=1e-4)
