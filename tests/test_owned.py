"""Issue 30: a command never deletes or replaces what it did not create, says exactly why it cannot write a
place, and a gallery with no readable image is one line. One test per example of the issue, each of which
failed before the fix (a user's photos deleted, a user's lock file removed, a user's export replaced...)."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

import extract
import similarity
import train
from conftest import ROOT, TINY, draw_image, make_pairs, planted_features, run_script
from test_similarity import run  # noqa: F401  (run: the module-scoped tiny run fixture)


def error_line(code: int, err: str) -> str:
    lines = [line for line in err.splitlines() if ": error:" in line]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


def photos(folder: Path, n: int = 3) -> dict:
    for i in range(n):
        draw_image(folder / f"photo{i}.png", 300 + i)
    return snapshot(folder)


# --- index build / index add: scratch and lock names that are a user's ------------------------------

def test_a_users_folder_named_like_the_build_scratch_is_never_emptied(run, tmp_path, capsys):  # noqa: F811
    # Before: `index build shots.partial -o shots` took shots.partial/ for its cache and deleted the 6 photos.
    shots = tmp_path / "shots.partial"
    before = photos(shots)
    code, _, err = run_script(similarity, ["--run", run["run"], "index", "build", shots, "-o", tmp_path / "shots",
                                    "--no-progress"], capsys)
    line = error_line(code, err)
    assert "shots.partial" in line and "photo0.png" in line and "left alone" in line, line
    assert snapshot(shots) == before and sorted(p.name for p in tmp_path.iterdir()) == ["shots.partial"]


def test_a_users_folder_named_like_the_add_scratch_is_never_emptied(run, tmp_path, capsys):  # noqa: F811
    index = tmp_path / "ix"
    assert run_script(similarity, ["--run", run["run"], "index", "build", run["gallery"], "-o", index, "--no-progress"],
               capsys)[0] == 0
    mine = tmp_path / "ix.add.partial"
    before = photos(mine)
    indexed = snapshot(index)
    code, _, err = run_script(similarity, ["--run", run["run"], "index", "add", index, run["root"] / "tll" / "left",
                                    "--no-progress"], capsys)
    assert "ix.add.partial" in error_line(code, err)
    assert snapshot(mine) == before and snapshot(index) == indexed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ix", "ix.add.partial"]


def test_a_users_file_named_like_the_lock_file_is_neither_taken_nor_removed(run, tmp_path, capsys):  # noqa: F811
    (tmp_path / ".idx.lock").write_text("my notes")
    code, _, err = run_script(similarity, ["--run", run["run"], "index", "build", run["gallery"], "-o", tmp_path / "idx",
                                    "--no-progress"], capsys)
    assert ".idx.lock" in error_line(code, err) and "not a lock file" in err
    assert (tmp_path / ".idx.lock").read_text() == "my notes"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".idx.lock"]


@pytest.mark.parametrize("command", ["build", "add"])
def test_a_gallery_with_no_readable_image_is_one_line_and_leaves_nothing(run, tmp_path, capsys, command):  # noqa: F811
    # Before: `cannot reshape array of size 0` (a traceback) and IDX.partial / IDX.add.partial left behind.
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.png").write_bytes(b"not an image")
    (bad / "b.jpg").write_bytes(b"")
    index = tmp_path / "ix"
    if command == "add":
        assert run_script(similarity, ["--run", run["run"], "index", "build", run["gallery"], "-o", index, "--no-progress"],
                   capsys)[0] == 0
    before = sorted(p.name for p in tmp_path.iterdir())
    argv = ["index", "build", bad, "-o", index] if command == "build" else ["index", "add", index, bad]
    code, _, err = run_script(similarity, ["--run", run["run"], *argv, "--no-progress"], capsys)
    assert f"no readable image in {bad}" in error_line(code, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


# --- export --------------------------------------------------------------------------------------

def test_export_never_replaces_a_users_folder_whose_manifest_is_not_an_exports(run, tmp_path, capsys):  # noqa: F811
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    mine = tmp_path / "exp"
    mine.mkdir()
    (mine / "encoder.onnx").write_bytes(b"my own graph")
    (mine / "manifest.json").write_text("format: mine\nversion: 3\n")  # YAML: cannot be parsed as JSON
    before = snapshot(mine)
    for extra in ([], ["--overwrite"]):
        code, _, err = run_script(similarity, ["--run", run["run"], "export", "-o", mine, *extra], capsys)
        line = error_line(code, err)
        assert "is not an ONNX export" in line and "pass --overwrite" not in line, line
        assert snapshot(mine) == before


def test_a_killed_export_leaves_leftovers_that_a_rerun_removes_and_only_those(run, tmp_path, capsys):  # noqa: F811
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    out = tmp_path / "exp"
    # An export killed (os._exit: no clean-up, as kill -9) once its graph is written.
    code = ("import os, sys; sys.path.insert(0, sys.argv[1]); os.chdir(sys.argv[1])\n"
            "import similarity; from retrieval import export\n"
            "write = export.write_graph\n"
            "def dies(*a, **k):\n    write(*a, **k); os._exit(9)\n"
            "export.write_graph = dies\n"
            "similarity.main(['--run', sys.argv[2], 'export', '-o', sys.argv[3]])\n")
    killed = subprocess.run([sys.executable, "-c", code, str(ROOT), str(run["run"]), str(out)], capture_output=True,
                            timeout=300)
    assert killed.returncode == 9, killed.stderr[-2000:]
    left = [p for p in tmp_path.iterdir() if p.name.startswith(".exp.") and p.name.endswith(".tmp")]
    assert len(left) == 1 and (left[0] / "encoder.onnx").is_file()
    users = tmp_path / ".exp.mine.tmp"  # a user's folder of the same shape, not marked as the export's
    users.mkdir()
    (users / "notes.txt").write_text("mine")
    assert run_script(similarity, ["--run", run["run"], "export", "-o", out], capsys)[0] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [".exp.mine.tmp", "exp"]
    assert (users / "notes.txt").read_text() == "mine"


# --- train.py --overwrite --------------------------------------------------------------------------

def test_train_overwrite_never_deletes_a_users_avg_summary_or_run_named_folder(tmp_path, capsys):
    feats = planted_features(tmp_path / "f" / "features.npy", 40)
    argv = ["-d", feats, "-e", "1", "--no-images", "--overwrite"]
    # No runs, but a user's avg/ and summary.json: before, both were deleted.
    mine = tmp_path / "mine"
    (mine / "avg").mkdir(parents=True)
    (mine / "avg" / "plot.png").write_bytes(b"png")
    (mine / "summary.json").write_text('{"my": "summary"}')
    before = snapshot(mine)
    code, _, err = run_script(train, argv + ["-s", mine], capsys)
    line = error_line(code, err)
    assert "avg/, summary.json" in line and "left alone" in line, line
    assert snapshot(mine) == before
    # Real runs beside a user's run2024/ (no config.json, no checkpoint): before, it was deleted as a run.
    runs = tmp_path / "runs"
    assert run_script(train, ["-d", feats, "-s", runs, "-e", "1", "-r", "2", "--no-images"], capsys)[0] == 0
    (runs / "run2024").mkdir()
    (runs / "run2024" / "notes.txt").write_text("mine")
    before = snapshot(runs)
    code, _, err = run_script(train, argv + ["-s", runs], capsys)
    assert "run2024/" in error_line(code, err)
    assert snapshot(runs) == before
    (runs / "run2024" / "notes.txt").rename(tmp_path / "notes.txt")
    (runs / "run2024").rmdir()
    assert run_script(train, argv + ["-s", runs], capsys)[0] == 0  # train.py's own runs are replaced as before


# --- extract.py into another command's folder --------------------------------------------------------

def test_extract_into_an_index_or_export_folder_is_refused_without_advising_overwrite(run, tmp_path, capsys):  # noqa: F811
    index = tmp_path / "ix"
    assert run_script(similarity, ["--run", run["run"], "index", "build", run["gallery"], "-o", index, "--no-progress"],
               capsys)[0] == 0
    nested = tmp_path / "save" / "tiny_rn"  # SAVE/MODEL is the index
    assert run_script(similarity, ["--run", run["run"], "index", "build", run["gallery"], "-o", nested, "--no-progress"],
               capsys)[0] == 0
    before = snapshot(tmp_path)
    base = ["-d", run["root"] / "tll", "-p", "adapt", *TINY]
    for save, says in ((index, "another command's output folder"), (tmp_path / "save", "not an extraction folder")):
        for extra in ([], ["--overwrite"]):
            code, _, err = run_script(extract, base + ["-s", save, *extra], capsys)
            line = error_line(code, err)
            assert says in line and "visual-similarity-index" in line and "pass --overwrite" not in line, line
            assert snapshot(tmp_path) == before


def test_extract_never_takes_or_removes_a_users_partial_folder(tmp_path, capsys):
    make_pairs(tmp_path / "tll", 3)
    model = tmp_path / "o" / "tiny_rn"
    (model / ".partial").mkdir(parents=True)
    (model / ".partial" / "draft.txt").write_text("mine")
    for extra in ([], ["--overwrite"]):
        code, _, err = run_script(extract, ["-d", tmp_path / "tll", "-s", tmp_path / "o", "-p", "adapt", *TINY, *extra], capsys)
        assert "draft.txt" in error_line(code, err) and "left alone" in err
        assert sorted(p.name for p in model.rglob("*")) == [".partial", "draft.txt"]


def test_extract_never_replaces_a_users_file_named_like_a_new_output(tmp_path, capsys):
    make_pairs(tmp_path / "tll", 5)
    argv = ["-d", tmp_path / "tll", "-s", tmp_path / "o", *TINY]
    assert run_script(extract, argv + ["-p", "adapt"], capsys)[0] == 0
    model = tmp_path / "o" / "tiny_rn"
    (model / "pca4.npz").write_bytes(b"a user's file")  # not in the manifest: the next run would write that name
    code, _, err = run_script(extract, argv + ["-p", "adapt-pca", "4", "--overwrite"], capsys)
    assert "pca4.npz" in error_line(code, err) and "did not write" in err
    assert (model / "pca4.npz").read_bytes() == b"a user's file"
    (model / "pca4.npz").unlink()
    assert run_script(extract, argv + ["-p", "adapt-pca", "4", "--overwrite"], capsys)[0] == 0


# --- a place that cannot be renamed over --------------------------------------------------------------

def test_an_empty_mount_point_as_output_is_one_line_that_says_so(run, tmp_path, capsys, monkeypatch):  # noqa: F811
    # rename(2) over a mount point fails with EBUSY; before, the message said "free some space".
    mount = tmp_path / "mnt"
    mount.mkdir()
    real_rename = os.rename

    def busy(src, dst, *a, **k):
        if Path(dst) == mount:
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), str(dst))
        return real_rename(src, dst, *a, **k)

    monkeypatch.setattr(os, "rename", busy)
    code, _, err = run_script(similarity, ["--run", run["run"], "index", "build", run["gallery"], "-o", mount, "--no-progress"],
                       capsys)
    line = error_line(code, err)
    assert "mount point" in line and "free some space" not in line and f"-o {mount}" in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mnt"] and not any(mount.iterdir())
    monkeypatch.setattr(os.path, "ismount", lambda p: Path(p) == mount)  # found before the work when it can be told
    code, _, err = run_script(similarity, ["--run", run["run"], "index", "build", run["gallery"], "-o", mount, "--no-progress"],
                       capsys)
    assert "mount point" in error_line(code, err)


def test_the_demo_never_deletes_a_users_gallery_folder(tmp_path, capsys):
    # Found beyond the examples: demo.py removed OUT/gallery (whatever it held) to copy its gallery there.
    import demo

    before = photos(tmp_path / "gallery")
    code, _, err = run_script(demo, ["--out", tmp_path, "--model", "tiny_rn"], capsys)
    assert "gallery" in error_line(code, err) and "left alone" in err
    assert snapshot(tmp_path / "gallery") == before and sorted(p.name for p in tmp_path.iterdir()) == ["gallery"]
