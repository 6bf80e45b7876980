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


def test_an_atomic_write_through_a_symlink_keeps_the_link(tmp_path):
    from toolkit.utils import write_json

    (tmp_path / "real.json").write_text("{}")
    (tmp_path / "link.json").symlink_to("real.json")
    write_json(tmp_path / "link.json", {"a": 1})
    assert (tmp_path / "link.json").is_symlink() and '"a": 1' in (tmp_path / "real.json").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.json", "real.json"]
