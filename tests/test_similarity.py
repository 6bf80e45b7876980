"""similarity.py and VisualSimilarity end to end on the tiny config: extract, train, pair, search."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch

import extract
import similarity
import train
from conftest import TINY, draw_image, make_pairs, script_cli


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny extraction (adapt-pca 8 with flips) and a short training run on it."""
    root = tmp_path_factory.mktemp("sim")
    make_pairs(root / "tll", 8)
    assert extract.main(["-d", str(root / "tll"), "-s", str(root / "feats"), "--data-aug", "-p", "adapt-pca", "8",
                         *TINY]) == 0
    features = root / "feats" / "tiny_rn" / "features_pca8.npy"
    assert train.main(["-d", str(features), "--model", "original", "-s", str(root / "runs"), "-e", "3", "-t", "15",
                       "--test-split", "0.25", "-k", "1", "--seed", "0", "--no-images"]) == 0
    gallery = root / "gallery"
    for i in range(6):
        draw_image(gallery / f"g{i}.png", 100 + i)
    return {"root": root, "run": root / "runs" / "run1", "features": features, "gallery": gallery}


cli = script_cli(similarity)


class ImgCounter(HTMLParser):
    def __init__(self):
        super().__init__()
        self.srcs = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.srcs.append(dict(attrs)["src"])


def test_new_images_follow_the_training_path(run):
    from retrieval.visual_similarity import VisualSimilarity

    sim = VisualSimilarity.from_run(run["run"], device="cpu")
    rec = np.load(run["features"])
    rows = rec[~rec["augmented"]]
    paths = [run["root"] / "tll" / "left" / n for n in rows["name"]]
    np.testing.assert_allclose(sim.raw(paths), rows["left"], rtol=1e-5, atol=1e-5)


def test_pair_scores_and_self_similarity_is_maximal(run, capsys):
    a = run["root"] / "tll" / "left" / "pair000.png"
    b = run["root"] / "tll" / "right" / "pair000.png"
    code, out, err = cli(["--run", str(run["run"]), "pair", str(a), str(b)], capsys)
    assert code == 0, err
    assert "adapted similarity" in out and "raw cosine" in out
    from retrieval.visual_similarity import VisualSimilarity

    sim = VisualSimilarity.from_run(run["run"], device="cpu")
    self_score = sim.score(a, a)
    assert self_score == pytest.approx(1.0, abs=1e-5)
    for other in run["gallery"].iterdir():
        assert sim.score(a, other) <= self_score + 1e-6


def test_search_folder_prints_ranking_and_writes_html(run, capsys, tmp_path):
    query = run["gallery"] / "g2.png"
    page = tmp_path / "results.html"
    code, out, err = cli(["--run", str(run["run"]), "search", str(query), "--gallery", str(run["gallery"]),
                          "-k", "4", "--html", str(page)], capsys)
    assert code == 0, err
    lines = [l for l in out.splitlines() if l.strip()[:1].isdigit()]
    assert len(lines) == 4 and lines[0].split()[-1] == "g2.png"  # the query itself is in the gallery
    scores = [float(l.split()[1]) for l in lines]
    assert scores == sorted(scores, reverse=True)
    parser = ImgCounter()
    parser.feed(page.read_text())
    assert len(parser.srcs) == 5 and all(s.startswith("data:image/jpeg;base64,") for s in parser.srcs)
    assert "query: g2.png" in page.read_text()
    code, out, err = cli(["--run", str(run["run"]), "search", str(query), "--gallery", str(run["gallery"]),
                          "-k", "4", "--html", str(page)], capsys)
    assert code == 2 and "--overwrite" in err


def test_gallery_features_file_matches_folder_search(run, tmp_path, monkeypatch):
    import retrieval.visual_similarity
    from retrieval.visual_similarity import VisualSimilarity

    monkeypatch.setattr(retrieval.visual_similarity, "GALLERY_CHUNK", 4)  # the folder is encoded in two chunks

    assert extract.main(["-d", str(run["gallery"]), "-s", str(tmp_path / "g"), "-p", "adapt", "--normalize", "layers",
                         *TINY]) == 0
    sim = VisualSimilarity.from_run(run["run"], device="cpu")
    query = run["root"] / "tll" / "left" / "pair001.png"
    from_file = sim.search(query, tmp_path / "g" / "tiny_rn" / "features.npy", k=6)
    from_folder = sim.search(query, run["gallery"], k=6)
    assert [m.name for m in from_file] == [m.name for m in from_folder]
    np.testing.assert_allclose([m.score for m in from_file], [m.score for m in from_folder], atol=1e-5)
    assert from_file[0].image is not None and Path(from_file[0].image).is_file()


def test_gallery_file_for_a_run_trained_on_the_concatenation(run, tmp_path):
    from retrieval.visual_similarity import VisualSimilarity

    full = run["features"].parent / "features.npy"
    assert train.main(["-d", str(full), "--model", "original", "-s", str(tmp_path / "runs"), "-e", "2", "-t", "15",
                       "--test-split", "0.25", "-k", "1", "--seed", "0", "--no-images"]) == 0
    assert extract.main(["-d", str(run["gallery"]), "-s", str(tmp_path / "g"), "-p", "adapt", "--normalize", "layers",
                         *TINY]) == 0
    sim = VisualSimilarity.from_run(tmp_path / "runs" / "run1", device="cpu")
    query = run["root"] / "tll" / "left" / "pair001.png"
    from_file = sim.search(query, tmp_path / "g" / "tiny_rn" / "features.npy", k=6)
    from_folder = sim.search(query, run["gallery"], k=6)
    assert [m.name for m in from_file] == [m.name for m in from_folder]
    np.testing.assert_allclose([m.score for m in from_file], [m.score for m in from_folder], atol=1e-5)


def test_unreadable_gallery_images_are_skipped_and_reported(run, tmp_path, capsys):
    gallery = tmp_path / "gallery"
    for i in range(3):
        draw_image(gallery / f"ok{i}.png", i)
    (gallery / "broken.jpg").write_bytes(b"not a jpeg")
    code, out, err = cli(["--run", str(run["run"]), "search", str(gallery / "ok0.png"), "--gallery", str(gallery),
                          "-k", "3"], capsys)
    assert code == 0 and "broken.jpg" in err and "broken.jpg" not in out


def _bad(run, tmp_path):
    """Build each bad input; returns (argv, expected message) pairs."""
    root = run["root"]
    q = str(run["gallery"] / "g0.png")
    cases = {}
    (tmp_path / "empty_run").mkdir()
    cases["no checkpoint"] = (["--run", str(tmp_path / "empty_run"), "pair", q, q], "no model_and_optimizer.pt")
    # A checkpoint pointed at features of another dimension.
    assert extract.main(["-d", str(root / "tll"), "-s", str(tmp_path / "f6"), "-p", "adapt-pca", "6", *TINY]) == 0
    ckpt = torch.load(run["run"] / "model_and_optimizer.pt", weights_only=True)
    ckpt["config"]["data"] = str(tmp_path / "f6" / "tiny_rn" / "features_pca6.npy")
    del ckpt["provenance"]  # as a format-1 checkpoint: else it is refused first as not trained on these features
    ckpt["format_version"] = 1
    (tmp_path / "mismatch").mkdir()
    torch.save(ckpt, tmp_path / "mismatch" / "model_and_optimizer.pt")
    cases["dim mismatch"] = (["--run", str(tmp_path / "mismatch"), "pair", q, q], "expects 8-d features")
    # Copies of the extraction without the manifest / without the PCA.
    for what, missing in (("manifest", "manifest.json"), ("pca", "pca8.npz")):
        feats = tmp_path / f"no_{what}" / "tiny_rn"
        feats.mkdir(parents=True)
        for f in run["features"].parent.iterdir():
            if f.name != missing:
                (feats / f.name).write_bytes(f.read_bytes())
        ckpt["config"]["data"] = str(feats / "features_pca8.npy")
        (tmp_path / f"run_no_{what}").mkdir()
        torch.save(ckpt, tmp_path / f"run_no_{what}" / "model_and_optimizer.pt")
        cases[f"missing {what}"] = (["--run", str(tmp_path / f"run_no_{what}"), "pair", q, q], missing)
    (tmp_path / "bad.jpg").write_bytes(b"garbage")
    cases["unreadable query"] = (["--run", str(run["run"]), "pair", str(tmp_path / "bad.jpg"), q], "cannot read image")
    cases["k too large"] = (["--run", str(run["run"]), "search", q, "--gallery", str(run["gallery"]), "-k", "7"],
                            "gallery has 6 item(s)")
    assert extract.main(["-d", str(run["gallery"]), "-s", str(tmp_path / "other"), "-p", "adapt", "--normalize",
                         "layers", "--layers", "layer1", "layer4", *TINY]) == 0
    cases["gallery from another model"] = (
        ["--run", str(run["run"]), "search", q, "--gallery", str(tmp_path / "other" / "tiny_rn" / "features.npy")],
        "another model")
    assert extract.main(["-d", str(run["gallery"]), "-s", str(tmp_path / "paper"), "-p", "adapt", "--normalize",
                         "layers", "--transform", "paper", *TINY]) == 0
    cases["gallery with the other transform"] = (
        ["--run", str(run["run"]), "search", q, "--gallery", str(tmp_path / "paper" / "tiny_rn" / "features.npy")],
        "extracted with --transform paper but this run's features with --transform library")
    return cases


def test_bad_inputs_one_line_exit_2(run, tmp_path, capsys):
    cases = _bad(run, tmp_path)
    capsys.readouterr()
    for label, (argv, message) in cases.items():
        code, out, err = cli(argv, capsys)
        errors = [l for l in err.splitlines() if l.startswith("similarity.py: error:")]
        assert code == 2 and len(errors) == 1 and message in errors[0], (label, err)
        assert "Traceback" not in err


def test_training_logs_a_retrieval_grid_to_tensorboard(run, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert train.main(["-d", str(run["features"]), "--model", "original", "-s", str(tmp_path / "runs"), "-e", "2",
                       "-t", "15", "--test-split", "0.25", "-k", "1", "--seed", "0"]) == 0
    events = EventAccumulator(str(tmp_path / "runs" / "run1"), size_guidance={"images": 0}).Reload()
    assert "Test/retrieval" in events.Tags()["images"]
    image = events.Images("Test/retrieval")[-1]
    assert image.step == 2 and image.width == 3 * (96 + 8) and image.height == 2 * (96 + 8)  # 2 test pairs: query + 2
    no_images = tmp_path / "plain"
    assert train.main(["-d", str(run["features"]), "--model", "dummy", "-s", str(no_images), "-e", "1",
                       "--test-split", "0.25", "-k", "1", "--seed", "0", "--no-images"]) == 0
    assert "Test/retrieval" not in EventAccumulator(str(no_images / "run1")).Reload().Tags()["images"]


@pytest.fixture(scope="module")
def val_run(run):
    """The same features trained with a validation split (8 pairs: 2 test, 3 validation, 3 train)."""
    runs = run["root"] / "val_runs"
    assert train.main(["-d", str(run["features"]), "--model", "original", "-s", str(runs), "-e", "3", "-t", "15",
                       "--test-split", "0.25", "--val-split", "0.5", "-k", "1", "--seed", "0", "--no-images"]) == 0
    return runs / "run1"


def test_pair_without_validation_says_no_threshold_exists(run, capsys):
    from retrieval.visual_similarity import VisualSimilarity

    a, b = run["root"] / "tll" / "left" / "pair000.png", run["root"] / "tll" / "right" / "pair000.png"
    code, out, err = cli(["--run", str(run["run"]), "pair", str(a), str(b)], capsys)
    assert code == 0, err
    assert "no calibrated threshold" in out and "--val-split" in out and "verdict" not in out
    sim = VisualSimilarity.from_run(run["run"], device="cpu")
    v = sim.judge(a, b)
    assert sim.threshold is None and v.threshold is None and v.alike is None and v.score == sim.score(a, b)
    code, _, err = cli(["--run", str(run["run"]), "--best", "pair", str(a), str(b)], capsys)
    assert code == 2 and "without --val-split" in err


def test_pair_and_search_with_a_calibrated_threshold(run, val_run, capsys, tmp_path):
    from retrieval.visual_similarity import VisualSimilarity

    a, b = run["root"] / "tll" / "left" / "pair000.png", run["root"] / "tll" / "right" / "pair000.png"
    sim = VisualSimilarity.from_run(val_run, device="cpu")
    t = sim.threshold
    assert t is not None and t.n_pairs == 3 and -1 <= t.max_f1 <= 1
    v = sim.judge(a, b)
    assert v.threshold == t.max_f1 and v.alike == (v.score >= t.max_f1)
    assert sim.judge(a, a).alike  # an image is as alike as it gets
    code, out, err = cli(["--run", str(val_run), "pair", str(a), str(b)], capsys)
    assert code == 0, err
    assert f"threshold           {t.max_f1:.4f} (max F1 on 3 validation pairs" in out
    assert f"verdict             {'alike' if v.alike else 'not alike'}" in out

    page = tmp_path / "r.html"
    code, out, err = cli(["--run", str(val_run), "search", str(run["gallery"] / "g2.png"), "--gallery",
                          str(run["gallery"]), "-k", "6", "--html", str(page)], capsys)
    assert code == 0, err
    rows = [l.split() for l in out.splitlines() if l.strip()[:1].isdigit()]
    above = [r for r in rows if float(r[1]) >= t.max_f1]
    assert [r[2] for r in rows] == ["yes" if float(r[1]) >= t.max_f1 else "no" for r in rows] and above
    text = page.read_text()
    assert text.count('<td class="alike">') == len(above) and f"threshold: {t.max_f1:.4f}" in text
    best = VisualSimilarity.from_run(val_run, device="cpu", best=True)
    assert best.checkpoint["epoch"] <= 3 and best.threshold is not None


def test_engines_give_the_same_scores_and_auto_builds_no_graph_for_two_images(run, capsys, tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    a = run["root"] / "tll" / "left" / "pair000.png"
    b = run["root"] / "tll" / "right" / "pair001.png"
    scores = {}
    for engine in ("torch", "onnxruntime"):
        code, out, err = cli(["--run", str(run["run"]), "pair", str(a), str(b), "--engine", engine], capsys)
        assert code == 0, err
        scores[engine] = float(out.split("adapted similarity")[1].split()[0].strip(":"))
    assert scores["onnxruntime"] == pytest.approx(scores["torch"], abs=1e-4)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    code, out, err = cli(["--run", str(run["run"]), "--engine", "auto", "pair", str(a), str(b)], capsys)
    assert code == 0, err
    assert float(out.split("adapted similarity")[1].split()[0].strip(":")) == pytest.approx(scores["torch"], abs=1e-4)
    assert not (tmp_path / "cache").exists() and "onnxruntime" not in err  # two images never repay a graph's build
