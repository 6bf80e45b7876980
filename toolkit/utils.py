"""Small helpers shared by the scripts: user-facing errors and atomic file writes.

Every file the toolkit produces goes through `atomic_path`, so an interrupted run
never leaves a file that looks complete: data is written to a temporary file in the
same folder, flushed, and renamed over the target only once it is whole.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import signal
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterator, Sequence

__all__ = ["UserError", "default_workers", "first_line", "atomic_path", "atomic_paths", "read_json", "write_json",
           "save_npy", "flag_names", "Terminated", "terminated_as_interrupt", "StopAfterBatch",
           "check_writable", "os_error_line", "require_regular_file", "require_utf8", "umask", "decode_text"]


class UserError(Exception):
    """Bad input from the user: printed as one line, exit status 2, no traceback."""


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where the process was, as Ctrl-C raises KeyboardInterrupt.

    A subclass of KeyboardInterrupt, so every clean-up written for Ctrl-C (temporary files removed,
    replaced results put back, locks released) runs for a `kill` too; `exit_code` is 128 + the signal.
    """

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.exit_code = 128 + signum


_STOPPING = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _stop_taking_signals() -> None:
    # A second Ctrl-C or kill (torchrun's launcher sends one to its ranks after the user's) must not cut
    # the clean-up of the first short: it would leave set-aside results or a half-written folder behind.
    for sig in _STOPPING:
        signal.signal(sig, signal.SIG_IGN)


def _raise_terminated(signum, frame):
    _stop_taking_signals()
    raise Terminated(signum)


def _raise_interrupt(signum, frame):
    _stop_taking_signals()
    raise KeyboardInterrupt


@contextlib.contextmanager
def terminated_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM and SIGHUP raise `Terminated` instead of ending the process on the spot.

    Their default action skips every `finally` and `except`, which left half-written runs and set-aside
    results behind. Ctrl-C raises KeyboardInterrupt as usual. Once one of them has been raised, the
    others (and a second Ctrl-C) are ignored until the block is left, so the clean-up runs whole. A
    signal that is ignored (e.g. SIGHUP under nohup) or handled by someone else stays as it is; the
    previous handlers come back after the block. Outside the main thread this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in _STOPPING}
    for sig, handler in previous.items():
        if handler is signal.SIG_DFL and sig != signal.SIGINT:
            signal.signal(sig, _raise_terminated)
        elif handler is signal.default_int_handler:
            signal.signal(sig, _raise_interrupt)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            if handler is not None:  # None: a handler installed outside Python, which stays
                signal.signal(sig, handler)


class StopAfterBatch:
    """Within `with StopAfterBatch(line) as stop:`, Ctrl-C, SIGTERM and SIGHUP ask the loop to stop after its batch.

    A long CPU operation (a forward pass of many images) runs in C, where Python's own handlers wait
    until it returns: the user would see nothing for seconds. Here the signal is seen at once (through
    `signal.set_wakeup_fd` and a thread that waits on it), `line` is printed on stderr then, and the
    loop calls `stop.check()` after each batch: it raises `KeyboardInterrupt` (Ctrl-C) or `Terminated`
    there, so the finished batch is kept and every clean-up written for Ctrl-C runs. A second signal
    before that stops at once. Outside the main thread, or where the signals are not Python's (ignored
    under nohup, a handler installed outside Python), those signals are left as they are.
    """

    def __init__(self, line: str):
        self.line, self.signum, self._previous, self._thread = line, None, {}, None

    def _handler(self, signum, frame):
        if self.signum is not None:  # a second signal: now
            _stop_taking_signals()
            raise Terminated(signum) if signum != signal.SIGINT else KeyboardInterrupt
        self.signum = signum

    def _watch(self, fd: int) -> None:
        import sys

        stopping = {int(sig) for sig in self._previous}
        while True:
            try:
                got = os.read(fd, 1)
            except OSError:
                return
            if not got or got == b"\x00":  # the end of the block writes a zero byte
                return
            if got[0] in stopping:  # other handled signals (a DataLoader's SIGCHLD) write here too
                print(self.line, file=sys.stderr, flush=True)
                return

    def __enter__(self) -> "StopAfterBatch":
        if threading.current_thread() is not threading.main_thread():
            return self
        ours = (signal.default_int_handler, _raise_interrupt, _raise_terminated, signal.SIG_DFL)
        self._previous = {sig: h for sig in _STOPPING if (h := signal.getsignal(sig)) in ours
                          and not (h is signal.SIG_DFL and sig == signal.SIGINT)}
        if not self._previous:
            return self
        read, write = os.pipe()
        os.set_blocking(write, False)
        self._pipe = (read, write)
        self._old_fd = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
        self._thread = threading.Thread(target=self._watch, args=(read,), daemon=True)
        self._thread.start()
        for sig in self._previous:
            signal.signal(sig, self._handler)
        return self

    def check(self) -> None:
        """Raise the stop asked for since the block began (call it between batches)."""
        if self.signum is not None:
            _stop_taking_signals()
            raise KeyboardInterrupt if self.signum == signal.SIGINT else Terminated(self.signum)

    def __exit__(self, *exc) -> None:
        if self._thread is None:
            return
        for sig, handler in self._previous.items():
            if signal.getsignal(sig) is self._handler:  # not when a stop already set them to SIG_IGN
                signal.signal(sig, handler)
        signal.set_wakeup_fd(self._old_fd)
        read, write = self._pipe
        if self.signum is None:
            os.write(write, b"\x00")
        self._thread.join(timeout=5)
        os.close(read)
        os.close(write)


def default_workers() -> int:
    """Decode workers by default: one per core but one, which the model's threads use."""
    return max(1, min(8, (os.cpu_count() or 2) - 1))


def first_line(err: BaseException) -> str:
    """An exception as one short line for a user message: its type and first line of text."""
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "", replace: bool = True) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it onto `path` on success.

    On any exception the temporary file is removed and `path` is left untouched.
    `suffix` keeps libraries that append an extension (np.save, np.savez) happy.
    With `replace=False` the file is put in place only if `path` does not exist at that moment
    (a hard link, which the kernel refuses over an existing name): `FileExistsError` otherwise,
    so a file another process wrote meanwhile is never overwritten.

    Example:
        >>> with atomic_path("out/metrics.json") as tmp:      # doctest: +SKIP
        ...     tmp.write_text("{}")
    """
    with atomic_paths([path], suffix, replace) as (tmp,):
        yield tmp


@contextlib.contextmanager
def atomic_paths(paths: Sequence[str | os.PathLike], suffix: str = "", replace: bool = True) -> Iterator[list[Path]]:
    """`atomic_path` for a set of files that belong together (e.g. a CSV and its HTML page).

    Every file is written and fsynced under its temporary name before any is put in place, so a full
    disk or a failed write leaves none of them changed; with `replace=False`, the files this call
    already put in place are removed again if a later one finds its name taken. A path that is a
    symlink stays one: the file it points to is replaced.
    """
    # A symlinked output stays a link: the file it points to is what is written.
    targets = [Path(os.path.realpath(p)) if os.path.islink(p) else Path(p) for p in paths]
    tmps: list[Path] = []
    placed: list[Path] = []
    try:
        for target in targets:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp" + suffix, dir=target.parent)
            os.close(fd)
            tmps.append(Path(name))
            os.chmod(name, 0o666 & ~umask())  # mkstemp's 0600 would make results private by accident
        yield tmps
        for tmp, target in zip(tmps, targets):
            try:
                with open(tmp, "rb+") as fh:
                    os.fsync(fh.fileno())
            except OSError as err:
                raise OSError(err.errno, err.strerror or str(err), str(target)) from None
        for tmp, target in zip(tmps, targets):
            os.replace(tmp, target) if replace else _link_new(tmp, target)
            placed.append(target)
    except OSError as err:
        if not replace:
            for target in placed:  # new names this call made: the set is all or nothing
                target.unlink(missing_ok=True)
        if err.filename is None:  # e.g. ENOSPC from a write through a file object: say which file
            raise OSError(err.errno, err.strerror or str(err), ", ".join(map(str, targets))) from None
        raise
    finally:
        for tmp in tmps:
            tmp.unlink(missing_ok=True)


def _link_new(tmp: Path, target: Path) -> None:
    taken = FileExistsError(errno.EEXIST, "it appeared while this run was working (another run writing it?)",
                            str(target))
    try:
        os.link(tmp, target)
    except FileExistsError:
        raise taken from None
    except OSError as err:
        if err.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
            raise
        if target.exists():  # a file system without hard links: the check and the rename are not one step
            raise taken from None
        os.replace(tmp, target)


def umask() -> int:
    """The process's file-creation mask (read without changing it), for modes of files made by mkstemp/mkdtemp."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def require_regular_file(path: str | os.PathLike, what: str = "file") -> None:
    """A `UserError` unless `path` is a regular file: a FIFO or device would block or never end a read."""
    import stat

    try:
        mode = os.stat(path).st_mode
    except OSError as err:
        raise UserError(f"cannot read {what} {path}: {err.strerror or err}") from None
    if not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "not a regular file (a FIFO, socket or device)"
        raise UserError(f"{what} {path} is {kind}; give a regular file")


# Byte-order marks, longest first (UTF-32 LE's begins with UTF-16 LE's).
_BOMS = ((b"\xff\xfe\x00\x00", "utf-32", "UTF-32"), (b"\x00\x00\xfe\xff", "utf-32", "UTF-32"),
         (b"\xef\xbb\xbf", "utf-8-sig", "UTF-8"), (b"\xff\xfe", "utf-16", "UTF-16"), (b"\xfe\xff", "utf-16", "UTF-16"))


def decode_text(data: bytes, what: str, hint: str) -> str:
    """The text of a user's list file (a subset, an image or pair list): a `UserError` naming what it is otherwise.

    UTF-8 (with or without a byte-order mark) is read, and so is UTF-16 or UTF-32 with one (what
    Windows editors save as "Unicode"). UTF-16 without a byte-order mark is named as such (its
    byte order cannot be known), anything else holding NUL bytes is binary, and other bytes that
    are not UTF-8 are refused with where they are. `what` names the file ("subset file X"), `hint`
    says what to give instead of a binary file.
    """
    for bom, codec, name in _BOMS:
        if data.startswith(bom):
            try:
                return data.decode(codec)
            except UnicodeDecodeError as err:
                raise UserError(f"{what} is damaged {name} text ({err.reason} at byte {err.start}); save it as "
                                f"UTF-8") from None
    if b"\0" in data:
        even, odd = data[0::2].count(0), data[1::2].count(0)
        if len(data) % 2 == 0 and min(even, odd) == 0 and max(even, odd) >= len(data) // 4:
            raise UserError(f"{what} is UTF-16 text without a byte-order mark; save it as UTF-8 (or as UTF-16 "
                            f"with one)")
        raise UserError(f"{what} is binary, not text; {hint}")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{what} is not UTF-8 text ({err.reason} at byte {err.start}); save it as UTF-8") from None


def require_utf8(values: dict[str, str | None]) -> None:
    """A `UserError` for a path argument that is not valid UTF-8 (flag -> value; None is skipped).

    Such names cannot be written into JSON, HTML or the terminal as text, so they are refused
    before anything is done rather than failing at the end of a run.
    """
    for flag, value in values.items():
        if value is None:
            continue
        try:
            os.fspath(value).encode("utf-8")
        except UnicodeEncodeError:
            shown = ascii(os.fsencode(value))[2:-1]
            raise UserError(f"{flag} {shown}: the path is not valid UTF-8; rename it or use another path") from None


def check_writable(folder: str | os.PathLike, flag: str) -> None:
    """Fail early, before a model loads, when `folder` (to be created if missing) cannot be written.

    Finds the nearest part of the path that exists: it must be a folder in which a file can be
    created (tried for real, then removed: this also catches read-only file systems).
    """
    folder = Path(folder)
    probe = next((p for p in (folder, *folder.parents) if p.exists() or p.is_symlink()), Path("."))
    if not probe.is_dir():
        raise UserError(f"{flag} {folder}: {probe} is a file, not a folder; choose another {flag}")
    try:
        with tempfile.TemporaryFile(dir=probe, prefix=".write-check."):
            pass
    except OSError as err:
        raise UserError(f"{flag} {folder}: cannot write in {probe} ({err.strerror or err}); "
                        f"choose another {flag} or fix its permissions") from None


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file this toolkit wrote; a damaged one is a `UserError` naming it."""
    require_regular_file(path, "JSON file")
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read {path} ({first_line(err)}); restore it or remove the folder it describes") from None


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomically write `obj` as indented, key-sorted JSON."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def save_npy(path: str | os.PathLike, array: Any) -> None:
    """Atomically `np.save` an array (never pickled) to exactly `path`."""
    import numpy as np

    with atomic_path(path, suffix=".npy") as tmp:
        np.save(tmp, np.asarray(array), allow_pickle=False)


def os_error_line(err: OSError) -> str:
    """An operating-system error as one line naming the path and the reason."""
    where = " -> ".join(str(f) for f in (err.filename, err.filename2) if f is not None)
    reason = err.strerror or first_line(err)
    hint = {28: "free some space", 30: "write somewhere else", 13: "fix the permissions or write elsewhere",
            20: "a part of the path is a file, not a folder"}.get(err.errno or 0)
    return f"{where or 'an output file'}: {reason}" + (f" ({hint})" if hint else "")


@contextlib.contextmanager
def flag_names(names: dict[str, str]) -> Iterator[None]:
    """Re-raise a library `UserError` with its parameter names given as the script's flags.

    The packages speak in their own parameter names (`test_split`); a script wraps its calls so
    the user reads the flag they typed (`--test-split`).

    Example:
        >>> with flag_names({"test_split": "--test-split"}):     # doctest: +SKIP
        ...     split_indices(10, 1.5, seed=0)
        UserError: --test-split must lie strictly between 0 and 1, got 1.5
    """
    try:
        yield
    except UserError as err:
        text = str(err)
        for name, flag in names.items():
            text = re.sub(rf"(?<![\w-]){re.escape(name)}\b", flag, text)
        raise UserError(text) from None
