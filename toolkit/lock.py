"""Operating-system locks on outputs, so two runs never write the same one: one helper, two places.

- `folder_lock(path, flag)` takes an exclusive `flock` on the folder itself (no lock file is left
  behind): for folders whose files are replaced one by one (extract.py's `SAVE/MODEL`, train.py's runs).
- `sibling_lock(path, flag)` locks a hidden file `.NAME.lock` beside `path`: for an output that is
  replaced whole by a rename (an index folder), where a lock on the old folder would not guard the
  new one. The lock file is removed again when the lock is released. It is created whole, with a
  signature (`LOCK_SIGNATURE`), under a temporary name and linked into place, so a file of that name
  without the signature (a user's) is never taken for a lock file, locked or removed: the command
  stops, naming it.

A lock belongs to the open file description, so the kernel releases it when the process ends,
however it ends: a crashed run never leaves a stale lock (a lock file a crash leaves behind is
taken over by the next run). A second run that finds the output locked stops at once with a
`UserError` naming the process that holds it (read from `/proc/locks` where there is one).

Example:
    >>> with folder_lock("out/clip_rn50x4", "-s"):      # doctest: +SKIP
    ...     pass                                        # only this process writes there now
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
import tempfile
import time
from pathlib import Path
from typing import Iterator

from .utils import UserError, first_line, umask

__all__ = ["LockBusy", "LockUnwritable", "folder_lock", "sibling_lock", "lock_holder", "lock_file_of", "LOCK_SIGNATURE"]

LOCK_SIGNATURE = b"toolkit.lock: the lock file of a writer of the output beside it; removed when the writer ends\n"


def lock_holder(path: str | os.PathLike) -> int | None:
    """The pid holding a flock on `path` (a folder or a file), from /proc/locks (None when it cannot be told)."""
    try:
        st = os.stat(path)
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


class LockBusy(UserError):
    """The output stayed locked by another process (for `wait_s`, when the caller waits)."""


class LockUnwritable(UserError):
    """The lock file cannot be made: the folder cannot be written (read-only, full, not a folder)."""


def _take(fd: int, locked: Path, shown: str, flag: str, wait_s: float = 0.0) -> None:
    """flock `fd` (open on `locked`) or raise the one `LockBusy` both helpers give, naming the holder.

    With `wait_s`, a held lock is tried again until that many seconds have passed (for a writer
    worth waiting for, e.g. another run filling the same cache entry). The holder is looked up
    after the lock was refused; when /proc/locks no longer shows one, the holder released the lock
    in between (it just finished), so the lock is tried again rather than refused without a name
    (two extractions started together met that race in a CI run)."""
    deadline = time.monotonic() + wait_s
    tries = 0
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pid = lock_holder(locked)
        tries += 1
        if time.monotonic() < deadline:
            time.sleep(0.1)
        elif pid or tries >= 3:
            break
    who = f"process {pid}" if pid else "another process"
    raise LockBusy(f"{flag} {shown} is being written by {who} (another run of this command?); wait for it to "
                   f"finish, or choose another {flag}") from None


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
        _take(fd, folder, str(folder), flag)
        try:
            yield folder
        finally:
            for made in created:  # what this call made, left empty by the block: removed again
                if made.is_dir() and not any(made.iterdir()):
                    made.rmdir()
    finally:
        os.close(fd)  # releases the lock


def lock_file_of(target: str | os.PathLike) -> Path:
    """The lock file `sibling_lock` uses for `target`: `.NAME.lock` beside the real (link-resolved) target."""
    real = Path(os.path.realpath(target))
    return real.parent / f".{real.name}.lock"


def _open_lock_file(lock_file: Path, shown: str, flag: str) -> int:
    """An open descriptor on this toolkit's lock file `lock_file`, made (whole, signed) when missing.

    Raises `UserError` when the folder cannot be written, or when a file of that name is not a lock
    file of this toolkit (no signature: a user's file, a link), which is left as it is.
    """
    while True:
        try:
            fd = os.open(lock_file, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            _create_lock_file(lock_file, shown)
            continue  # made (or another writer made it first): open it
        except OSError as err:
            if os.path.lexists(lock_file):  # a link, a folder: not a lock file
                break
            raise LockUnwritable(f"cannot write next to {shown} ({first_line(err)}); choose a writable folder") from None
        if stat.S_ISREG(os.fstat(fd).st_mode) and os.pread(fd, len(LOCK_SIGNATURE), 0) == LOCK_SIGNATURE:
            return fd
        os.close(fd)
        break
    raise UserError(f"{flag} {shown}: {lock_file} is in the way: it is not a lock file of this toolkit (the name is the "
                    f"one its writers lock); it is left alone: move it away or choose another {flag}")


def _create_lock_file(lock_file: Path, shown: str) -> None:
    """Create `lock_file` whole: written under an unpredictable name, then linked into place unless one is already there."""
    try:
        lock_file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f"{lock_file.name}.", suffix=".tmp", dir=lock_file.parent)
    except OSError as err:
        raise LockUnwritable(f"cannot write next to {shown} ({first_line(err)}); choose a writable folder") from None
    try:
        os.write(fd, LOCK_SIGNATURE)
        os.fchmod(fd, 0o666 & ~umask())  # any user who may write the output may wait for its lock
        with contextlib.suppress(FileExistsError):
            os.link(tmp, lock_file)
    except OSError as err:
        raise LockUnwritable(f"cannot write next to {shown} ({first_line(err)}); choose a writable folder") from None
    finally:
        os.close(fd)
        os.unlink(tmp)


@contextlib.contextmanager
def sibling_lock(target: str | os.PathLike, flag: str, wait_s: float = 0.0) -> Iterator[Path]:
    """Hold an exclusive lock on `target` through the file `lock_file_of(target)`; yields the real target.

    A lock held by another process is a `LockBusy` at once, or after `wait_s` seconds of trying.

    A symlinked target is locked (and, by the caller, written) where the link points, so the link
    stays a link. The lock file is made for the block and removed after it; whoever finds it held
    gets a `UserError` naming the holder. A lock file removed or replaced between its opening and
    its locking (its holder finishing) is opened again, so two writers never hold two files.
    """
    real = Path(os.path.realpath(target))
    lock_file = lock_file_of(real)
    shown = str(target)
    while True:
        fd = _open_lock_file(lock_file, shown, flag)
        try:
            _take(fd, lock_file, shown, flag, wait_s)
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(lock_file))
            except FileNotFoundError:
                same = False
        except BaseException:
            os.close(fd)
            raise
        if same:
            break
        os.close(fd)  # the holder removed it while we waited for it: lock the new one
    try:
        yield real
    finally:
        with contextlib.suppress(FileNotFoundError):
            lock_file.unlink()  # still holding the lock: a waiter that opened this file sees it gone, above
        os.close(fd)
