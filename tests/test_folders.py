"""toolkit.lock (one lock helper for folders and for sibling lock files) and toolkit.folders (owned output folders)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import ROOT

from toolkit.lock import folder_lock, lock_file_of, sibling_lock
from toolkit.utils import UserError


@pytest.mark.parametrize("helper", [folder_lock, sibling_lock])
def test_both_locks_name_the_holder_and_leave_nothing(tmp_path, helper):
    target = tmp_path / "out"
    with helper(target, "-o"):
        with pytest.raises(UserError, match=f"-o {target} is being written by process {os.getpid()}"):
            with helper(target, "-o"):
                pass
    with helper(target, "-o"):  # released: taken again
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no lock file, no folder made by the lock


def test_sibling_lock_of_a_link_is_beside_its_target(tmp_path):
    (tmp_path / "v1").mkdir()
    (tmp_path / "links").mkdir()
    (tmp_path / "links" / "current").symlink_to(tmp_path / "v1")
    with sibling_lock(tmp_path / "links" / "current", "-o") as real:
        assert real == tmp_path / "v1" and lock_file_of(tmp_path / "links" / "current").is_file()
        assert sorted(p.name for p in (tmp_path / "links").iterdir()) == ["current"]
        with pytest.raises(UserError, match="is being written"):  # the same index through its real name
            with sibling_lock(tmp_path / "v1", "-o"):
                pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["links", "v1"]


def test_a_lock_file_left_by_a_crash_is_taken_over(tmp_path):
    # A writer killed while it held the lock (os._exit: no clean-up) leaves its lock file; no process holds it.
    code = ("import os, sys; sys.path.insert(0, sys.argv[2]); from toolkit.lock import sibling_lock\n"
            "with sibling_lock(sys.argv[1], '-o'):\n    os._exit(9)")
    assert subprocess.run([sys.executable, "-c", code, str(tmp_path / "ix"), str(ROOT)], timeout=60).returncode == 9
    assert lock_file_of(tmp_path / "ix").is_file()
    with sibling_lock(tmp_path / "ix", "-o"):
        pass
    assert not lock_file_of(tmp_path / "ix").exists()


def fmt():
    from toolkit.folders import FolderFormat

    return FolderFormat("a test folder", ("data.bin", "run[0-9]*"), lambda folder: (folder / "data.bin").is_file())


def test_check_folder_accepts_only_missing_empty_or_its_own_with_overwrite(tmp_path):
    from toolkit.folders import check_folder

    assert check_folder(tmp_path / "new", fmt(), overwrite=False, flag="-o") == tmp_path / "new"
    (tmp_path / "empty").mkdir()
    assert check_folder(tmp_path / "empty", fmt(), overwrite=False, flag="-o") == tmp_path / "empty"
    own = tmp_path / "own"
    own.mkdir()
    (own / "data.bin").write_bytes(b"1")
    (own / "run1").mkdir()
    with pytest.raises(UserError, match="already exists; pass --overwrite"):
        check_folder(own, fmt(), overwrite=False, flag="-o")
    assert check_folder(own, fmt(), overwrite=True, flag="-o") == own
    (own / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match=r"-o .*own holds notes.txt, which a test folder does not; it is left alone"):
        check_folder(own, fmt(), overwrite=True, flag="-o")
    other = tmp_path / "other"
    other.mkdir()
    (other / "run2").mkdir()  # only owned names, but not recognised as one
    with pytest.raises(UserError, match=r"is not a test folder \(it holds run2/\)"):
        check_folder(other, fmt(), overwrite=True, flag="-o")
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file, not a folder"):
        check_folder(tmp_path / "file", fmt(), overwrite=True, flag="-o")
    (tmp_path / "link").symlink_to(own)
    (own / "notes.txt").unlink()
    assert check_folder(tmp_path / "link", fmt(), overwrite=True, flag="-o") == own


def test_replacing_folder_swaps_whole_or_not_at_all_and_leaves_nothing_beside(tmp_path):
    from toolkit.folders import replacing_folder

    real = tmp_path / "out"
    real.mkdir()
    (real / "data.bin").write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with replacing_folder(real, fmt()) as tmp:
            (tmp / "data.bin").write_bytes(b"half")
            raise RuntimeError("disk full")
    assert (real / "data.bin").read_bytes() == b"old"
    with pytest.raises(ValueError, match="stray.txt"):  # a writer that writes what the format does not name
        with replacing_folder(real, fmt()) as tmp:
            (tmp / "stray.txt").write_text("x")
    with replacing_folder(real, fmt()) as tmp:
        (tmp / "data.bin").write_bytes(b"new")
    assert (real / "data.bin").read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_check_outputs_refuses_one_file_under_two_names(tmp_path):
    from toolkit.folders import check_outputs

    (tmp_path / "a.json").write_text("{}")
    os.link(tmp_path / "a.json", tmp_path / "b.html")
    with pytest.raises(UserError, match="--json .*a.json and --html .*b.html are the same file"):
        check_outputs({"--json": tmp_path / "a.json", "--html": tmp_path / "b.html"}, overwrite=True)
    check_outputs({"--json": tmp_path / "a.json", "--html": tmp_path / "c.html", "--csv": None}, overwrite=True)
    os.mkfifo(tmp_path / "p.csv")
    with pytest.raises(UserError, match="--csv .*p.csv is a FIFO"):
        check_outputs({"--csv": tmp_path / "p.csv"}, overwrite=True)


def test_check_outputs_replaces_only_files_ours_recognises(tmp_path):
    from toolkit.folders import check_outputs

    (tmp_path / "mine.json").write_text("ours")
    (tmp_path / "user.json").write_text("a user's")
    ours = lambda path: path.read_text() == "ours"  # noqa: E731
    check_outputs({"--json": tmp_path / "mine.json", "--csv": tmp_path / "new.csv"}, overwrite=True, ours=ours)
    with pytest.raises(UserError, match="--json .*user.json exists and is not a file this command wrote"):
        check_outputs({"--json": tmp_path / "user.json"}, overwrite=True, ours=ours)
    with pytest.raises(UserError, match="already exists; pass --overwrite"):  # without --overwrite: refused first
        check_outputs({"--json": tmp_path / "mine.json"}, overwrite=False, ours=ours)
    assert (tmp_path / "user.json").read_text() == "a user's"


def test_an_atomic_write_through_a_symlink_keeps_the_link(tmp_path):
    from toolkit.utils import write_json

    (tmp_path / "real.json").write_text("{}")
    (tmp_path / "link.json").symlink_to("real.json")
    write_json(tmp_path / "link.json", {"a": 1})
    assert (tmp_path / "link.json").is_symlink() and '"a": 1' in (tmp_path / "real.json").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.json", "real.json"]


def test_a_manifest_that_cannot_be_parsed_or_names_another_format_is_not_the_formats(tmp_path):
    from toolkit.folders import FolderFormat, by_manifest, check_folder

    fmt = FolderFormat("an export", ("encoder.onnx", "manifest.json"), by_manifest("manifest.json", "export/1"))
    for text in ("format: export/1\n", '{"format": "something else"}', "[]", '{"version": 1}'):
        (tmp_path / "out").mkdir(exist_ok=True)
        (tmp_path / "out" / "encoder.onnx").write_bytes(b"mine")
        (tmp_path / "out" / "manifest.json").write_text(text)
        with pytest.raises(UserError, match="is not an export") as refused:
            check_folder(tmp_path / "out", fmt, overwrite=True, flag="-o")
        assert "pass --overwrite" not in str(refused.value)
    (tmp_path / "out" / "manifest.json").write_text('{"format": "export/1"}')
    assert check_folder(tmp_path / "out", fmt, overwrite=True, flag="-o") == tmp_path / "out"


def test_a_scratch_folder_is_resumed_or_removed_only_when_its_marker_is_the_commands(tmp_path):
    from toolkit.folders import MARKER, claim_scratch, discard_scratch, scratch_format

    fmt = scratch_format("a build's chunks", "tool", ("chunk*.npz",))
    work = tmp_path / "x.partial"
    assert claim_scratch(work, fmt, owner="tool", flag="-o", shown="x") is True  # made, with its marker
    (work / "chunk1.npz").write_bytes(b"1")
    assert claim_scratch(work, fmt, owner="tool", flag="-o", shown="x") is False  # its own: resumed
    other = scratch_format("a build's chunks", "another tool", ("chunk*.npz",))
    with pytest.raises(UserError, match=r"-o x: .*x.partial is in the way.*left alone"):
        claim_scratch(work, other, owner="another tool", flag="-o", shown="x")
    assert not discard_scratch(work, other) and work.is_dir()
    (work / "notes.txt").write_text("dropped in by hand")  # a name the command never writes: not removed
    assert not discard_scratch(work, fmt) and (work / "notes.txt").is_file()
    (work / "notes.txt").unlink()
    assert discard_scratch(work, fmt) and not work.exists()
    users = tmp_path / "shots.partial"  # a user's folder of that name: refused, kept
    users.mkdir()
    (users / "photo.png").write_bytes(b"png")
    with pytest.raises(UserError, match="photo.png"):
        claim_scratch(users, fmt, owner="tool", flag="-o", shown="shots")
    assert not discard_scratch(users, fmt) and sorted(os.listdir(users)) == ["photo.png"]
    (users / MARKER).write_text("{not json")
    assert not discard_scratch(users, fmt) and (users / "photo.png").is_file()


def test_a_killed_writers_staging_folder_is_removed_by_the_next_writer_and_no_other(tmp_path):
    from toolkit.folders import replacing_folder

    real = tmp_path / "out"
    code = ("import os, sys; sys.path.insert(0, sys.argv[2]); from pathlib import Path\n"
            "from toolkit.folders import FolderFormat, replacing_folder\n"
            "fmt = FolderFormat('a test folder', ('data.bin',), lambda f: True)\n"
            "with replacing_folder(Path(sys.argv[1]), fmt) as tmp:\n"
            "    (tmp / 'data.bin').write_bytes(b'half'); os._exit(9)")
    assert subprocess.run([sys.executable, "-c", code, str(real), str(ROOT)], timeout=60).returncode == 9
    (tmp_path / ".out.mine.tmp").mkdir()  # a user's folder named like one: no marker
    (tmp_path / ".out.mine.tmp" / "data.bin").write_bytes(b"mine")
    (tmp_path / ".outer.x.tmp").mkdir()
    assert len([p for p in tmp_path.iterdir() if p.name.startswith(".out.")]) == 2
    with replacing_folder(real, fmt()) as tmp:
        (tmp / "data.bin").write_bytes(b"new")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.mine.tmp", ".outer.x.tmp", "out"]
    assert (real / "data.bin").read_bytes() == b"new"


def test_a_shared_folder_replaces_only_entries_the_format_recognises(tmp_path):
    from toolkit.folders import FolderFormat, check_shared_folder

    fmt = FolderFormat("a runs folder", ("run[0-9]*", "summary.json"), lambda f: True,
                       own=lambda p: (p / "config.json").is_file() if p.is_dir() else p.read_text() == "ours")
    runs = tmp_path / "runs"
    assert check_shared_folder(runs, fmt, overwrite=False, flag="-s") == []
    (runs / "run1").mkdir(parents=True)
    (runs / "run1" / "config.json").write_text("{}")
    (runs / "notes.txt").write_text("kept beside")
    with pytest.raises(UserError, match="already holds a runs folder; pass --overwrite"):
        check_shared_folder(runs, fmt, overwrite=False, flag="-s")
    assert check_shared_folder(runs, fmt, overwrite=True, flag="-s") == [runs / "run1"]
    (runs / "summary.json").write_text("a user's")
    with pytest.raises(UserError, match=r"holds summary.json, named like a runs folder's own entries but not written"):
        check_shared_folder(runs, fmt, overwrite=True, flag="-s")
    (runs / "summary.json").unlink()
    (runs / "run1" / "config.json").unlink()
    with pytest.raises(UserError, match="holds run1/"):
        check_shared_folder(runs, fmt, overwrite=True, flag="-s")
    (runs / "run1").rmdir()
    with pytest.raises(UserError, match=r"is not a runs folder \(it holds notes.txt\)"):
        check_shared_folder(runs, fmt, overwrite=False, flag="-s")
