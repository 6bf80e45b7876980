"""The backbone zoo: the paper's 37 names, their taps, transforms and weights, on small random-init members."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from conftest import ROOT, make_pairs
from featuresExtractor.backbones import EMBEDDING, load_backbone, resolve_spec
from featuresExtractor.pipeline import ExtractConfig, extract
from featuresExtractor.pooling import global_avg_pool
from featuresExtractor.taps import Taps
from toolkit.utils import UserError
from toolkit.cli import run_cli
from featuresExtractor.zoo import FILE_ONLY, ZOO, list_models, load_zoo_backbone, probe_dims, zoo_spec, zoo_table

# The paper's models.py keys (resnext101_32x8d_ssl is defined twice there, so 37 keys).
PAPER_NAMES = [
    "clip_rn50", "clip_rn101", "clip_rn50x4", "clip_vit32_b",
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "alexnet",
    "efficientnet_b0", "efficientnet_b1", "efficientnet_b2", "efficientnet_b3",
    "BiT-M-R50x1_in21k", "BiT-M-R50x3_in21k", "BiT-M-R101x1_in21k", "BiT-M-R101x3_in21k", "BiT-M-R152x2_in21k",
    "BiT-M-R152x4_in21k", "ViT",
    "resnet50_swsl", "resnext101_32x8d_swsl", "resnext101_32x16d_swsl", "resnet50_ssl", "resnext101_32x8d_ssl",
    "resnext101_32x8d_wsl", "resnext101_32x16d_wsl", "resnext101_32x32d_wsl", "resnext101_32x48d_wsl",
    "barlow", "dino_resnet50", "dino_vitb16", "dino_vitb8", "deits16", "deits8", "facenet",
]


def _x(size: int = 64, n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))


def _taps(bb, x) -> dict[str, torch.Tensor]:
    with Taps(bb.visual, bb.spec.taps) as taps, torch.inference_mode():
        return dict(taps(x))


# ------------------------------------------------------------------ the registry itself

def test_the_37_names_map_to_tags_the_installed_libraries_know():
    import open_clip
    import timm
    import torchvision

    assert list(ZOO) == PAPER_NAMES
    pretrained = set(timm.list_pretrained())
    for e in ZOO.values():
        if e.library == "timm":
            assert f"{e.identifier}.{e.tag}" in pretrained, e.name
        elif e.library == "torchvision":
            assert e.identifier in torchvision.models.list_models(), e.name
            if e.tag != FILE_ONLY:
                assert torchvision.models.get_weight(e.tag).url, e.name
        elif e.library == "open_clip":
            assert (e.identifier, e.tag) in open_clip.list_pretrained(), e.name
        else:
            assert e.note and e.alternative, e.name
        assert e.library == "" or e.taps, e.name
    # The paper ran the 32x16d model under its second resnext101_32x8d_ssl key.
    assert ZOO["resnext101_32x8d_ssl"].identifier == "resnext101_32x16d"


def test_names_without_an_equivalent_say_why_and_what_instead():
    for name in ("facenet", "resnext101_32x48d_wsl"):
        with pytest.raises(UserError, match="no maintained equivalent") as err:
            resolve_spec(name)
        assert ZOO[name].alternative in str(err.value)
    with pytest.raises(UserError, match="--weights") as err:
        load_backbone(resolve_spec("barlow"))
    assert "dl.fbaipublicfiles.com/barlowtwins" in str(err.value)


def test_docs_table_is_generated_from_the_registry():
    import featuresExtractor.zoo as zoo

    table = zoo_table()
    assert table in zoo.__doc__
    assert len(table.splitlines()) == 2 + 37
    counts = {s: sum(e.status == s for e in ZOO.values()) for s in ("available", "weights file only", "unavailable")}
    assert counts == {"available": 33, "weights file only": 2, "unavailable": 2}
    readme = (ROOT / "README.md").read_text()
    assert f"{counts['available']} names are available" in " ".join(readme.split())
    page = (ROOT / "docs" / "featuresExtractor" / "zoo.html").read_text()
    for name in PAPER_NAMES:
        assert f"<code>{name}</code>" in page, name


def test_list_models_cli_prints_every_name_with_dims_and_cache_state(capsys, monkeypatch, tmp_path):
    import extract

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    assert run_cli(extract.main, ["--list-models"]) == 0
    out = capsys.readouterr().out
    for name in PAPER_NAMES + ["tiny_rn"]:
        assert any(line.startswith(name + " ") for line in out.splitlines()), name
    assert "taps: layer1 64, layer2 128, layer3 256, layer4 512" in out  # resnet18
    assert "taps: head_drop 768" in out  # ViT-B/16 pre-logits
    assert "not cached" in out and "unavailable" in out and "facenet-pytorch" in out


# ------------------------------------------------------------------ one small member per family

def test_torchvision_resnet_taps_final_features_and_transform():
    from torchvision.models import ResNet18_Weights
    from torchvision.models.feature_extraction import create_feature_extractor

    bb = load_backbone(resolve_spec("resnet18", pretrained="none"))
    assert bb.spec.library == "torchvision" and bb.weights["source"] == "random-init"
    x = _x()
    out = _taps(bb, x)
    ref = create_feature_extractor(bb.visual, {**{t: t for t in bb.spec.taps}, "flatten": "pre_logits"})(x)
    for tap in bb.spec.taps:
        torch.testing.assert_close(out[tap], ref[tap], rtol=0, atol=0)
    assert probe_dims(bb.spec) == {t: ref[t].shape[1] for t in bb.spec.taps}
    torch.testing.assert_close(global_avg_pool(out["layer4"]), ref["pre_logits"])  # the model's own pooled features
    assert repr(bb.transform) == repr(ResNet18_Weights.IMAGENET1K_V1.transforms())


def _check_timm(bb, x, final_tap: str, final: torch.Tensor):
    from timm.data import create_transform, resolve_model_data_config

    out = _taps(bb, x)
    info = {f["module"]: f["num_chs"] for f in bb.visual.feature_info}
    dims = {k: global_avg_pool(v).shape[1] for k, v in out.items()}
    for tap, d in dims.items():
        if tap in info:
            assert d == info[tap], tap
    torch.testing.assert_close(out[final_tap], final, rtol=0, atol=0)
    assert repr(bb.transform) == repr(create_transform(**resolve_model_data_config(bb.visual), is_training=False))
    return dims


def test_timm_resnet_family_swsl_taps_equal_forward_features():
    assert (resolve_spec("resnet50_swsl").library, resolve_spec("resnet50_swsl").arch) == ("timm", "resnet50")
    # the family's smallest member, with the same tag
    bb = load_zoo_backbone(replace(zoo_spec("resnet50_swsl"), name="swsl_small", arch="resnet18", pretrained=None))
    x = _x()
    with torch.inference_mode():
        final = bb.visual.forward_features(x)
    dims = _check_timm(bb, x, "layer4", final)
    assert dims == probe_dims(bb.spec) == {"layer1": 64, "layer2": 128, "layer3": 256, "layer4": 512}


def test_efficientnet_stages_and_pre_logits():
    bb = load_backbone(resolve_spec("efficientnet_b0", pretrained="none"))
    x = _x()
    with torch.inference_mode():
        final = bb.visual.forward_head(bb.visual.forward_features(x), pre_logits=True)
    dims = _check_timm(bb, x, "global_pool", final)
    assert dims["global_pool"] == bb.visual.num_features == 1280
    assert dims == probe_dims(bb.spec)


def test_bit_resnetv2_final_norm_is_forward_features():
    spec = replace(zoo_spec("BiT-M-R50x1_in21k"), name="bit_small", arch="resnetv2_18", pretrained=None)
    bb = load_zoo_backbone(spec)
    x = _x()
    with torch.inference_mode():
        final = bb.visual.forward_features(x)
    dims = _check_timm(bb, x, "norm", final)
    assert dims["norm"] == bb.visual.feature_info[-1]["num_chs"]


def test_vit_pre_logits_tap_at_small_input():
    spec = replace(zoo_spec("ViT"), name="vit_small_test", arch="vit_tiny_patch16_224", pretrained=None)
    bb = load_zoo_backbone(spec, model_kwargs={"img_size": 32})
    x = _x(32)
    with torch.inference_mode():
        final = bb.visual.forward_head(bb.visual.forward_features(x), pre_logits=True)
    assert _check_timm(bb, x, "head_drop", final) == {"head_drop": 192}


def test_dino_vit_head_output_is_the_class_token():
    bb = load_zoo_backbone(replace(zoo_spec("deits16"), pretrained=None), model_kwargs={"img_size": 32})
    assert isinstance(bb.visual.head, torch.nn.Identity)  # the tag's configuration survives a random init
    x = _x(32)
    with torch.inference_mode():
        cls = bb.visual.forward_features(x)[:, 0]
    assert _check_timm(bb, x, "head", cls) == {"head": 384}


def test_any_timm_or_torchvision_name_with_layers():
    bb = load_backbone(resolve_spec("timm:resnet18", ["layer2", "global_pool"], pretrained="none"))
    assert bb.spec.taps == ("layer2", "global_pool")
    assert {k: v.shape[1] for k, v in _taps(bb, _x()).items()} == {"layer2": 128, "global_pool": 512}
    assert load_backbone(resolve_spec("timm:resnet18", pretrained="none")).spec.taps == RESNET_STAGES
    bb = load_backbone(resolve_spec("torchvision:squeezenet1_0", ["features.3"], pretrained="none"))
    assert _taps(bb, _x())["features.3"].shape[1] == 128
    with pytest.raises(UserError, match="valid names:.*layer1"):
        load_backbone(resolve_spec("timm:resnet18", ["layer9"], pretrained="none"))
    with pytest.raises(UserError, match="unknown timm model"):
        resolve_spec("timm:no_such_net")
    with pytest.raises(UserError, match="timm has no pretrained tag 'nope'"):
        load_backbone(resolve_spec("timm:resnet18.nope"))
    with pytest.raises(UserError, match="torchvision has no weights 'nope' for resnet18; known"):
        load_backbone(resolve_spec("resnet18", pretrained="nope"))


RESNET_STAGES = ("layer1", "layer2", "layer3", "layer4")


# ------------------------------------------------------------------ weights: caches, files, offline

def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_random_init_is_seeded_and_reproducible():
    a = load_backbone(resolve_spec("resnet18", pretrained="none"))
    b = load_backbone(resolve_spec("resnet18", pretrained="none"))
    c = load_backbone(resolve_spec("resnet18", pretrained="none"), init_seed=1)
    assert _same_weights(a.visual, b.visual) and not _same_weights(a.visual, c.visual)


def test_missing_cache_offline_is_one_line_naming_the_three_ways(tmp_path, monkeypatch, capsys):
    import extract
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    for name in ("resnet50_swsl", "resnet18"):
        with pytest.raises(UserError) as err:
            load_backbone(resolve_spec(name))
        msg = str(err.value)
        assert "\n" not in msg
        for way in ("--weights FILE", "HF_HUB_OFFLINE=1", str(tmp_path / "hf"), str(tmp_path / "torch"),
                    "--pretrained none"):
            assert way in msg, (name, way)
    make_pairs(tmp_path / "tll", 1)
    assert run_cli(extract.main, ["-d", str(tmp_path / "tll"), "-s", str(tmp_path / "o"), "--model", "BiT-M-R50x1_in21k"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "HF_HUB_OFFLINE is set" in err and not (tmp_path / "o").exists()


def test_torchvision_weights_from_the_torch_hub_cache(tmp_path, monkeypatch):
    from torchvision.models import ResNet18_Weights

    import featuresExtractor.backbones as models

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    donor = load_backbone(resolve_spec("resnet18", pretrained="none"), init_seed=3).visual
    path = tmp_path / "torch" / "hub" / "checkpoints" / ResNet18_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[1]
    path.parent.mkdir(parents=True)
    torch.save(donor.state_dict(), path)
    bb = load_backbone(resolve_spec("resnet18"))
    assert bb.weights == {"source": "pretrained", "tag": "ResNet18_Weights.IMAGENET1K_V1",
                          "sha256": models.file_sha256(path)}
    assert _same_weights(bb.visual, donor)
    assert [r["cached"] for r in list_models(with_dims=False) if r["name"] == "resnet18"] == ["cached"]


def test_timm_weights_from_the_hugging_face_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants
    from safetensors.torch import save_file

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    spec = resolve_spec("timm:resnet18.fb_swsl_ig1b_ft_in1k")
    donor = load_backbone(replace(spec, pretrained=None), init_seed=5).visual
    repo = tmp_path / "hf" / "models--timm--resnet18.fb_swsl_ig1b_ft_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in donor.state_dict().items()},
              str(repo / "snapshots" / ("0" * 40) / "model.safetensors"))
    bb = load_backbone(spec)
    assert bb.weights["source"] == "pretrained" and bb.weights["tag"] == "fb_swsl_ig1b_ft_in1k"
    assert _same_weights(bb.visual, donor)


def test_weights_file_for_timm_and_a_backbone_only_checkpoint_for_barlow(tmp_path):
    donor = load_backbone(resolve_spec("efficientnet_b0", pretrained="none"), init_seed=7).visual
    torch.save(donor.state_dict(), tmp_path / "eff.pth")
    bb = load_backbone(resolve_spec("efficientnet_b0"), weights=tmp_path / "eff.pth")
    assert bb.weights["source"] == "file" and _same_weights(bb.visual, donor)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot read weights file"):
        load_backbone(resolve_spec("efficientnet_b0"), weights=tmp_path / "junk.pth")
    torch.save({"conv_stem.weight": torch.zeros(1)}, tmp_path / "small.pth")
    with pytest.raises(UserError, match="cannot build timm tf_efficientnet_b0.aa_in1k"):
        load_backbone(resolve_spec("efficientnet_b0"), weights=tmp_path / "small.pth")

    donor = load_backbone(resolve_spec("barlow", pretrained="none"), init_seed=9).visual
    torch.save({k: v for k, v in donor.state_dict().items() if not k.startswith("fc.")}, tmp_path / "barlow.pth")
    bb = load_backbone(resolve_spec("barlow"), weights=tmp_path / "barlow.pth")
    assert bb.weights["missing_classifier_keys"] == 2
    assert torch.equal(bb.visual.layer4[0].conv1.weight, donor.layer4[0].conv1.weight)
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(UserError, match="cannot load weights from"):
        load_backbone(resolve_spec("barlow"), weights=tmp_path / "bad.pth")


# ------------------------------------------------------------------ the manifest reproduces the backbone

def test_manifest_records_the_backbone_and_the_encoder_rebuilds_it(tmp_path):
    from featuresExtractor.encode import Encoder

    make_pairs(tmp_path / "tll", 3)
    bb = load_backbone(resolve_spec("efficientnet_b0", pretrained="none"))
    report = extract(ExtractConfig(dataset=str(tmp_path / "tll"), save_to=str(tmp_path / "o"), processor=("adapt",),
                                   progress=False, workers=0), bb)
    manifest = json.loads((report.out_dir / "manifest.json").read_text())
    model = manifest["model"]
    assert (model["library"], model["identifier"], model["pretrained"]) == ("timm", "tf_efficientnet_b0", None)
    assert model["weights"]["source"] == "random-init"
    assert [t["pooled_dim"] for t in model["taps"]] == [24, 40, 112, 320, 1280]
    rec = np.load(report.out_dir / "features.npy")
    enc = Encoder.from_features_file(report.out_dir / "features.npy")
    assert enc.backbone.spec == bb.spec
    np.testing.assert_allclose(enc.encode([tmp_path / "tll" / "left" / rec["name"][0]])[0], rec["left"][0], atol=1e-5)
