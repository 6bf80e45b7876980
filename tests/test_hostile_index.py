"""Hostile cases of issue 24 on the index, search and pairs: owned folders, odd files, output collisions."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal

import pytest

import extract
import similarity
from conftest import run_script
from test_similarity import run  # noqa: F401  (the module-scoped tiny run fixture)


def cli(argv, capsys):
    with no_hang():
        return run_script(similarity, argv, capsys)


@contextlib.contextmanager
def no_hang(seconds: int = 60):
    """Fail, instead of hanging, a call that blocks (e.g. reading a FIFO nobody writes)."""
    def stop(signum, frame):
        raise TimeoutError(f"hung for {seconds} s")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if ": error:" in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def snapshot(folder):
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


@pytest.fixture()
def index(run, tmp_path, capsys):  # noqa: F811
    code, _, err = cli(["--run", str(run["run"]), "index", "build", str(run["gallery"]), "-o", str(tmp_path / "ix"),
                        "--no-progress"], capsys)
    assert code == 0, err
    return tmp_path / "ix"


def test_an_index_folder_holding_a_user_file_is_refused_and_the_file_kept(run, index, capsys):  # noqa: F811
    (index / "NOTES.txt").write_text("mine")
    (index / "thumbs").mkdir()
    before = snapshot(index)
    for argv in (["index", "add", str(index), str(run["root"] / "tll")],
                 ["index", "build", str(run["root"] / "tll"), "-o", str(index), "--overwrite"]):
        code, _, err = cli(["--run", str(run["run"]), *argv, "--no-progress"], capsys)
        line = error_line(err)
        assert code == 2 and "NOTES.txt, thumbs/" in line and "even with --overwrite" in line, line
        assert snapshot(index) == before
    assert sorted(p.name for p in index.parent.iterdir()) == ["ix"]  # no lock file, no cache, no temporary


def test_overwrite_never_replaces_an_extraction_or_an_unknown_folder(run, tmp_path, capsys):  # noqa: F811
    extraction = tmp_path / "extraction"
    shutil.copytree(run["features"].parent, extraction)
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "manifest.json").write_text('{"format": "something else"}')
    for folder, found in ((extraction, "features_pca8.npy"), (unknown, "manifest.json")):
        before = snapshot(folder)
        code, _, err = cli(["--run", str(run["run"]), "index", "build", str(run["gallery"]), "-o", str(folder),
                            "--overwrite", "--no-progress"], capsys)
        line = error_line(err)
        assert code == 2 and found in line and "left alone" in line, line
        assert snapshot(folder) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["extraction", "unknown"]


def test_a_symlinked_index_stays_a_link_and_nothing_is_left_beside_it(run, index, capsys):  # noqa: F811
    v1 = index.parent / "v1"
    index.rename(v1)
    (index.parent / "current").symlink_to("v1")
    for argv in (["index", "add", "current", str(run["root"] / "tll")],
                 ["index", "build", str(run["gallery"]), "-o", "current", "--overwrite", "--kind", "hnsw"]):
        cwd = os.getcwd()
        os.chdir(index.parent)
        try:
            code, out, err = cli(["--run", str(run["run"]), *argv, "--no-progress"], capsys)
        finally:
            os.chdir(cwd)
        assert code == 0, err
        assert (index.parent / "current").is_symlink() and os.readlink(index.parent / "current") == "v1"
        assert sorted(p.name for p in index.parent.iterdir()) == ["current", "v1"]
    assert "22 image(s)" not in out and "holds 6" in out  # the rebuild replaced the target: 6 gallery images


def test_the_same_gallery_through_a_link_is_not_added_twice(run, index, tmp_path, capsys):  # noqa: F811
    (tmp_path / "again").symlink_to(run["gallery"])
    code, out, err = cli(["--run", str(run["run"]), "index", "add", str(index), str(tmp_path / "again"),
                          "--no-progress"], capsys)
    assert code == 0 and "added 0 image(s)" in out and "holds 6" in out, out + err


@pytest.mark.parametrize("command", ["build", "add", "search"])
def test_a_fifo_as_gallery_list_is_refused_without_hanging_or_leftovers(run, index, tmp_path, capsys, command):  # noqa: F811
    fifo = tmp_path / "gal.txt"
    os.mkfifo(fifo)
    argv = {"build": ["index", "build", str(fifo), "-o", str(tmp_path / "new"), "--no-progress"],
            "add": ["index", "add", str(index), str(fifo), "--no-progress"],
            "search": ["search", str(run["gallery"] / "g0.png"), "--gallery", str(fifo)]}[command]
    before = snapshot(index)
    code, _, err = cli(["--run", str(run["run"]), *argv], capsys)
    assert code == 2 and "is a FIFO" in error_line(err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gal.txt", "ix"] and snapshot(index) == before


def test_list_entries_that_are_no_image_files_are_skipped_with_a_reason_or_refused_under_strict(run, tmp_path,  # noqa: F811
                                                                                                   capsys):
    os.mkfifo(tmp_path / "pipe.png")
    (tmp_path / "folder.png").mkdir()
    (tmp_path / "broken.png").symlink_to(tmp_path / "gone.png")
    good = [str(p) for p in sorted(run["gallery"].iterdir())]
    (tmp_path / "list.txt").write_text("\n".join(good + ["pipe.png", "folder.png", "broken.png"]) + "\n")
    base = ["--run", str(run["run"]), "index", "build", str(tmp_path / "list.txt"), "-o", str(tmp_path / "ix"),
            "--no-progress"]
    code, _, err = cli(base + ["--strict"], capsys)
    assert code == 2 and "pipe.png: a FIFO, not an image file (--strict" in error_line(err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.png", "folder.png", "list.txt", "pipe.png"]
    code, out, err = cli(base, capsys)
    assert code == 0 and "indexed 6 image(s)" in out, err
    for name, reason in (("pipe.png", "a FIFO"), ("folder.png", "a folder"), ("broken.png", "a broken link")):
        assert f"skipped unreadable gallery image {name}: {reason}, not an image file" in err, err


def test_a_fifo_as_the_dataset_list_is_said_to_be_one(tmp_path, capsys):
    os.mkfifo(tmp_path / "pairs.csv")
    with no_hang():
        code, _, err = run_script(extract, ["-d", str(tmp_path / "pairs.csv"), "-s", str(tmp_path / "out"),
                                            "--model", "tiny_rn", "--no-progress"], capsys)
    assert code == 2 and "is not a regular file (a FIFO, socket or device)" in error_line(err), err


def test_search_outputs_naming_one_file_are_refused_before_any_work(run, tmp_path, capsys, monkeypatch):  # noqa: F811
    from retrieval.visual_similarity import VisualSimilarity

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the outputs were checked")

    monkeypatch.setattr(VisualSimilarity, "from_run", no_model)
    (tmp_path / "d").mkdir()
    (tmp_path / "link.html").symlink_to(tmp_path / "r.json")
    query = str(run["gallery"] / "g0.png")
    for outputs in (["--json", "r.json", "--html", "r.json"], ["--json", "r.json", "--html", "d/../r.json"],
                    ["--json", "r.json", "--html", "link.html"]):
        cwd = os.getcwd()
        os.chdir(tmp_path)
        try:
            code, _, err = cli(["--run", str(run["run"]), "search", query, "--gallery", str(run["gallery"]),
                                *outputs], capsys)
        finally:
            os.chdir(cwd)
        assert code == 2 and "are the same file" in error_line(err), (outputs, err)
    (tmp_path / "look.html").symlink_to(tmp_path / "look.csv")
    code, _, err = cli(["--run", str(run["run"]), "pairs", "--index", str(tmp_path / "ix"), "--top", "3", "-o",
                        str(tmp_path / "look")], capsys)
    assert code == 2 and "are the same file" in error_line(err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "link.html", "look.html"]


def test_a_run_refuses_a_features_file_or_pca_it_was_not_trained_on_and_accepts_them_restored(tmp_path, capsys):
    import torch

    import train
    from adaptation.checkpoint import CHECKPOINT
    from conftest import make_pairs
    from test_similarity import TINY

    make_pairs(tmp_path / "tll", 8)
    extraction = ["-d", str(tmp_path / "tll"), "-s", str(tmp_path / "feats"), "-p", "adapt-pca", "8", *TINY]
    assert extract.main(extraction + ["--data-aug"]) == 0
    folder = tmp_path / "feats" / "tiny_rn"
    assert train.main(["-d", str(folder / "features_pca8.npy"), "--model", "original", "-s", str(tmp_path / "runs"),
                       "-e", "1", "-k", "1", "--seed", "0", "--no-images"]) == 0
    run_dir = tmp_path / "runs" / "run1"
    kept = {f: (folder / f).read_bytes() for f in ("features_pca8.npy", "pca8.npz", "manifest.json")}
    images = [str(tmp_path / "tll" / side / "pair000.png") for side in ("left", "right")]
    pair = ["--run", str(run_dir), "pair", *images]
    capsys.readouterr()
    code, before, err = cli(pair, capsys)
    assert code == 0 and "note:" not in err, err

    assert extract.main(extraction + ["--overwrite"]) == 0  # another configuration (no flips): another PCA
    capsys.readouterr()
    code, _, err = cli(pair, capsys)
    assert code == 2 and f"{folder / 'features_pca8.npy'} is not the features file" in error_line(err), err
    (folder / "features_pca8.npy").write_bytes(kept["features_pca8.npy"])  # the features back: the manifest is new
    code, _, err = cli(pair, capsys)
    assert code == 2 and f"{folder / 'manifest.json'} is not the extraction manifest" in error_line(err), err
    (folder / "manifest.json").write_bytes(kept["manifest.json"])  # the manifest back, the PCA still new
    for argv in (pair, ["--run", str(run_dir), "index", "build", str(tmp_path / "tll" / "left"), "-o",
                        str(tmp_path / "ix")]):
        code, _, err = cli(argv, capsys)
        assert code == 2 and f"{folder / 'pca8.npz'} is not the PCA" in error_line(err) and "restore it" in err, err
    (folder / "pca8.npz").write_bytes(kept["pca8.npz"])  # restored: accepted again, with the same score
    code, after, err = cli(pair, capsys)
    assert code == 0 and after == before, err

    ckpt = torch.load(run_dir / CHECKPOINT, weights_only=True)  # a checkpoint from before provenance still loads
    del ckpt["provenance"]
    ckpt["format_version"] = 1
    torch.save(ckpt, run_dir / CHECKPOINT)
    code, out, err = cli(pair, capsys)
    assert code == 0 and out == before and "records no sha256 of its features file, manifest and PCA" in err, err


def test_train_and_extract_never_write_over_a_folder_that_is_not_theirs(tmp_path, capsys):
    # train.py --overwrite into an extraction (or any folder without runs) and extract.py into a folder
    # holding a run: one line each, nothing touched.
    import extract
    import train
    from conftest import make_pairs, planted_features, run_script

    feats = planted_features(tmp_path / "feats" / "features.npy", 40)
    (tmp_path / "feats" / "manifest.json").write_text("{}")
    before = {p.name: p.read_bytes() for p in (tmp_path / "feats").iterdir()}
    code, _, err = run_script(train, ["-d", feats, "-s", tmp_path / "feats", "-e", "1", "--overwrite"], capsys)
    assert code == 2 and "is not a runs folder (it holds features.npy, manifest.json)" in err
    assert {p.name: p.read_bytes() for p in (tmp_path / "feats").iterdir()} == before

    make_pairs(tmp_path / "tll", 3)
    (tmp_path / "out" / "tiny_rn").mkdir(parents=True)
    (tmp_path / "out" / "tiny_rn" / "features.npy").write_bytes(b"a user's file")
    code, _, err = run_script(extract, ["-d", tmp_path / "tll", "-s", tmp_path / "out", "--model", "tiny_rn",
                                        "--pretrained", "none", "--workers", "0", "--no-progress", "-p", "adapt", "--overwrite"],
                              capsys)
    assert code == 2 and "is not an extraction folder (it holds features.npy)" in err
    assert (tmp_path / "out" / "tiny_rn" / "features.npy").read_bytes() == b"a user's file"
