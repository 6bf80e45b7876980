"""extract.py end to end on the tiny config: outputs, pairing, flips, resume, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import extract
from conftest import ROOT, TINY, draw_image, make_pairs, script_cli
from featuresExtractor.backbones import load_backbone, resolve_spec
from featuresExtractor.extractor import Forwarder
from featuresExtractor.pipeline import ExtractConfig, extract as run_extract
from featuresExtractor.pooling import concat_parts, global_avg_pool
from featuresExtractor.taps import Taps
from featuresExtractor.transforms import hflip, load_image
from toolkit.utils import UserError


cli = script_cli(extract)


def files_under(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")) if path.exists() else []


def reference_pooled(backbone, paths, flip=False):
    """Pooled taps computed the slow, obvious way: one image at a time, no pipeline."""
    rows = []
    with torch.inference_mode(), Taps(backbone.visual, backbone.spec.taps, reduce=global_avg_pool) as taps:
        for p in paths:
            x = backbone.transform(load_image(p)).unsqueeze(0).contiguous(memory_format=torch.channels_last)
            rows.append({k: v[0].numpy() for k, v in taps(hflip(x) if flip else x).items()})
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def test_paper_command_shape_outputs_and_manifest(tmp_path, capsys, pairs_dir):
    out = tmp_path / "out"
    code, stdout, err = cli(["-d", str(pairs_dir), "-s", str(out), "-b", "2048", "--data-aug",
                             "--processor", "adapt-pca", "8", *TINY], capsys)
    assert code == 0, err
    assert "RANDOMLY INITIALISED" in err
    model_dir = out / "tiny_rn"
    assert files_under(model_dir) == ["features.npy", "features_pca8.npy", "manifest.json", "pca8.npz", "pca8.pkl"]
    full = np.load(model_dir / "features.npy")  # no allow_pickle: must load plainly
    red = np.load(model_dir / "features_pca8.npy")
    assert full.dtype.names == ("name", "augmented", "left", "right")
    assert full["left"].shape == (10, 32 + 64 + 128 + 256 + 32) and red["right"].shape == (10, 8)
    assert full["left"].dtype == np.float32
    assert list(full["augmented"]) == [False] * 5 + [True] * 5
    assert list(full["name"][:5]) == list(full["name"][5:]) == sorted(os.listdir(pairs_dir / "left"))
    manifest = json.loads((model_dir / "manifest.json").read_text())
    assert manifest["random_init"] is True and manifest["model"]["weights"]["source"] == "random-init"
    assert manifest["processor"] == {"name": "adapt-pca", "n_components": 8, "normalize": "layers"}
    assert manifest["augmentation"]["hflip"] is True and manifest["precision"] == "fp32"
    assert manifest["counts"]["items_kept"] == 5 and manifest["skipped"] == []
    assert [t["name"] for t in manifest["model"]["taps"]] == ["layer1", "layer2", "layer3", "layer4", "attnpool"]
    assert manifest["outputs"]["features.npy"]["parts"]["attnpool"] == [480, 512]
    assert set(manifest["versions"]) >= {"torch", "open_clip", "numpy", "scikit-learn", "pillow"}
    # layers normalised, embedding raw
    np.testing.assert_allclose(np.linalg.norm(full["left"][:, :32], axis=1), 1, rtol=1e-5)
    assert not np.allclose(np.linalg.norm(full["left"][:, 480:], axis=1), 1)
    # The reduced file is exactly the saved PCA applied to the concatenated vectors
    from featuresExtractor.pca import load_pca

    pca = load_pca(model_dir / "pca8.npz")
    np.testing.assert_allclose(pca.transform(full["left"]), red["left"], rtol=1e-4, atol=1e-4)


def test_pairs_matched_by_name_and_flip_applied_to_preprocessed_tensor(tmp_path, tiny_backbone):
    root = tmp_path / "tll"
    # Right images are written in the reverse order, so listing order differs from name order.
    names = ["b.png", "a.png", "c.png"]
    for i, n in enumerate(names):
        draw_image(root / "left" / n, 10 + i)
    for i, n in reversed(list(enumerate(names))):
        draw_image(root / "right" / n, 20 + i)
    cfg = ExtractConfig(dataset=str(root), save_to=str(tmp_path / "o"), processor=("adapt",), data_aug=True,
                        progress=False, batch_size=4)
    run_extract(cfg, tiny_backbone)
    assert tiny_backbone.visual.conv1.weight.is_contiguous()  # channels_last was undone on the way out
    rec = np.load(tmp_path / "o" / "tiny_rn" / "features.npy")
    order = sorted(names)
    for side in ("left", "right"):
        paths = [root / side / n for n in order]
        for flip, rows in ((False, slice(0, 3)), (True, slice(3, 6))):
            ref = concat_parts(reference_pooled(tiny_backbone, paths, flip), "all", "attnpool")
            np.testing.assert_allclose(rec[side][rows], ref, rtol=1e-4, atol=1e-5)
    assert list(rec["name"]) == order * 2


@pytest.mark.parametrize("batch", [1, 2, 5, 64])
def test_batch_size_invariance(tmp_path, tiny_backbone, batch):
    root = tmp_path / "tll"
    make_pairs(root, 5)  # 5 pairs = 20 images with flips: every remainder case in the list above
    base = ExtractConfig(dataset=str(root), save_to=str(tmp_path / "ref"), processor=("adapt",), data_aug=True,
                         progress=False, batch_size=3)
    run_extract(base, tiny_backbone)
    cfg = ExtractConfig(dataset=str(root), save_to=str(tmp_path / "b"), processor=("adapt",), data_aug=True,
                        progress=False, batch_size=batch)
    run_extract(cfg, tiny_backbone)
    a = np.load(tmp_path / "ref" / "tiny_rn" / "features.npy")
    b = np.load(tmp_path / "b" / "tiny_rn" / "features.npy")
    np.testing.assert_allclose(a["left"], b["left"], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(a["right"], b["right"], rtol=1e-4, atol=1e-6)


def test_flat_folder_gallery_and_ignored_files(tmp_path, capsys):
    gallery = tmp_path / "gallery"
    for i in range(4):
        draw_image(gallery / f"img{i}.jpg", i)
    (gallery / ".DS_Store").write_bytes(b"\0\0junk")
    (gallery / "notes.txt").write_text("not an image")
    code, _, err = cli(["-d", str(gallery), "-s", str(tmp_path / "o"), "-p", "adapt", *TINY], capsys)
    assert code == 0, err
    rec = np.load(tmp_path / "o" / "tiny_rn" / "features.npy")
    assert rec.dtype.names == ("name", "augmented", "feature") and len(rec) == 4
    manifest = json.loads((tmp_path / "o" / "tiny_rn" / "manifest.json").read_text())
    assert manifest["dataset"]["kind"] == "flat"
    assert sorted(manifest["dataset"]["ignored_files"]) == [".DS_Store", "notes.txt"]


def test_pca_is_deterministic(tmp_path, pairs_dir, tiny_backbone):
    for out in ("a", "b"):
        run_extract(ExtractConfig(dataset=str(pairs_dir), save_to=str(tmp_path / out), processor=("adapt-pca", "6"),
                                  progress=False), tiny_backbone)
    for f in ("features_pca6.npy", "pca6.npz"):
        assert (tmp_path / "a" / "tiny_rn" / f).read_bytes() == (tmp_path / "b" / "tiny_rn" / f).read_bytes()


def test_per_tap_pca_processor(tmp_path, pairs_dir, tiny_backbone):
    cfg = ExtractConfig(dataset=str(pairs_dir), save_to=str(tmp_path / "o"), processor=("pca", "4"),
                        data_aug=True, progress=False)
    run_extract(cfg, tiny_backbone)
    model_dir = tmp_path / "o" / "tiny_rn"
    rec = np.load(model_dir / "features_pca4.npy")
    assert rec["left"].shape == (10, 5 * 4)
    manifest = json.loads((model_dir / "manifest.json").read_text())
    assert manifest["outputs"]["features_pca4.npy"]["parts"]["layer3"] == [8, 12]
    assert sorted(p.name for p in (model_dir / "pca4").iterdir()) == sorted(
        f"{t}.{ext}" for t in ("layer1", "layer2", "layer3", "layer4", "attnpool") for ext in ("npz", "pkl"))


def test_save_processor_writes_raw_float16_and_checks_disk(tmp_path, pairs_dir, tiny_backbone, monkeypatch, capsys):
    cfg = ExtractConfig(dataset=str(pairs_dir), save_to=str(tmp_path / "o"), processor=("save",), progress=False)
    run_extract(cfg, tiny_backbone)
    assert "will take" in capsys.readouterr().err
    raw = np.load(tmp_path / "o" / "tiny_rn" / "raw" / "layer1" / "000000.npy")
    assert raw.dtype == np.float16 and raw.shape == (2, 1, 32, 16, 16)
    manifest = json.loads((tmp_path / "o" / "tiny_rn" / "manifest.json").read_text())
    assert manifest["outputs"]["raw"]["rows"]["000000"] == "pair000.png"

    import shutil
    from collections import namedtuple

    monkeypatch.setattr(shutil, "disk_usage", lambda p: namedtuple("U", "total used free")(10, 10, 1000))
    with pytest.raises(UserError, match="not enough disk"):
        run_extract(ExtractConfig(dataset=str(pairs_dir), save_to=str(tmp_path / "full"), processor=("save",),
                                  progress=False), tiny_backbone)
    assert not (tmp_path / "full").exists()


def test_bad_image_is_skipped_and_reported_strict_fails_cleanly(tmp_path, capsys):
    root = tmp_path / "tll"
    make_pairs(root, 4)
    (root / "right" / "pair002.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (root / "left" / "pair003.png").write_bytes(b"")
    code, out, err = cli(["-d", str(root), "-s", str(tmp_path / "strict"), "--strict", "-p", "adapt", *TINY], capsys)
    assert code == 2 and "unreadable image" in err and "Traceback" not in err
    assert not (tmp_path / "strict").exists() or files_under(tmp_path / "strict") == []
    code, out, err = cli(["-d", str(root), "-s", str(tmp_path / "o"), "-p", "adapt", *TINY], capsys)
    assert code == 0, err
    assert "skipped 2" in out and "pair002.png" in out and "pair003.png" in out
    rec = np.load(tmp_path / "o" / "tiny_rn" / "features.npy")
    assert list(rec["name"]) == ["pair000.png", "pair001.png"]
    manifest = json.loads((tmp_path / "o" / "tiny_rn" / "manifest.json").read_text())
    assert [s["name"] for s in manifest["skipped"]] == ["pair002.png", "pair003.png"]
    assert "right" in manifest["skipped"][0]["reason"] and "empty" in manifest["skipped"][1]["reason"]


class Interrupt(Exception):
    pass


def test_resume_after_interruption_and_rerun(tmp_path, pairs_dir, tiny_backbone, monkeypatch, capsys):
    ref = ExtractConfig(dataset=str(pairs_dir), save_to=str(tmp_path / "ref"), processor=("adapt-pca", "4"),
                        data_aug=True, progress=False, batch_size=4)
    run_extract(ref, tiny_backbone)
    cfg = ExtractConfig(dataset=str(pairs_dir), save_to=str(tmp_path / "o"), processor=("adapt-pca", "4"),
                        data_aug=True, progress=False, batch_size=4)
    calls = {"n": 0}
    real_call = Forwarder.__call__

    def flaky(self, images):
        calls["n"] += 1
        if calls["n"] == 3:
            raise Interrupt("power cut")
        return real_call(self, images)

    monkeypatch.setattr(Forwarder, "__call__", flaky)
    with pytest.raises(Interrupt):
        run_extract(cfg, tiny_backbone)
    model_dir = tmp_path / "o" / "tiny_rn"
    assert not (model_dir / "manifest.json").exists() and not (model_dir / "features.npy").exists()
    assert len(list((model_dir / ".partial").glob("chunk_*.npz"))) == 2
    monkeypatch.setattr(Forwarder, "__call__", real_call)
    report = run_extract(cfg, tiny_backbone)
    assert report.resumed_items == 2 and report.n_kept == 5
    a, b = np.load(tmp_path / "ref" / "tiny_rn" / "features_pca4.npy"), np.load(model_dir / "features_pca4.npy")
    np.testing.assert_allclose(a["left"], b["left"], rtol=1e-4, atol=1e-5)
    assert not (model_dir / ".partial").exists()
    # Finished: the same command says so and exits 0; another configuration is refused.
    base = ["-d", str(pairs_dir), "-s", str(tmp_path / "o"), "--data-aug", "-b", "4", *TINY]
    code, out, err = cli(base + ["-p", "adapt-pca", "4"], capsys)
    assert code == 0 and "already done" in out
    before = (model_dir / "features.npy").read_bytes()
    code, out, err = cli(base + ["-p", "adapt-pca", "3"], capsys)
    assert code == 2 and "--overwrite" in err and "n_components" in err
    assert (model_dir / "features.npy").read_bytes() == before and not (model_dir / "features_pca3.npy").exists()
    code, out, err = cli(base + ["-p", "adapt-pca", "3", "--overwrite"], capsys)
    assert code == 0, err
    assert (model_dir / "features_pca3.npy").exists() and not (model_dir / "features_pca4.npy").exists()


def test_forwarder_halves_batch_on_out_of_memory():
    seen = []

    class FakeTaps:
        reduce = staticmethod(global_avg_pool)

        def __call__(self, x):
            seen.append(len(x))
            if len(x) > 2:
                raise torch.OutOfMemoryError("CUDA out of memory")
            return {"t": x.mean(dim=(2, 3))}

    fwd = Forwarder(FakeTaps(), torch.device("cpu"), "fp32", slice_size=8, channels_last=False)
    x = torch.randn(7, 3, 4, 4)
    out = fwd(x)
    torch.testing.assert_close(out["t"], x.mean(dim=(2, 3)))
    assert fwd.slice == 2 and seen[:3] == [7, 4, 2]


def test_weights_file_fp16_and_wrapped_state_dict(tmp_path, pairs_dir, tiny_backbone, capsys):
    import open_clip

    from featuresExtractor.clip_models import register_local_configs

    register_local_configs()
    torch.manual_seed(5)
    model = open_clip.create_model("TinyRN")
    sd = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    torch.save(sd, tmp_path / "tiny_fp16.pt")
    torch.save({"state_dict": {"module." + k: v for k, v in model.state_dict().items()}}, tmp_path / "wrapped.pt")
    # OpenAI published TorchScript archives; a traced CLIP has the same layout.
    traced = torch.jit.trace(model.eval(), (torch.randn(1, 3, 64, 64), torch.zeros(1, 8, dtype=torch.long)),
                             strict=False, check_trace=False)
    traced.save(str(tmp_path / "openai_jit.pt"))
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "hub.safetensors"))
    feats = []
    for name in ("tiny_fp16.pt", "wrapped.pt", "openai_jit.pt", "hub.safetensors"):
        out = tmp_path / f"out_{name}"
        code, _, err = cli(["-d", str(pairs_dir), "-s", str(out), "-p", "adapt", "--weights",
                            str(tmp_path / name), "--model", "tiny_rn", "--workers", "0", "--no-progress"], capsys)
        assert code == 0, err
        manifest = json.loads((out / "tiny_rn" / "manifest.json").read_text())
        assert manifest["model"]["weights"]["source"] == "file" and len(manifest["model"]["weights"]["sha256"]) == 64
        assert manifest["random_init"] is False
        feats.append(np.load(out / "tiny_rn" / "features.npy")["left"])
    np.testing.assert_allclose(feats[0], feats[1], atol=2e-2)  # fp16 rounding only
    np.testing.assert_array_equal(feats[1], feats[2])
    np.testing.assert_array_equal(feats[1], feats[3])
    torch.save({"not": torch.zeros(1)}, tmp_path / "junk.pt")
    code, _, err = cli(["-d", str(pairs_dir), "-s", str(tmp_path / "j"), "--weights", str(tmp_path / "junk.pt"),
                        "--model", "tiny_rn"], capsys)
    assert code == 2 and "cannot load weights" in err and not (tmp_path / "j").exists()


@pytest.mark.parametrize("args, message", [
    (["-d", "{missing}"], "does not exist"),
    (["-d", "{empty}"], "no images"),
    (["-b", "0"], "at least 1"),
    (["-p", "adapt-pca", "999"], "N <= 20"),
    (["-p", "adapt-pca"], "needs one positive integer"),
    (["-p", "zoom"], "unknown processor"),
    (["--layers", "layer1", "layer9"], "valid names"),
    (["--model", "no_such_model"], "unknown model"),
    (["--weights", "{missing}/w.pt"], "no such file"),
    (["-s", "{file}"], "not a folder"),
])
def test_bad_input_one_line_exit_2_nothing_written(tmp_path, capsys, pairs_dir, args, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("x")
    subst = {"{missing}": str(tmp_path / "missing"), "{empty}": str(tmp_path / "empty"),
             "{file}": str(tmp_path / "file")}
    args = [subst.get(a, a).replace("{missing}", str(tmp_path / "missing")) for a in args]
    base = ["-d", str(pairs_dir), "-s", str(tmp_path / "o"), "--data-aug"]
    for flag in ("-d", "-s"):
        if flag in args:
            i = base.index(flag)
            base = base[:i] + base[i + 2:]
    code, out, err = cli(base + TINY + args, capsys)
    assert code == 2
    errors = [line for line in err.splitlines() if line.startswith("extract.py: error:")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_orphan_names_are_an_error(tmp_path, capsys):
    root = tmp_path / "tll"
    make_pairs(root, 3)
    draw_image(root / "left" / "lonely1.png", 1)
    draw_image(root / "right" / "lonely2.png", 2)
    code, out, err = cli(["-d", str(root), "-s", str(tmp_path / "o"), *TINY], capsys)
    assert code == 2 and "2 image(s) have no partner" in err and "left/lonely1.png" in err
    assert not (tmp_path / "o").exists()


def test_cli_offline_pretrained_message_and_import_is_light(tmp_path, pairs_dir):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    proc = subprocess.run([sys.executable, str(ROOT / "extract.py"), "-d", str(pairs_dir), "-s", str(tmp_path / "o"),
                           "--model", "tiny_rn", "--pretrained", "openai"], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "no pretrained tag 'openai'" in proc.stderr
    proc = subprocess.run([sys.executable, str(ROOT / "extract.py"), "-d", str(pairs_dir), "-s", str(tmp_path / "o"),
                           "--model", "RN50", "--pretrained", "openai"], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    for hint in ("--weights", "HF_HUB_OFFLINE", str(tmp_path / "hf")):
        assert hint in proc.stderr
    assert not (tmp_path / "o").exists()
    check = "import sys, extract; assert 'open_clip' not in sys.modules and 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", check], cwd=ROOT).returncode == 0


def test_vit_family_defaults_to_the_embedding_and_layers_override(tmp_path):
    import open_clip

    cfg = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 16},
           "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 16, "heads": 1, "layers": 1}}
    (tmp_path / "TinyViT.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / "TinyViT.json")
    make_pairs(tmp_path / "tll", 2)
    bb = load_backbone(resolve_spec("TinyViT"))
    assert bb.spec.taps == ("embedding",)
    report = run_extract(ExtractConfig(dataset=str(tmp_path / "tll"), save_to=str(tmp_path / "o"),
                                       processor=("adapt",), progress=False, workers=0), bb)
    assert np.load(report.out_dir / "features.npy")["left"].shape == (2, 16)
    bb = load_backbone(resolve_spec("TinyViT", ["transformer.resblocks.0", "embedding"]))
    report = run_extract(ExtractConfig(dataset=str(tmp_path / "tll"), save_to=str(tmp_path / "o2"),
                                       processor=("adapt",), progress=False, workers=0), bb)
    assert np.load(report.out_dir / "features.npy")["left"].shape == (2, 32 + 16)  # token-mean of a block + embedding


def test_changed_dataset_is_not_resumed_or_reported_done(tmp_path, pairs_dir, tiny_backbone, monkeypatch, capsys):
    cfg = ExtractConfig(dataset=str(pairs_dir), save_to=str(tmp_path / "o"), processor=("adapt",),
                        progress=False, batch_size=4, workers=0)
    real_call = Forwarder.__call__

    def crash(self, images):
        raise Interrupt("power cut")

    monkeypatch.setattr(Forwarder, "__call__", crash)
    with pytest.raises(Interrupt):
        run_extract(cfg, tiny_backbone)
    monkeypatch.setattr(Forwarder, "__call__", real_call)
    draw_image(pairs_dir / "left" / "aaa.png", 77)  # sorts first: every chunk position would shift
    draw_image(pairs_dir / "right" / "aaa.png", 78)
    with pytest.raises(UserError, match="interrupted run with another configuration"):
        run_extract(cfg, tiny_backbone)
    run_extract(ExtractConfig(**{**cfg.__dict__, "overwrite": True}), tiny_backbone)
    (pairs_dir / "left" / "pair004.png").unlink()
    (pairs_dir / "right" / "pair004.png").unlink()
    with pytest.raises(UserError, match="differs in: items"):
        run_extract(cfg, tiny_backbone)


def test_failed_overwrite_keeps_earlier_results(tmp_path, pairs_dir, capsys):
    args = ["-d", str(pairs_dir), "-s", str(tmp_path / "o"), *TINY]
    assert cli(args + ["-p", "adapt-pca", "4"], capsys)[0] == 0
    model_dir = tmp_path / "o" / "tiny_rn"
    before = {p.name: p.read_bytes() for p in model_dir.iterdir() if p.is_file()}
    (pairs_dir / "right" / "pair001.png").write_bytes(b"broken")
    code, _, err = cli(args + ["-p", "adapt", "--overwrite", "--strict"], capsys)
    assert code == 2 and "unreadable image" in err
    assert {p.name: p.read_bytes() for p in model_dir.iterdir() if p.is_file()} == before
    code, _, err = cli(args + ["-p", "adapt", "--overwrite"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in model_dir.iterdir()) == ["features.npy", "manifest.json"]  # stale PCA files gone


def test_damaged_manifest_is_a_one_line_error(tmp_path, pairs_dir, capsys):
    args = ["-d", str(pairs_dir), "-s", str(tmp_path / "o"), "-p", "adapt", *TINY]
    assert cli(args, capsys)[0] == 0
    (tmp_path / "o" / "tiny_rn" / "manifest.json").write_text("{oops")
    code, _, err = cli(args, capsys)
    assert code == 2 and "cannot read" in err and "manifest.json" in err and "Traceback" not in err


def test_per_tap_pca_with_dotted_tap_names(tmp_path, pairs_dir):
    bb = load_backbone(resolve_spec("tiny_rn", ["layer1.0", "layer2.0", "attnpool"]))
    run_extract(ExtractConfig(dataset=str(pairs_dir), save_to=str(tmp_path / "o"), processor=("pca", "3"),
                              progress=False, workers=0), bb)
    files = sorted(p.name for p in (tmp_path / "o" / "tiny_rn" / "pca3").iterdir())
    assert files == ["attnpool.npz", "attnpool.pkl", "layer1.0.npz", "layer1.0.pkl", "layer2.0.npz", "layer2.0.pkl"]
    from featuresExtractor.encode import Encoder

    enc = Encoder.from_features_file(tmp_path / "o" / "tiny_rn" / "features_pca3.npy")
    rec = np.load(tmp_path / "o" / "tiny_rn" / "features_pca3.npy")
    np.testing.assert_allclose(enc.encode([pairs_dir / "left" / rec["name"][0]])[0], rec["left"][0], atol=1e-5)


def _tagged_jpeg(path, orientation):
    """A JPEG whose pixels are stored sideways, with the EXIF tag that says how to turn them upright."""
    from PIL import Image

    upright = Image.open(draw_image(path.with_suffix(".png"), 7, size=(64, 40))).convert("RGB")
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # orientation 6 asks to rotate 270 (= undo ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored.save(path, quality=95, exif=exif)
    return upright, stored


def test_exif_orientation_is_applied_and_recorded(tmp_path, tiny_backbone):
    from PIL import Image

    _tagged_jpeg(tmp_path / "flat" / "photo.jpg", 6)
    (tmp_path / "flat" / "photo.png").unlink()
    img = load_image(tmp_path / "flat" / "photo.jpg")
    assert img.size == (64, 40)  # upright: as displayed, not as stored (40 x 64)
    raw = Image.open(tmp_path / "flat" / "photo.jpg").convert("RGB")
    assert raw.size == (40, 64)
    np.testing.assert_array_equal(np.asarray(img), np.asarray(raw.transpose(Image.Transpose.ROTATE_270)))
    cfg = ExtractConfig(dataset=str(tmp_path / "flat"), save_to=str(tmp_path / "o"), processor=("adapt",),
                        workers=0, progress=False)
    run_extract(cfg, tiny_backbone)
    model_dir = tmp_path / "o" / "tiny_rn"
    manifest = json.loads((model_dir / "manifest.json").read_text())
    assert "exif_transpose" in manifest["decode"]["exif_orientation"] and manifest["config"]["exif_orientation"]
    # what reaches the model is the upright image, not the stored pixels
    upright_x, stored_x = tiny_backbone.transform(img), tiny_backbone.transform(raw)
    assert (upright_x - stored_x).abs().max() > 0.1


def test_decoding_without_orientation_tag_matches_the_papers_plain_decode(tmp_path):
    """Parity with the paper's code (`Image.open(p).convert("RGB")`) on images without an orientation tag."""
    from PIL import Image

    for i, (ext, mode) in enumerate([(".jpg", "RGB"), (".png", "RGB"), (".png", "L"), (".jpg", "L")]):
        path = draw_image(tmp_path / f"im{i}{ext}", i, mode=mode)
        np.testing.assert_array_equal(np.asarray(load_image(path)), np.asarray(Image.open(path).convert("RGB")))
    # a JPEG with EXIF but orientation 1 (upright) decodes as the plain decode too
    _tagged_jpeg(tmp_path / "one.jpg", 1)
    np.testing.assert_array_equal(np.asarray(load_image(tmp_path / "one.jpg")),
                                  np.asarray(Image.open(tmp_path / "one.jpg").convert("RGB")))
