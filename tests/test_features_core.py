"""Pure pieces of the extractor: pooling, normalisation, taps, transforms, PCA file."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from featuresExtractor.pca import PCAParams, fit_pca, load_pca, save_pca
from featuresExtractor.pooling import concat_parts, global_avg_pool, l2_normalize, part_slices
from featuresExtractor.taps import Taps
from featuresExtractor.transforms import BadImage, hflip, load_image, to_rgb
from toolkit.utils import UserError


def test_global_avg_pool_matches_naive_loop():
    x = torch.randn(3, 5, 4, 6)
    naive = torch.tensor([[float(sum(x[n, c, i, j] for i in range(4) for j in range(6)) / 24) for c in range(5)]
                          for n in range(3)])
    assert torch.allclose(global_avg_pool(x), naive, atol=1e-5)
    tokens = torch.randn(2, 7, 4)
    assert torch.allclose(global_avg_pool(tokens), tokens.mean(1))
    vec = torch.randn(2, 4)
    assert torch.equal(global_avg_pool(vec), vec)
    with pytest.raises(ValueError):
        global_avg_pool(torch.randn(2))


def test_l2_normalize_matches_naive_and_keeps_zero_rows():
    x = np.array([[3.0, 4.0], [0.0, 0.0], [1.0, 0.0]], dtype=np.float32)
    naive = [[v / (sum(u * u for u in row) ** 0.5 or 1.0) for v in row] for row in x.tolist()]
    np.testing.assert_allclose(l2_normalize(x), naive, atol=1e-7)
    np.testing.assert_allclose(l2_normalize(torch.from_numpy(x)).numpy(), naive, atol=1e-7)


def test_concat_parts_normalisation_modes():
    rng = np.random.default_rng(0)
    parts = {"layer1": rng.normal(size=(4, 3)) * 10, "attnpool": rng.normal(size=(4, 5)) * 10}
    full = concat_parts(parts, "all", "attnpool")
    layers = concat_parts(parts, "layers", "attnpool")
    none = concat_parts(parts, "none", "attnpool")
    assert full.shape == layers.shape == none.shape == (4, 8) and full.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(full[:, :3], axis=1), 1, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(full[:, 3:], axis=1), 1, rtol=1e-5)
    np.testing.assert_allclose(layers[:, :3], full[:, :3])
    np.testing.assert_allclose(layers[:, 3:], parts["attnpool"], rtol=1e-6)  # embedding left raw
    np.testing.assert_allclose(none, np.concatenate([parts["layer1"], parts["attnpool"]], 1), rtol=1e-6)
    assert part_slices({"layer1": 3, "attnpool": 5}) == {"layer1": (0, 3), "attnpool": (3, 8)}
    with pytest.raises(ValueError):
        concat_parts(parts, "sometimes")


def test_taps_order_hooks_removed_and_embedding_equals_model_output(tiny_backbone):
    visual = tiny_backbone.visual
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        expected = visual(x)
        with Taps(visual, ["attnpool", "layer2", "embedding"]) as taps:
            out = taps(x)
        assert list(out) == ["attnpool", "layer2", "embedding"]
        assert out["layer2"].shape == (2, 64, 8, 8)
        torch.testing.assert_close(out["attnpool"], expected, rtol=0, atol=0)
        torch.testing.assert_close(out["embedding"], expected, rtol=0, atol=0)
    assert not visual._forward_hooks and all(not m._forward_hooks for m in visual.modules())


def test_tapped_embedding_equals_clip_encode_image():
    import open_clip

    from featuresExtractor.clip_models import register_local_configs

    register_local_configs()
    torch.manual_seed(1)
    model = open_clip.create_model("TinyRN").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode(), Taps(model.visual, ["attnpool"], reduce=global_avg_pool) as taps:
        tapped = taps(x)["attnpool"]
        torch.testing.assert_close(tapped, model.encode_image(x), rtol=0, atol=0)


def test_wrong_tap_lists_valid_names(tiny_backbone):
    with pytest.raises(UserError) as err:
        Taps(tiny_backbone.visual, ["layer9"])
    msg = str(err.value)
    assert "layer9" in msg and "layer1" in msg and "attnpool" in msg and "embedding" in msg


def test_taps_must_be_entered(tiny_backbone):
    with pytest.raises(RuntimeError):
        Taps(tiny_backbone.visual, ["layer1"])(torch.zeros(1, 3, 64, 64))


@pytest.mark.parametrize("mode", ["L", "RGBA", "LA", "P", "CMYK", "I;16", "I", "F", "1", "RGB"])
def test_to_rgb_handles_every_mode(mode):
    img = Image.new("RGB", (8, 6), (200, 100, 50)).convert(mode)
    out = to_rgb(img)
    assert out.mode == "RGB" and out.size == (8, 6)


def test_to_rgb_composites_alpha_on_white_and_rescales_16_bit():
    transparent = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert to_rgb(transparent).getpixel((0, 0)) == (255, 255, 255)
    half = Image.new("I;16", (4, 4), 32768)
    assert to_rgb(half).getpixel((0, 0))[0] == 128  # not clipped to 255
    pal = Image.new("P", (4, 4), 0)
    pal.info["transparency"] = 0
    assert to_rgb(pal).getpixel((0, 0)) == (255, 255, 255)


def test_load_image_rejects_bad_files(tmp_path, monkeypatch):
    from conftest import draw_image

    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"this is not an image at all" * 10)
    good = draw_image(tmp_path / "good.jpg", 0, size=(64, 64))
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    for path in (empty, garbage, truncated):
        with pytest.raises(BadImage):
            load_image(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 64*64 is a "bomb" now
    with pytest.raises(BadImage, match="DecompressionBomb"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            load_image(good)


def test_hflip_mirrors_width_axis():
    x = torch.arange(24.0).reshape(1, 2, 3, 4)
    flipped = hflip(x)
    assert torch.equal(flipped[..., 0], x[..., 3]) and torch.equal(hflip(flipped), x)


def test_pca_file_round_trip_matches_sklearn(tmp_path):
    import pickle

    rng = np.random.default_rng(0)
    x = (rng.normal(size=(60, 12)) @ rng.normal(size=(12, 12))).astype(np.float32)
    pca = fit_pca(x, 5)
    paths = save_pca(tmp_path / "pca5", pca)
    assert [p.name for p in paths] == ["pca5.npz", "pca5.pkl"]
    params = load_pca(tmp_path / "pca5.npz")
    assert params.n_components == 5 and params.in_dim == 12
    np.testing.assert_allclose(params.transform(x), pca.transform(x), rtol=1e-4, atol=1e-4)
    again = PCAParams.from_sklearn(fit_pca(x, 5))
    np.testing.assert_array_equal(again.components_, params.components_)  # deterministic
    from sklearn.decomposition import PCA

    svd = PCA(n_components=5, svd_solver="full").fit(x)  # the solver choice changes nothing but rounding
    np.testing.assert_allclose(np.abs(svd.components_ @ params.components_.T), np.eye(5), atol=1e-3)
    np.testing.assert_allclose(svd.transform(x), params.transform(x), rtol=1e-3, atol=1e-3)
    with open(paths[1], "rb") as fh:  # trusted: we wrote it
        np.testing.assert_allclose(pickle.load(fh).transform(x), pca.transform(x))
    (tmp_path / "bad.npz").write_bytes(b"")
    np.savez(tmp_path / "other.npz", a=np.zeros(2))
    with pytest.raises(UserError, match="not a PCA file"):
        load_pca(tmp_path / "other.npz")
    with pytest.raises(UserError, match="missing"):
        load_pca(tmp_path / "nope.npz")


def test_truncated_pca_and_weights_files_give_user_errors(tmp_path):
    from featuresExtractor.backbone_base import read_state_dict

    x = np.random.default_rng(1).normal(size=(20, 6)).astype(np.float32)
    save_pca(tmp_path / "pca3", fit_pca(x, 3))
    torch.save({"visual.w": torch.ones(8, 8)}, tmp_path / "w.pt")
    for source, loader in ((tmp_path / "pca3.npz", load_pca), (tmp_path / "w.pt", read_state_dict)):
        data = source.read_bytes()
        for cut in range(0, len(data), max(1, len(data) // 40)):
            broken = tmp_path / f"broken{source.suffix}"
            broken.write_bytes(data[:cut])
            with pytest.raises(UserError):
                loader(broken)


@pytest.mark.parametrize("model,prefix", [("tiny_rn", "visual."), ("resnet18", "")])
def test_weights_from_a_file_are_assigned_to_a_model_never_initialised(tmp_path, monkeypatch, model, prefix):
    from featuresExtractor.backbones import load_backbone, resolve_spec

    donor = load_backbone(resolve_spec(model, pretrained="none"), init_seed=4).visual
    torch.save({prefix + k: v.half() if v.is_floating_point() else v for k, v in donor.state_dict().items()},
               tmp_path / "w.pt")
    on_meta = []
    for name in ("normal_", "uniform_", "kaiming_normal_", "kaiming_uniform_", "zeros_", "ones_", "constant_"):
        def spy(tensor, *a, _real=getattr(torch.nn.init, name), **k):
            on_meta.append(tensor.is_meta)
            return _real(tensor, *a, **k)
        monkeypatch.setattr(torch.nn.init, name, spy)
    loaded = load_backbone(resolve_spec(model), weights=tmp_path / "w.pt").visual
    assert on_meta and all(on_meta)  # the builders ran their initialisers, on meta tensors only
    got, want = loaded.state_dict(), donor.state_dict()
    assert got.keys() == want.keys()
    for k, v in want.items():  # the file's fp16 values, in the model's own dtype
        assert got[k].dtype == v.dtype and not got[k].is_meta, k
        assert torch.equal(got[k], v.half().to(v.dtype) if v.is_floating_point() else v), k


def test_tap_shapes_on_the_meta_device_equal_a_real_forward(tiny_backbone):
    from featuresExtractor.taps import tap_infos

    names = list(tiny_backbone.spec.taps) + ["embedding"]
    assert tap_infos(tiny_backbone.visual, names, (3, 64, 64)) == \
        tap_infos(tiny_backbone.visual, names, (3, 64, 64), meta=False)
