"""ONNX export of a run and its torch-free use: agreement with torch, the CLI, the no-torch path, refusals."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import similarity
from conftest import ROOT, draw_image, run_bounded, torch_free_env
from onnx_paths import drawn, memory_sim
from test_index import cli, one_error_line
from test_similarity import run  # noqa: F401  (run: the module-scoped tiny run fixture)

from retrieval import deploy, export
from retrieval.deploy import OnnxEncoder, Preprocess
from retrieval.export import ExportConfig, export_run
from retrieval.visual_similarity import VisualSimilarity
from toolkit.utils import UserError

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


def leftovers(folder: Path) -> list[str]:
    """Hidden temporary folders an export may have left beside its target."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def check_agreement(sim, folder: Path, images) -> float:
    """The minimum cosine between the torch path and the export, the graph run at batch 1 and at batch len(images)."""
    enc = OnnxEncoder.load(folder)
    want = sim.embed(images).numpy()
    x = enc.preprocess.batch(images)
    ones = np.concatenate([enc.session.run(None, {"images": x[i:i + 1]})[0] for i in range(len(x))])
    whole = enc.session.run(None, {"images": x})[0]
    assert whole.shape == (len(images), enc.dim)
    np.testing.assert_allclose(np.linalg.norm(whole, axis=1), 1.0, rtol=1e-5)  # the graph normalises
    return float(min(cosines(ones, want).min(), cosines(whole, want).min()))


def exported_agrees(sim, tmp_path: Path) -> dict:
    """Export `sim` with a dynamic batch, checked on 7 drawn images; the agreement measured again here."""
    images = drawn(7)
    (tmp_path / "check").mkdir()
    for i, im in enumerate(images):
        im.save(tmp_path / "check" / f"{i}.png")
    m = export_run(sim, tmp_path / "out", ExportConfig(dynamic_batch=True, check_images=str(tmp_path / "check")))
    assert m["check"]["batches"] == [1, 7] and m["check"]["min_cosine"] >= 0.9999
    assert check_agreement(sim, tmp_path / "out", images) >= 0.9999
    return m


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):  # noqa: F811
    """The tiny run exported by the CLI with a dynamic batch, checked on 7 images (batch 1 and 7)."""
    root = tmp_path_factory.mktemp("onnx")
    for i in range(7):
        draw_image(root / "check" / f"c{i}.png", 300 + i, size=(70 + 9 * i, 90))
    out = root / "export"
    code = similarity.main(["--run", str(run["run"]), "export", "-o", str(out), "--dynamic-batch",
                            "--check-images", str(root / "check")])
    assert code == 0
    return {"dir": out, "check": root / "check", "root": root}


# ---------------------------------------------------------------- the export and its agreement with torch

def test_export_folder_and_its_own_check(exported, run):  # noqa: F811
    m = deploy.read_manifest(exported["dir"])
    assert sorted(os.listdir(exported["dir"])) == ["encoder.onnx", "manifest.json", "preprocess.json"]
    assert m["check"]["images"] == 7 and m["check"]["batches"] == [1, 7] and m["check"]["min_cosine"] >= 0.9999
    assert m["batch"] is None and m["opset"] == 18 and m["embedding_dim"] == m["identity"]["out_dim"]
    assert {"onnx", "onnxruntime", "torch"} <= set(m["versions"])
    sim = VisualSimilarity.from_run(run["run"], device="cpu")
    assert m["identity"] == sim.identity()
    assert m["identity"]["backbone"]["taps"] == ["layer1", "layer2", "layer3", "layer4", "attnpool"]
    # the recorded figure is what onnxruntime gives now
    images = [Image.open(p).convert("RGB") for p in sorted(exported["check"].iterdir())]
    assert check_agreement(sim, exported["dir"], images) >= 0.9999


@pytest.mark.parametrize("size", [(64, 64), (200, 90), (33, 301)])
def test_preprocess_equals_the_backbones_transform(tiny_backbone, size):
    pre = export.describe_transform(tiny_backbone.transform)
    img = drawn(1)[0].resize(size)
    np.testing.assert_allclose(pre(img), tiny_backbone.transform(img).numpy(), atol=1e-6)
    assert Preprocess.from_dict(json.loads(json.dumps(pre.to_dict()))) == pre


@pytest.mark.parametrize("name", ["resnet50", "efficientnet_b0"])
def test_agreement_torchvision_and_timm(name, tmp_path):
    from featuresExtractor.backbones import load_backbone, resolve_spec

    bb = load_backbone(resolve_spec(name, pretrained="none"))
    pre = export.describe_transform(bb.transform)
    img = drawn(1)[0]
    np.testing.assert_allclose(pre(img), bb.transform(img).numpy(), atol=1e-6)
    exported_agrees(memory_sim(bb), tmp_path)


def test_agreement_rn50x4(tmp_path):
    """The paper's backbone (random init): one export, checked at batch 1 and 7."""
    from featuresExtractor.backbones import load_backbone, resolve_spec

    m = exported_agrees(memory_sim(load_backbone(resolve_spec("clip_rn50x4", pretrained="none")), fit_images=4),
                        tmp_path)
    assert m["identity"]["backbone"]["arch"] == "RN50x4"


# ---------------------------------------------------------------- using an export

def test_from_onnx_answers_as_from_run(exported, run):  # noqa: F811
    a = VisualSimilarity.from_run(run["run"], device="cpu")
    b = VisualSimilarity.from_onnx(exported["dir"])
    left = sorted((run["root"] / "tll" / "left").iterdir())
    assert abs(a.score(left[0], left[1]) - b.score(left[0], left[1])) < 1e-4
    assert a.judge(left[0], left[1]).threshold == b.judge(left[0], left[1]).threshold
    assert cosines(a.embed(left[:3]).numpy(), b.embed(left[:3])).min() >= 0.9999
    ra, rb = a.search(left[2], run["gallery"], k=4), b.search(left[2], run["gallery"], k=4)
    assert [m.name for m in ra] == [m.name for m in rb]
    np.testing.assert_allclose([m.score for m in ra], [m.score for m in rb], atol=1e-4)


def test_cli_with_onnx_and_index_identity(exported, run, tmp_path, capsys):  # noqa: F811
    d, r = str(exported["dir"]), str(run["run"])
    left = sorted((run["root"] / "tll" / "left").iterdir())
    code, out, _ = cli(["--onnx", d, "pair", left[0], left[1]], capsys)
    assert code == 0 and "adapted similarity" in out and "raw cosine" not in out
    code, out, _ = cli(["--onnx", d, "search", left[0], "--gallery", run["gallery"], "-k", "2"], capsys)
    assert code == 0 and out.count(".png") == 2
    part = tmp_path / "part.txt"  # 4 of the 6 gallery images; `index add` then adds the other 2
    part.write_text("".join(f"{f}\n" for f in sorted(run["gallery"].iterdir())[:4]))
    ix = tmp_path / "ix"
    code, out, _ = cli(["--onnx", d, "index", "build", part, "-o", ix, "--no-progress"], capsys)
    assert code == 0 and "indexed 4 image(s)" in out
    code, out, _ = cli(["--onnx", d, "index", "add", ix, run["gallery"], "--no-progress"], capsys)
    assert code == 0 and "added 2 image(s)" in out
    code, out, _ = cli(["--onnx", d, "search", left[0], "--index", ix, "-k", "3"], capsys)
    assert code == 0 and out.count(".png") == 3
    # the run's torch encoder refuses the export's index, and the export refuses the run's
    code, _, err = cli(["--run", r, "search", left[0], "--index", ix], capsys)
    assert code == 2 and "another encoder" in one_error_line(err)
    run_ix = tmp_path / "run_ix"
    assert cli(["--run", r, "index", "build", part, "-o", run_ix, "--no-progress"], capsys)[0] == 0
    code, _, err = cli(["--onnx", d, "search", left[0], "--index", run_ix], capsys)
    assert code == 2 and "another encoder" in one_error_line(err)


def test_onnx_path_runs_without_torch(exported, run, tmp_path):  # noqa: F811
    env = torch_free_env(tmp_path / "block")
    # the blocker works: torch cannot be imported in such a process
    probe = run_bounded([sys.executable, "-c", "import torch"], 60, env=env)
    assert probe.returncode != 0 and "made unimportable" in probe.stderr
    left = sorted((run["root"] / "tll" / "left").iterdir())
    code = ("import sys\nfrom retrieval.visual_similarity import VisualSimilarity\n"
            f"sim = VisualSimilarity.from_onnx({str(exported['dir'])!r})\n"
            f"print(sim.score({str(left[0])!r}, {str(left[1])!r}), sim.embed([{str(left[2])!r}]).shape)\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'open_clip')))\n")
    api = run_bounded([sys.executable, "-c", code], 120, env=env, cwd=tmp_path)
    assert api.returncode == 0, api.stderr
    assert api.stdout.splitlines()[-1] == "[]"
    want = VisualSimilarity.from_onnx(exported["dir"]).score(left[0], left[1])
    assert abs(float(api.stdout.split()[0]) - want) < 1e-6
    for argv in (["pair", left[0], left[1]],
                 ["index", "build", run["gallery"], "-o", tmp_path / "ix", "--no-progress"],
                 ["search", left[0], "--index", tmp_path / "ix", "-k", "2"]):
        p = run_bounded([sys.executable, ROOT / "similarity.py", "--onnx", exported["dir"], *argv], 120, env=env,
                        cwd=tmp_path)
        assert p.returncode == 0, p.stderr


# ---------------------------------------------------------------- refusals

def test_export_refuses_bad_runs_and_places(exported, run, tmp_path, capsys):  # noqa: F811
    r = run["run"]
    (tmp_path / "norun").mkdir()
    code, _, err = cli(["--run", tmp_path / "norun", "export", "-o", tmp_path / "a"], capsys)
    assert code == 2 and "model_and_optimizer.pt" in one_error_line(err)
    code, _, err = cli(["--run", r, "--best", "export", "-o", tmp_path / "a"], capsys)
    assert code == 2 and "best.pt" in one_error_line(err)
    assert not (tmp_path / "a").exists()
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    code, _, err = cli(["--run", r, "export", "-o", tmp_path / "taken"], capsys)
    assert code == 2 and "--overwrite" in one_error_line(err)
    code, _, err = cli(["--run", r, "export", "-o", tmp_path / "taken", "--overwrite"], capsys)
    assert code == 2 and "notes.txt" in one_error_line(err) and "left alone (even with --overwrite)" in err
    assert os.listdir(tmp_path / "taken") == ["notes.txt"]
    code, _, err = cli(["--run", r, "export", "-o", "/proc/onnx_export"], capsys)
    assert code == 2 and "cannot write" in one_error_line(err)
    code, _, err = cli(["--onnx", exported["dir"], "--best", "pair", "a.png", "b.png"], capsys)
    assert code == 2 and "--best applies to --run only" in one_error_line(err)
    code, _, err = cli(["--onnx", exported["dir"], "export", "-o", tmp_path / "b"], capsys)
    assert code == 2 and "made from a run" in one_error_line(err)
    assert leftovers(tmp_path) == []


def damaged_copy(exported, tmp_path) -> Path:
    d = tmp_path / "copy"
    d.mkdir()
    for f in exported["dir"].iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    return d


def test_damaged_export_is_refused(exported, run, tmp_path, capsys):  # noqa: F811
    d = damaged_copy(exported, tmp_path)
    img = sorted((run["root"] / "tll" / "left").iterdir())[0]
    blob = bytearray((d / "encoder.onnx").read_bytes())
    (d / "encoder.onnx").write_bytes(bytes(blob[: len(blob) // 2]))
    code, _, err = cli(["--onnx", d, "pair", img, img], capsys)
    assert code == 2 and "encoder.onnx is damaged or edited (its sha256 differs" in one_error_line(err)
    # a manifest made to match the damaged graph: onnxruntime's refusal, in one line
    m = json.loads((d / "manifest.json").read_text())
    m["encoder_sha256"] = deploy.file_sha256(d / "encoder.onnx")
    (d / "manifest.json").write_text(json.dumps(m))
    code, _, err = cli(["--onnx", d, "pair", img, img], capsys)
    assert code == 2 and "cannot load" in one_error_line(err)
    (d / "manifest.json").write_text("{not json")
    code, _, err = cli(["--onnx", d, "pair", img, img], capsys)
    assert code == 2 and "cannot read" in one_error_line(err)


@pytest.mark.parametrize("key, value", [("mean", None), ("std", [0.2, 0.0, 0.2]), ("crop", [0, 64]),
                                        ("resize", 10 ** 9), ("interpolation", "magic"), ("crop", [65, 65]),
                                        ("mean", [0.5, float("nan"), 0.5]), ("decode", {})])
def test_absurd_preprocess_is_refused(exported, run, tmp_path, capsys, key, value):  # noqa: F811
    d = damaged_copy(exported, tmp_path)
    p = json.loads((d / "preprocess.json").read_text())
    if value is None:
        del p[key]
    else:
        p[key] = value
    (d / "preprocess.json").write_text(json.dumps(p))
    m = json.loads((d / "manifest.json").read_text())  # its sha256 made to match, to reach the value checks
    m["preprocess_sha256"] = deploy.file_sha256(d / "preprocess.json")
    (d / "manifest.json").write_text(json.dumps(m))
    img = sorted((run["root"] / "tll" / "left").iterdir())[0]
    code, _, err = cli(["--onnx", d, "pair", img, img], capsys)
    assert code == 2 and f"preprocess.json is damaged: {key} is" in one_error_line(err)


@pytest.mark.parametrize("key, value", [("mean", [0.5, 0.5, 0.5]), ("interpolation", "bilinear")])
def test_an_edited_preprocess_is_refused_by_its_sha256(exported, run, tmp_path, capsys, key, value):  # noqa: F811
    # Plausible values change every score silently (0.648 became 0.824): the manifest's sha256 catches them.
    d = damaged_copy(exported, tmp_path)
    p = json.loads((d / "preprocess.json").read_text())
    assert p[key] != value
    p[key] = value
    (d / "preprocess.json").write_text(json.dumps(p, indent=2, sort_keys=True) + "\n")
    img = sorted((run["root"] / "tll" / "left").iterdir())[0]
    code, _, err = cli(["--onnx", d, "pair", img, img], capsys)
    assert code == 2 and f"{d / 'preprocess.json'} is damaged or edited (its sha256 differs" in one_error_line(err)
    m = json.loads((d / "manifest.json").read_text())
    del m["preprocess_sha256"]
    (d / "manifest.json").write_text(json.dumps(m))
    code, _, err = cli(["--onnx", d, "pair", img, img], capsys)
    assert code == 2 and "preprocess_sha256 is 'missing', expected a sha256" in one_error_line(err), err


def test_the_manifest_records_the_opset_the_graph_has(tiny_backbone, tmp_path):
    m = export_run(memory_sim(tiny_backbone), tmp_path / "out", ExportConfig(opset=7))
    assert m["opset"] == export.graph_opset(tmp_path / "out" / "encoder.onnx") == 18
    assert m["preprocess_sha256"] == deploy.file_sha256(tmp_path / "out" / "preprocess.json")


def test_an_opset_the_exporter_cannot_reach_is_one_true_line(tiny_backbone, tmp_path):
    with pytest.raises(UserError) as caught:
        export_run(memory_sim(tiny_backbone), tmp_path / "out", ExportConfig(opset=30))
    line = str(caught.value)
    assert "cannot export at opset 30" in line and "choose a lower --opset" in line, line
    assert ".tmp" not in line and "export the run again" not in line, line  # no gone file, no retry that fails
    assert os.listdir(tmp_path) == []


def test_a_paper_transform_run_is_named_when_export_refuses_it(tiny_backbone, tmp_path):
    from dataclasses import replace

    from featuresExtractor.transforms import paper_transform

    sim = memory_sim(tiny_backbone)
    # As a non-CLIP backbone extracted with --transform paper has it (CLIP backbones keep their own).
    sim.encoder.extractor.backbone = replace(tiny_backbone, transform=paper_transform(), transform_choice="paper")
    with pytest.raises(UserError) as caught:
        export_run(sim, tmp_path / "out")
    line = str(caught.value)
    assert "extracted with --transform paper" in line and "--transform library" in line, line
    assert "has no crop" not in line and os.listdir(tmp_path) == []


def test_failed_check_leaves_nothing(tiny_backbone, tmp_path, monkeypatch):
    sim = memory_sim(tiny_backbone)
    monkeypatch.setattr(export, "MIN_COSINE", 1.5)  # no export can reach it
    with pytest.raises(UserError, match=r"minimum cosine [01]\.\d{6} < 1\.5 on 8 drawn image\(s\)"):
        export_run(sim, tmp_path / "out")
    assert os.listdir(tmp_path) == []


def test_full_disk_leaves_nothing(tiny_backbone, tmp_path, monkeypatch):
    sim = memory_sim(tiny_backbone)
    (tmp_path / "out").mkdir()  # an empty folder: replaced only whole

    def full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(UserError, match="cannot write .*No space left on device.*nothing was changed"):
        export_run(sim, tmp_path / "out")
    assert os.listdir(tmp_path) == ["out"] and os.listdir(tmp_path / "out") == []


def test_unexportable_operator_is_named(tiny_backbone, tmp_path, monkeypatch):
    sim = memory_sim(tiny_backbone)
    pool = sim.encoder.backbone.visual.attnpool
    own = pool.forward

    def with_eigh(x):  # the same output, plus nothing computed by an operator ONNX lacks
        gram = x.flatten(2) @ x.flatten(2).transpose(1, 2)
        return own(x) + 0 * torch.linalg.eigh(gram)[0].sum(-1, keepdim=True)

    monkeypatch.setattr(pool, "forward", with_eigh)
    with pytest.raises(UserError, match=r"TinyRN cannot be exported to ONNX: the operator aten\.\w*eigh\S* has no ONNX"):
        export_run(sim, tmp_path / "out")
    assert os.listdir(tmp_path) == []


def test_missing_packages_name_the_extra(exported, tiny_backbone, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    with pytest.raises(UserError, match=r"onnxscript is not installed: pip install 'adaptation-similarity\[export\]'"):
        export_run(memory_sim(tiny_backbone), tmp_path / "out")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(UserError, match=r"onnxruntime is not installed: pip install 'adaptation-similarity\[export\]'"):
        VisualSimilarity.from_onnx(exported["dir"])
    assert os.listdir(tmp_path) == []
