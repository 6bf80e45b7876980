"""Outputs a command owns: a folder format names its entries, and a command touches nothing else.

One mechanism for every output a command creates or replaces:

- `FolderFormat(what, names, recognise)` declares a folder format: the entry names it writes
  (`fnmatch` patterns) and how an existing folder is told to be one of its own.
- `check_folder(path, fmt, overwrite=..., flag=...)` says, before any work, whether a command may
  write `path`: a missing or empty folder, or (with `overwrite`) a folder of this format that holds
  nothing but its own entries. Anything else is refused in one line that lists what was found, even
  with `overwrite`: a folder holding other files, another format's folder (an extraction, a run),
  an unknown folder, a file. It returns the real folder, links resolved: a symlinked output stays a
  symlink and its target is what is replaced.
- `replacing_folder(real, fmt)` yields a new empty folder beside `real` to write; when the block
  ends well it is swapped in for `real` (an atomic exchange where the kernel has one), and the old
  one removed, so nothing is left beside it; when the block fails, `real` is as it was.
- `check_outputs({flag: path}, overwrite)` checks the output files of one command: none a folder
  or a special file, none existing without `overwrite`, and no two the same file (through links,
  `..` or hard links), all in one line before any work.
- `replacing_entries(folder, old, fmt)`: for a folder whose entries are replaced one by one and which
  may hold other files too (train.py's runs folder): `old` is set aside while the block writes the
  new entries and put back if it fails.

Call `replacing_folder` under the output's lock (`toolkit.lock.sibling_lock`), after `check_folder`.

Example:
    >>> fmt = FolderFormat("an index folder", ("index.faiss", "names.json", "manifest.json"),
    ...                    recognise=lambda folder: (folder / "manifest.json").is_file())
    >>> real = check_folder("photos_index", fmt, overwrite=True, flag="-o")     # doctest: +SKIP
    >>> with replacing_folder(real, fmt) as tmp:                                 # doctest: +SKIP
    ...     (tmp / "names.json").write_text("[]")
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fnmatch
import json
import os
import shutil
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

from .utils import UserError, umask

__all__ = ["FolderFormat", "check_folder", "replacing_folder", "replacing_entries", "check_outputs", "describe_entries",
           "special_kind"]


@dataclass(frozen=True)
class FolderFormat:
    """A folder format: what it is called, the entries it writes, and how to tell an existing one.

    Attributes:
        what: its name in messages, with its article ("an index folder").
        names: `fnmatch` patterns of the entry names the format writes ("run[0-9]*", "manifest.json").
        recognise: given an existing folder that holds only such entries, True when it is one of this
            format's (e.g. its manifest names the format), so `overwrite` may replace it.
    """

    what: str
    names: tuple[str, ...]
    recognise: Callable[[Path], bool]

    def owns(self, name: str) -> bool:
        """Whether an entry called `name` is one this format writes."""
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.names)


def by_manifest(manifest_name: str, fmt: str) -> Callable[[Path], bool]:
    """A `FolderFormat.recognise` for formats that write a JSON manifest naming them (`{"format": fmt}`).

    A folder whose manifest is damaged past reading counts as one (it holds only the format's names,
    checked first), so that writing the format again replaces it; a folder without one does not.
    """
    def recognise(folder: Path) -> bool:
        try:
            manifest = json.loads((folder / manifest_name).read_text())
        except FileNotFoundError:
            return False
        except (OSError, ValueError):
            return True
        return isinstance(manifest, dict) and manifest.get("format") == fmt

    return recognise


def special_kind(path: str | os.PathLike) -> str | None:
    """What a path is when it is not a readable regular file (or a folder), for a message; None otherwise.

    'a FIFO', 'a socket', 'a device', 'a folder', 'a broken link' or 'missing'; None for a regular file.
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "a broken link" if os.path.islink(path) else "missing"
    except OSError as err:
        return f"unreadable ({err.strerror or err})"
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "a device"


def describe_entries(folder: Path, names: list[str], limit: int = 6) -> str:
    """Entry names as a message shows them: folders with a trailing '/', at most `limit`, then how many more."""
    shown = [n + ("/" if (folder / n).is_dir() and not (folder / n).is_symlink() else "") for n in sorted(names)]
    more = f" and {len(shown) - limit} more" if len(shown) > limit else ""
    return ", ".join(shown[:limit]) + more


def check_folder(path: str | os.PathLike, fmt: FolderFormat, *, overwrite: bool, flag: str,
                 must_exist: bool = False) -> Path:
    """The real folder (links resolved) a command may write as `fmt`; a one-line `UserError` otherwise.

    Accepted: a missing folder (unless `must_exist`), an empty one, and, with `overwrite` (or
    `must_exist`, for a command that updates one), a folder `fmt` recognises that holds only entries
    `fmt` names. Deletes nothing; nothing is created.
    """
    shown = os.fspath(path)
    real = Path(os.path.realpath(path))
    if not real.exists():
        if must_exist:
            raise UserError(f"{flag} {shown} does not exist; give {fmt.what}")
        return real
    if not real.is_dir():
        raise UserError(f"{flag} {shown} is {special_kind(real) or 'a file'}, not a folder; choose another {flag}")
    try:
        entries = os.listdir(real)
    except OSError as err:
        raise UserError(f"{flag} {shown}: cannot list it ({err.strerror or err}); fix its permissions") from None
    if not entries:
        if must_exist:
            raise UserError(f"{flag} {shown} is empty, not {fmt.what}")
        return real
    foreign = [e for e in entries if not fmt.owns(e)]
    if foreign:
        raise UserError(f"{flag} {shown} holds {describe_entries(real, foreign)}, which {fmt.what} does not; it is "
                        f"left alone (even with --overwrite): move them out or choose another {flag}")
    if not fmt.recognise(real):
        raise UserError(f"{flag} {shown} is not {fmt.what} (it holds {describe_entries(real, entries)}); it is left "
                        f"alone (--overwrite replaces only {fmt.what}): choose another {flag}")
    if not (overwrite or must_exist):
        raise UserError(f"{flag} {shown} already exists; pass --overwrite or choose another {flag}")
    return real


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step (Linux renameat2 RENAME_EXCHANGE); False where it is not available."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):  # a file system without it
        return False
    raise OSError(err, os.strerror(err), str(b))


def _fsync_tree(folder: Path) -> None:
    for entry in folder.rglob("*"):
        if entry.is_file() and not entry.is_symlink():
            with open(entry, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def replacing_folder(real: str | os.PathLike, fmt: FolderFormat) -> Iterator[Path]:
    """Yield a new empty folder beside `real`; swap it in for `real` when the block ends well.

    `real` is what `check_folder` returned (call both under the output's lock). The new folder
    must hold only entries `fmt` names (a `ValueError` otherwise: a bug of the writer). Its files
    are fsynced, then it takes `real`'s place in one step where the kernel can exchange two
    folders, else by a rename aside and back; the old folder is removed. On any exception, or an
    interrupt, what was written is removed and `real` is left as it was.
    """
    real = Path(real)
    real.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{real.name}.", suffix=".tmp", dir=real.parent))
    aside = None
    try:
        os.chmod(tmp, 0o777 & ~umask())  # mkdtemp's 0700 would make the output private by accident
        yield tmp
        stray = [e for e in os.listdir(tmp) if not fmt.owns(e)]
        if stray:
            raise ValueError(f"{', '.join(stray)} written into {fmt.what}, whose format does not name them")
        _fsync_tree(tmp)
        if not real.exists():
            os.rename(tmp, real)
        elif not _exchange(tmp, real):  # tmp now holds the old folder, removed below
            aside = real.parent / f".{real.name}.old.{os.getpid()}"
            os.rename(real, aside)
            try:
                os.rename(tmp, real)
            except BaseException:
                os.rename(aside, real)
                aside = None
                raise
        _fsync_dir(real.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)


def check_outputs(outputs: Mapping[str, str | os.PathLike | None], overwrite: bool) -> None:
    """Refuse, in one line before any work, output files a command cannot write as asked.

    `outputs` maps each output's flag to its path (None: not asked for). Refused: two outputs
    that are the same file (through links, `..`, or hard links), one that is a folder or a special
    file (a FIFO, socket or device), and one that exists without `overwrite`.
    """
    given = {flag: Path(p) for flag, p in outputs.items() if p is not None}
    seen: dict[str, str] = {}
    for flag, path in given.items():
        key = os.path.realpath(path)
        if os.path.exists(key):
            st = os.stat(key)
            key = f"{st.st_dev}:{st.st_ino}"  # hard links too
        if key in seen:
            raise UserError(f"{seen[key]} {given[seen[key]]} and {flag} {path} are the same file; give each output "
                            f"its own name")
        seen[key] = flag
    for flag, path in given.items():
        kind = special_kind(path)
        if kind in ("a folder", "a FIFO", "a socket", "a device"):  # a path that cannot be made: check_writable's
            raise UserError(f"{flag} {path} is {kind}; give a file name")
        if kind is None and not overwrite:
            raise UserError(f"{flag} {path} already exists; pass --overwrite or choose another name")


@contextlib.contextmanager
def replacing_entries(folder: Path, old: Sequence[Path], fmt: FolderFormat, aside_name: str,
                      interrupted: str) -> Iterator[None]:
    """Run the block with `old` (entries of `fmt` in `folder` being replaced) set aside in `folder/aside_name`.

    They are deleted once the block has succeeded; if it fails or is interrupted, what it wrote
    (entries `fmt` names that were not in `folder` before the block) is removed and they are put back.

    Raises:
        UserError: `interrupted`, when entries set aside by an earlier interrupted replacement are still there.
    """
    aside = folder / aside_name
    if aside.exists():
        raise UserError(interrupted)
    before = set(os.listdir(folder)) if folder.is_dir() else set()
    done = False
    try:
        # Inside the try: an interrupt while they are being moved puts back what was moved.
        if old:
            aside.mkdir(parents=True)
            for path in old:
                path.rename(aside / path.name)
        yield
        done = True
    finally:
        if done:
            shutil.rmtree(aside, ignore_errors=True)
        else:
            _restore(folder, aside, before, fmt)


def _restore(folder: Path, aside: Path, before: set[str], fmt: FolderFormat) -> None:
    """Remove what this run wrote and move the earlier entries back from `aside`.

    What this run wrote: entries `fmt` names that were not in the folder `before` it, or that
    were set aside. An earlier entry that an interrupt left in place, not yet set aside, is kept.
    """
    moved = {p.name for p in aside.iterdir()} if aside.is_dir() else set()
    for path in (folder.iterdir() if folder.is_dir() else []):
        if fmt.owns(path.name) and (path.name not in before or path.name in moved):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    if aside.is_dir():
        for path in aside.iterdir():
            path.rename(folder / path.name)
        aside.rmdir()
