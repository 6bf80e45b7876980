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
- `check_outputs({flag: path}, overwrite, ours)` checks the output files of one command: none a folder
  or a special file, none existing without `overwrite`, none existing that `ours` does not recognise
  as the command's own (even with `overwrite`), and no two the same file (through links, `..` or hard
  links), all in one line before any work.
- `check_shared_folder(path, fmt, overwrite=..., flag=...)` is `check_folder` for a format whose
  folder may hold other files beside its entries (train.py's runs folder, extract.py's SAVE/MODEL):
  each entry bearing one of the format's names must be recognised as the format's own
  (`FolderFormat.own`), else it is refused, even with `overwrite`; it returns the entries
  `overwrite` replaces. `replacing_entries(folder, old, fmt, ...)` sets those aside while the block
  writes the new ones and puts them back if it fails.
- Scratch folders a command keeps between runs (a resumable build's chunks: `IDX.partial/`,
  `MODEL/.partial/`) are made by `claim_scratch`, exclusively, with a marker file (`MARKER`)
  written at creation; one found later is resumed, or removed by `discard_scratch`, only when its
  marker says it is this command's and it holds nothing but the names it writes. A folder that
  merely bears the name (a user's `photos.partial/`) is never touched: the command stops, naming it.

The rule behind every helper: a command never deletes or replaces what it did not create. A
manifest that cannot be parsed, or that names another format, is not the format's own; temporary
names are unpredictable (`mkdtemp`) and marked, so a rerun removes its own leftovers, and only those.

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

__all__ = ["FolderFormat", "MARKER", "by_manifest", "manifest_format", "check_folder", "check_shared_folder",
           "replacing_folder", "replacing_entries", "scratch_format", "claim_scratch", "is_own_scratch", "discard_scratch", "check_outputs",
           "describe_entries", "special_kind"]

MARKER = ".made-by.json"
"""The marker file a command writes into a folder it creates for itself (scratch, staging): its proof of ownership."""


@dataclass(frozen=True)
class FolderFormat:
    """A folder format: what it is called, the entries it writes, and how to tell an existing one.

    Attributes:
        what: its name in messages, with its article ("an index folder").
        names: `fnmatch` patterns of the entry names the format writes ("run[0-9]*", "manifest.json").
        recognise: given an existing folder that holds only such entries, True when it is one of this
            format's (e.g. its manifest names the format), so `overwrite` may replace it.
        own: for a folder shared with other files (`check_shared_folder`): given an existing entry
            bearing one of `names`, True when the format wrote it (a run's config.json, a summary of
            the format's shape); None for a folder the format holds whole.
    """

    what: str
    names: tuple[str, ...]
    recognise: Callable[[Path], bool]
    own: Callable[[Path], bool] | None = None

    def owns(self, name: str) -> bool:
        """Whether an entry called `name` is one this format writes."""
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.names)


def manifest_format(path: Path) -> str | None:
    """The `format` a JSON manifest at `path` names; None when it is missing, unreadable, not JSON or names none."""
    try:
        if not path.is_file():  # a FIFO would block the read
            return None
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return manifest.get("format") if isinstance(manifest, dict) and isinstance(manifest.get("format"), str) else None


def by_manifest(manifest_name: str, fmt: str) -> Callable[[Path], bool]:
    """A `FolderFormat.recognise` for formats that write a JSON manifest naming them (`{"format": fmt}`).

    A manifest that cannot be parsed, or names another format (or none), is not the format's: such a
    folder is refused, even with `--overwrite`, since nothing shows the command wrote it.
    """
    def recognise(folder: Path) -> bool:
        return manifest_format(folder / manifest_name) == fmt

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
        if os.path.ismount(real):
            raise _mount_point(flag, shown)
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


def _mount_point(flag: str, shown: str) -> UserError:
    return UserError(f"{flag} {shown} is a mount point (or busy): it cannot be replaced by a rename, and the output is "
                     f"written whole beside it, then renamed into place; give a new folder inside it, e.g. "
                     f"{flag} {os.path.join(shown, 'out')}")


def check_shared_folder(path: str | os.PathLike, fmt: FolderFormat, *, overwrite: bool, flag: str,
                        not_empty: str | None = None) -> list[Path]:
    """The entries of `fmt` that writing `path` as `fmt` will replace; a one-line `UserError` when it may not.

    For a format whose folder may hold other files beside its own entries (`fmt.own` says which
    entries bearing its names it wrote). Refused, even with `overwrite`: a file; an entry bearing one
    of `fmt`'s names that `fmt.own` does not recognise (a user's `run2024/`, a user's `summary.json`);
    a non-empty folder holding none of `fmt`'s own entries (another tool's folder). Refused without
    `overwrite` (saying `not_empty`, when given): a folder holding `fmt`'s own entries. Deletes nothing.
    """
    shown = os.fspath(path)
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{flag} {shown} is {special_kind(folder) or 'a file'}, not a folder; choose another {flag}")
    try:
        entries = sorted(os.listdir(folder)) if folder.is_dir() else []
    except OSError as err:
        raise UserError(f"{flag} {shown}: cannot list it ({err.strerror or err}); fix its permissions") from None
    named = [e for e in entries if fmt.owns(e)]
    assert fmt.own is not None, "check_shared_folder needs a format that tells its own entries"
    strangers = [e for e in named if not fmt.own(folder / e)]
    if strangers:
        raise UserError(f"{flag} {shown} holds {describe_entries(folder, strangers)}, named like {fmt.what}'s own "
                        f"entries but not written as one; left alone (even with --overwrite): move or rename them, "
                        f"or choose another {flag}")
    if entries and not named:
        raise UserError(f"{flag} {shown} is not {fmt.what} (it holds {describe_entries(folder, entries)}); it is left "
                        f"alone (--overwrite replaces only {fmt.what}'s own entries): choose another {flag}")
    if named and not overwrite:
        raise UserError(not_empty or f"{flag} {shown} already holds {fmt.what}; pass --overwrite or choose another {flag}")
    return [folder / e for e in named]


def scratch_format(what: str, owner: str, names: tuple[str, ...]) -> FolderFormat:
    """The format of a scratch folder `owner` keeps (`names`, and its `MARKER` naming `owner`)."""
    return FolderFormat(what, (*names, MARKER), lambda folder: _marker_owner(folder) == owner)


def _marker_owner(folder: Path) -> str | None:
    marker = folder / MARKER
    try:
        if marker.is_symlink() or not marker.is_file():
            return None
        found = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    return found.get("owner") if isinstance(found, dict) else None


def _mark(folder: Path, owner: str, **extra: str) -> None:
    """Write `folder`'s `MARKER` (exclusively: a marker is never written over)."""
    fd = os.open(folder / MARKER, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
    with os.fdopen(fd, "w") as fh:
        json.dump({"owner": owner, **extra}, fh)


def is_own_scratch(folder: Path, fmt: FolderFormat) -> bool:
    """`folder` is a real folder (not a link) whose marker is `fmt`'s, holding only names `fmt` writes."""
    try:
        return (folder.is_dir() and not folder.is_symlink() and fmt.recognise(folder)
                and all(fmt.owns(e) for e in os.listdir(folder)))
    except OSError:
        return False


def claim_scratch(folder: str | os.PathLike, fmt: FolderFormat, *, owner: str, flag: str, shown: str) -> bool:
    """Make `folder`, `fmt`'s scratch, with its marker (True); or find this command's own one there, to resume (False).

    `owner` is what `fmt.recognise` looks for in the marker (`scratch_format`). A folder at that
    name that is not this command's (no marker, another owner's, other files in it, a link, a file)
    is refused in one line naming it, and left alone.
    """
    folder = Path(folder)
    try:
        os.mkdir(folder)
    except FileExistsError:
        if is_own_scratch(folder, fmt):
            return False
        held = describe_entries(folder, os.listdir(folder)) if folder.is_dir() and not folder.is_symlink() else None
        raise UserError(f"{flag} {shown}: {folder} is in the way: {fmt.what} is kept there, and this one was not made "
                        f"by this command ({'it holds ' + held if held else 'it is not a folder of its own'}); it is left "
                        f"alone: move it away or choose another {flag}") from None
    _mark(folder, owner)
    return True


def discard_scratch(folder: str | os.PathLike, fmt: FolderFormat) -> bool:
    """Remove `folder` when it is `fmt`'s own scratch (its marker, nothing but `fmt`'s names); whether it was."""
    folder = Path(folder)
    if not is_own_scratch(folder, fmt):
        return False
    shutil.rmtree(folder, ignore_errors=True)
    return True


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


_STAGING = "toolkit.folders.replacing_folder"


def _is_staging_of(folder: Path, real: Path) -> bool:
    """`folder` is a real folder whose marker shows `replacing_folder` made it for `real`."""
    if not folder.is_dir() or folder.is_symlink() or _marker_owner(folder) != _STAGING:
        return False
    return json.loads((folder / MARKER).read_text()).get("target") == str(real)  # readable: _marker_owner read it


def _new_staging(real: Path, suffix: str) -> Path:
    """A new hidden folder beside `real` (an unpredictable name), marked as `real`'s staging."""
    folder = Path(tempfile.mkdtemp(prefix=f".{real.name}.", suffix=suffix, dir=real.parent))
    _mark(folder, _STAGING, target=str(real))
    return folder


def _remove_stale_staging(real: Path) -> None:
    """Remove what an earlier writer of `real`, killed (kill -9, a power cut), left beside it: only folders its marker shows
    it made for `real`. The caller holds `real`'s lock, so their writer is gone."""
    for name in os.listdir(real.parent):
        if name.startswith(f".{real.name}.") and name.endswith((".tmp", ".old")) and _is_staging_of(real.parent / name, real):
            shutil.rmtree(real.parent / name, ignore_errors=True)


@contextlib.contextmanager
def replacing_folder(real: str | os.PathLike, fmt: FolderFormat, flag: str = "-o") -> Iterator[Path]:
    """Yield a new empty folder beside `real`; swap it in for `real` when the block ends well.

    `real` is what `check_folder` returned (call both under the output's lock). The new folder
    must hold only entries `fmt` names (a `ValueError` otherwise: a bug of the writer). Its files
    are fsynced, then it takes `real`'s place in one step where the kernel can exchange two
    folders, else by a rename aside and back; the old folder is removed. On any exception, or an
    interrupt, what was written is removed and `real` is left as it was. Folders an earlier writer
    of `real` left beside it when it was killed are removed first (theirs by their marker, only).
    A `real` that cannot be renamed over (a mount point: EBUSY) is a one-line `UserError` naming `flag`.
    """
    real = Path(real)
    real.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(real)
    tmp = _new_staging(real, ".tmp")
    aside = None
    try:
        os.chmod(tmp, 0o777 & ~umask())  # mkdtemp's 0700 would make the output private by accident
        yield tmp
        stray = [e for e in os.listdir(tmp) if not fmt.owns(e) and e != MARKER]
        if stray:
            raise ValueError(f"{', '.join(stray)} written into {fmt.what}, whose format does not name them")
        _fsync_tree(tmp)
        try:
            aside = _swap_in(tmp, real)
        except OSError as err:
            if err.errno == errno.EBUSY:
                raise _mount_point(flag, str(real)) from None
            raise
        _fsync_dir(real.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)


def _swap_in(tmp: Path, real: Path) -> Path | None:
    """Put the staged `tmp` (its marker taken out) in `real`'s place; the folder left to remove, if any.

    A missing or empty `real` is renamed over; an existing one is exchanged with `tmp` in one step
    (tmp then holds the old folder, marked again so that a kill before its removal leaves nothing
    unrecognised), else set aside in a new staging folder and `tmp` renamed into its place.
    """
    (tmp / MARKER).unlink()
    if not real.exists() or not any(os.scandir(real)):
        os.rename(tmp, real)  # over an empty folder too (POSIX): no exchange needed
        return None
    if _exchange(tmp, real):
        with contextlib.suppress(OSError):
            _mark(tmp, _STAGING, target=str(real))
        return None
    aside = _new_staging(real, ".old")
    os.rename(real, aside / real.name)
    try:
        os.rename(tmp, real)
    except BaseException:
        os.rename(aside / real.name, real)
        shutil.rmtree(aside, ignore_errors=True)
        raise
    return aside


def check_outputs(outputs: Mapping[str, str | os.PathLike | None], overwrite: bool,
                  ours: Callable[[Path], bool] | None = None) -> None:
    """Refuse, in one line before any work, output files a command cannot write as asked.

    `outputs` maps each output's flag to its path (None: not asked for). Refused: two outputs
    that are the same file (through links, `..`, or hard links), one that is a folder or a special
    file (a FIFO, socket or device), one that exists without `overwrite`, and, when `ours` is given,
    one that exists and `ours` does not recognise as a file the command writes (a user's file of that
    name is never replaced, `overwrite` or not).
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
        if kind is None and ours is not None and not ours(path):
            raise UserError(f"{flag} {path} exists and is not a file this command wrote (its content is not this "
                            f"command's {path.suffix.lstrip('.') or 'output'}); it is left as it is: move it away or "
                            f"choose another name")


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
