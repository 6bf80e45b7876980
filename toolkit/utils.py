"""Small helpers shared by the scripts: user-facing errors and atomic file writes.

Every file the toolkit produces goes through `atomic_path`, so an interrupted run
never leaves a file that looks complete: data is written to a temporary file in the
same folder, flushed, and renamed over the target only once it is whole.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

__all__ = ["UserError", "default_workers", "first_line", "atomic_path", "read_json", "write_json", "save_npy", "run_cli", "flag_names"]


class UserError(Exception):
    """Bad input from the user: printed as one line, exit status 2, no traceback."""


def default_workers() -> int:
    """Decode workers by default: one per core but one, which the model's threads use."""
    return max(1, min(8, (os.cpu_count() or 2) - 1))


def first_line(err: BaseException) -> str:
    """An exception as one short line for a user message: its type and first line of text."""
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it onto `path` on success.

    On any exception the temporary file is removed and `path` is left untouched.
    `suffix` keeps libraries that append an extension (np.save, np.savez) happy.

    Example:
        >>> with atomic_path("out/metrics.json") as tmp:      # doctest: +SKIP
        ...     tmp.write_text("{}")
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp" + suffix, dir=target.parent)
    os.close(fd)
    os.chmod(name, 0o666 & ~_umask())  # mkstemp's 0600 would make results private by accident
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file this toolkit wrote; a damaged one is a `UserError` naming it."""
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


def run_cli(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None,
            prog: str | None = None) -> int:
    """Run a script's `main`, turning `UserError` into one line on stderr and exit 2.

    `prog` names the script in the message; by default the module that defines `main`.
    """
    prog = prog or (main.__module__ if main.__module__ != "__main__" else Path(sys.argv[0]).stem) + ".py"
    try:
        return int(main(argv) or 0)
    except UserError as err:
        if not getattr(err, "quiet", False):  # quiet: another process (rank 0) has printed it
            print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


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
