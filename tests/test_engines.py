"""The folded engine (batch norms folded into the convolutions): equal to torch's within rounding, chosen by auto
only where it was measured to win, and the module given back as it was."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

import extract
from conftest import make_pairs, run_script
from featuresExtractor.backbones import load_backbone, resolve_spec
from featuresExtractor.engines import (FOLDED_WINS, ONNXRUNTIME_MIN_IMAGES, ONNXRUNTIME_WINS, conv_bn_pairs,
                                      fold_batch_norms, folded_batch_norms, resolve_engine)
from featuresExtractor.extractor import FeatureExtractor
from toolkit.hardware import CpuKind
from toolkit.utils import UserError


@pytest.fixture(scope="module")
def backbone():
    """tiny_rn with batch norms that do something (random init leaves them near the identity)."""
    bb = load_backbone(resolve_spec("tiny_rn", pretrained="none"))
    gen = torch.Generator().manual_seed(0)
    for m in bb.visual.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.randn(m.num_features, generator=gen))
            m.bias.data.copy_(torch.randn(m.num_features, generator=gen))
    return bb.visual.eval() and bb


def _slow_conv_bn(conv, bn, x):
    """The obviously correct pair: the convolution, then the batch norm's formula written out."""
    y = torch.nn.functional.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    shape = (1, -1, 1, 1)
    return ((y - bn.running_mean.view(shape)) / torch.sqrt(bn.running_var.view(shape) + bn.eps)
            * bn.weight.view(shape) + bn.bias.view(shape))


def test_a_folded_pair_equals_the_conv_then_the_norm(backbone):
    visual = copy.deepcopy(backbone.visual)
    conv, bn = visual.get_submodule("layer1.0.conv2"), visual.get_submodule("layer1.0.bn2")
    x = torch.randn(2, conv.in_channels, 9, 9, dtype=torch.float64)
    with torch.no_grad():
        want = _slow_conv_bn(conv.double(), bn.double(), x)
        replaced = fold_batch_norms(visual.double())
        got = visual.get_submodule("layer1.0.conv2")(x)
    assert "layer1.0.bn2" in replaced and isinstance(visual.get_submodule("layer1.0.bn2"), torch.nn.Identity)
    assert torch.allclose(got, want, atol=1e-10)


def test_every_norm_after_a_conv_is_found():
    bb = load_backbone(resolve_spec("tiny_rn", pretrained="none"))
    norms = {n for n, m in bb.visual.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert {b for _, b in conv_bn_pairs(bb.visual)} == norms


def test_folded_features_match_torch_and_the_module_is_given_back(backbone):
    before = {k: v.clone() for k, v in backbone.visual.state_dict().items()}
    images = torch.randn(6, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    out = {}
    for engine in ("torch", "folded"):
        fx = FeatureExtractor(backbone, "fp32", channels_last=True, engine=engine)
        with fx.running() as forward:
            out[engine] = forward(images)
    for tap, ref in out["torch"].items():
        cos = torch.nn.functional.cosine_similarity(ref.double(), out["folded"][tap].double(), dim=1)
        assert cos.min() > 0.9999, tap
        assert torch.allclose(ref, out["folded"][tap], rtol=1e-4, atol=1e-5), tap
    after = backbone.visual.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_a_tapped_norm_is_not_folded(backbone):
    visual = copy.deepcopy(backbone.visual)
    with folded_batch_norms(visual, keep=["layer1.0.bn2"]):
        assert isinstance(visual.get_submodule("layer1.0.bn2"), torch.nn.BatchNorm2d)
        assert isinstance(visual.get_submodule("layer1.0.bn1"), torch.nn.Identity)
    assert isinstance(visual.get_submodule("layer1.0.bn1"), torch.nn.BatchNorm2d)


def test_auto_takes_folded_only_where_it_won():
    avx2 = CpuKind.from_values({"avx2"}, capability="AVX2")
    capped = CpuKind.from_values({"avx2", "avx512f", "avx512_bf16"}, capability="AVX2", onednn_cap="AVX2")
    for kind in (avx2, capped):
        expected = "folded" if kind.kernels in FOLDED_WINS else "torch"
        engine, note = resolve_engine("auto", "cpu", "fp32", kind)
        assert engine == expected and (note is not None) == (expected == "folded")
    bf16 = CpuKind.from_values({"avx2", "avx512f", "avx512_bf16"}, capability="AVX512")
    assert resolve_engine("auto", "cpu", "bf16", avx2) == ("torch", None)  # measured in fp32 only
    assert resolve_engine("auto", "cuda", "fp32", bf16) == ("torch", None)
    assert resolve_engine("folded", "cpu", "bf16", bf16) == ("folded", None)
    assert resolve_engine("torch", "cpu", "fp32", avx2) == ("torch", None)


def test_auto_takes_onnxruntime_where_it_won_when_installed_and_worth_its_build():
    avx512 = CpuKind.from_values({"avx2", "avx512f", "avx512_bf16"}, capability="AVX512")
    assert avx512.kernels in ONNXRUNTIME_WINS
    installed, absent = (lambda: None), (lambda: "onnxscript")
    engine, note = resolve_engine("auto", "cpu", "fp32", avx512, n_images=ONNXRUNTIME_MIN_IMAGES, missing=installed)
    assert engine == "onnxruntime" and note.startswith("engine auto -> onnxruntime") and "cached in" in note
    assert resolve_engine("auto", "cpu", "fp32", avx512, n_images=None, missing=installed)[0] == "onnxruntime"
    fallback = "folded" if avx512.kernels in FOLDED_WINS else "torch"
    engine, note = resolve_engine("auto", "cpu", "fp32", avx512, n_images=ONNXRUNTIME_MIN_IMAGES - 1, missing=installed)
    assert engine == fallback and (note is None) == (fallback == "torch")  # a small run: nothing worth a line
    engine, note = resolve_engine("auto", "cpu", "fp32", avx512, n_images=10_000, missing=absent)
    assert engine == fallback and "onnxscript is not installed" in note and "[export]" in note
    assert resolve_engine("auto", "cpu", "bf16", avx512, missing=installed) == ("torch", None)
    avx2 = CpuKind.from_values({"avx2"}, capability="AVX2")  # no figure for onnxruntime on AVX2: not taken
    assert resolve_engine("auto", "cpu", "fp32", avx2, n_images=10_000, missing=installed)[0] != "onnxruntime"


@pytest.mark.parametrize("precision, device, missing, said", [
    ("bf16", "cpu", None, "runs fp32 on the CPU"), ("fp32", "cuda", None, "runs fp32 on the CPU"),
    ("fp32", "cpu", "onnxruntime", "needs the package onnxruntime")])
def test_an_impossible_onnxruntime_engine_is_one_line(precision, device, missing, said):
    with pytest.raises(UserError, match=said):
        resolve_engine("onnxruntime", device, precision, missing=lambda: missing)


def test_extract_refuses_onnxruntime_in_bf16_before_any_work(tmp_path, capsys):
    data = tmp_path / "tll"
    make_pairs(data, 1)
    code, _, err = run_script(extract, ["-d", data, "-s", tmp_path / "out", "--model", "tiny_rn", "--pretrained", "none",
                                        "--engine", "onnxruntime", "--precision", "bf16"], capsys)
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("extract.py: warning")]
    assert code == 2 and len(lines) == 1 and "--engine onnxruntime runs fp32" in lines[0], err
    assert not (tmp_path / "out").exists()


def test_extract_engine_folded_is_recorded_and_close_to_torch(tmp_path, capsys):
    data = tmp_path / "tll"
    make_pairs(data, 3, seed=2)
    vectors = {}
    for engine in ("torch", "folded"):
        out = tmp_path / engine
        code, _, err = run_script(extract, ["-d", data, "-s", out, "-p", "adapt", "--model", "tiny_rn", "--pretrained",
                                            "none", "--workers", "0", "--no-progress", "--engine", engine], capsys)
        assert code == 0, err
        assert json.loads((out / "tiny_rn" / "manifest.json").read_text())["engine"] == engine
        vectors[engine] = np.load(out / "tiny_rn" / "features.npy")
    for side in ("left", "right"):
        a, b = vectors["torch"][side].astype(np.float64), vectors["folded"][side].astype(np.float64)
        cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        assert cos.min() > 0.9999
