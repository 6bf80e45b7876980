"""An operating-system lock on an output folder, so two runs never write into the same one.

`folder_lock(path)` takes an exclusive `flock` on the folder itself (no lock file is left
behind). The lock belongs to the open file description, so the kernel releases it when the
process ends, however it ends: a crashed run never leaves a stale lock. A second run that
finds the folder locked stops at once with a `UserError` naming the process that holds it
(read from `/proc/locks` where there is one).

Example:
    >>> with folder_lock("out/clip_rn50x4", "-s"):      # doctest: +SKIP
    ...     pass                                        # only this process writes there now
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import Iterator

from .utils import UserError

__all__ = ["folder_lock", "lock_holder"]


def lock_holder(folder: str | os.PathLike) -> int | None:
    """The pid holding a flock on `folder`, from /proc/locks (None when it cannot be told)."""
    try:
        st = os.stat(folder)
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return None
    # e.g. "3: FLOCK  ADVISORY  WRITE 12345 fd:01:1234567 0 EOF"; the device is hex major:minor.
    wanted = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    for line in lines:
        parts = line.split()
        if len(parts) >= 6 and parts[1] == "FLOCK" and parts[5] == wanted:
            return int(parts[4])
    return None


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, flag: str) -> Iterator[Path]:
    """Create `folder` if needed and hold an exclusive lock on it for the block.

    Raises `UserError` (naming the holder) when another process holds it. If this call
    created the folder (or its parents) and the block leaves them empty, they are removed again.
    """
    folder = Path(folder)
    created = [p for p in (folder, *folder.parents) if not p.exists()]  # deepest first
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = lock_holder(folder)
            who = f"process {pid}" if pid else "another process"
            raise UserError(f"{flag} {folder} is being written by {who} (another run of this command?); wait for "
                            f"it to finish, or choose another {flag}") from None
        try:
            yield folder
        finally:
            for made in created:  # what this call made, left empty by the block: removed again
                if made.is_dir() and not any(made.iterdir()):
                    made.rmdir()
    finally:
        os.close(fd)  # releases the lock
