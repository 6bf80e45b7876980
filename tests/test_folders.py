"""toolkit.lock (one lock helper for folders and for sibling lock files) and toolkit.folders (owned output folders)."""

from __future__ import annotations

import os

import pytest

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
    lock_file_of(tmp_path / "ix").write_text("")  # no process holds it
    with sibling_lock(tmp_path / "ix", "-o"):
        pass
    assert not lock_file_of(tmp_path / "ix").exists()
