"""The features file: extract.py writes it, train.py and similarity.py read it; this module owns it.

A features file (`DIR/MODEL/features.npy`, `features_pca256.npy`, ...) is a plain `.npy`
structured array (no pickle, `np.load(path)` reads it), one row per pair:

| field       | dtype            | meaning                                         |
|-------------|------------------|-------------------------------------------------|
| `name`      | unicode          | the pair's file name (same in left/ and right/) |
| `augmented` | bool             | True for the horizontally flipped copy          |
| `left`      | float32, (D,)    | the left image's vector                         |
| `right`     | float32, (D,)    | the right image's vector                        |

A flat image folder gives `name`, `augmented` and `feature` instead (nothing to train on).
extract.py writes originals first, then the flipped copies in the same order; a reader accepts
rows in any order, a flipped copy sharing its name with its original.

The paper's code saved another format, also read here: `np.save` of a pickled dict
`{left, right, left_name, right_name}` whose flipped rows are named `augmented_<original name>`.
Unpickling can run code, so `load_pairs` reads it only with `allow_pickle=True`.

Either way the result is a `Pairs`: the originals, plus the flipped copies with the index of
the original each belongs to.

Example:
    >>> import numpy as np
    >>> rec = make_records(["a.jpg"], np.zeros((1, 2, 1, 4)), ("left", "right"))
    >>> pairs_from_structured(rec).in_dim
    4
    >>> pairs = load_pairs("features/clip_rn50x4/features_pca256.npy")   # doctest: +SKIP
"""

from __future__ import annotations

import os
import pickle
import struct
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from toolkit.utils import UserError, first_line, require_regular_file

__all__ = [
    "PAIR_FIELDS",
    "PAPER_KEYS",
    "PAPER_AUGMENTED_PREFIX",
    "Pairs",
    "load_pairs",
    "pairs_from_structured",
    "pairs_from_paper_dict",
    "to_paper_dict",
    "make_records",
    "RecordsWriter",
    "to_structured",
]

PAIR_FIELDS = ("name", "augmented", "left", "right")
"""Fields of a pairs features file written by extract.py."""
PAPER_KEYS = ("left", "right", "left_name", "right_name")
"""Keys of the paper's code's pickled dict."""
PAPER_AUGMENTED_PREFIX = "augmented_"
"""How the paper's code names a flipped copy: this prefix before the original's name."""

_NPY_MAGIC = b"\x93NUMPY"
_PICKLE_HINT = "unpickling can run arbitrary code, so it is read only with --allow-pickle (use it only on files you trust)"


@dataclass(frozen=True)
class Pairs:
    """Pairs of feature vectors: N originals and M flipped copies of some of them.

    Attributes:
        names: the N originals' names, unique.
        left, right: `(N, D)` float32; row i of each forms pair i.
        flipped_left, flipped_right: `(M, D)` float32 flipped copies.
        flipped_of: `(M,)` int64, the index in the originals of each flipped copy.
    """

    names: list[str]
    left: np.ndarray
    right: np.ndarray
    flipped_left: np.ndarray
    flipped_right: np.ndarray
    flipped_of: np.ndarray

    def __len__(self) -> int:
        return len(self.names)

    @property
    def in_dim(self) -> int:
        """The feature dimension D."""
        return int(self.left.shape[1])

    def select(self, kept: Sequence[int]) -> "Pairs":
        """The originals at positions `kept` (increasing), with their flipped copies, renumbered."""
        kept = np.asarray(kept, dtype=np.int64)
        new_index = np.full(len(self.names), -1, dtype=np.int64)
        new_index[kept] = np.arange(len(kept))
        flips = new_index[self.flipped_of] >= 0
        return Pairs(names=[self.names[i] for i in kept], left=self.left[kept], right=self.right[kept],
                     flipped_left=self.flipped_left[flips], flipped_right=self.flipped_right[flips],
                     flipped_of=new_index[self.flipped_of[flips]])


def load_pairs(path: str | os.PathLike, allow_pickle: bool = False) -> Pairs:
    """Read a features file of pairs, in extract.py's format or (with `allow_pickle`) the original implementation's.

    Args:
        path: the `.npy` file.
        allow_pickle: also accept the original implementation's pickled dict. Only for files you trust.

    Returns:
        A checked `Pairs`.

    Raises:
        UserError: a missing or unreadable file, a pickled file without `allow_pickle`, an
        array without pairs (a flat-folder features file, missing fields, 1-D vectors, left and
        right of different sizes), NaN or inf values, or names that do not pair up.

    Example:
        >>> pairs = load_pairs("features/clip_rn50x4/features.npy")   # doctest: +SKIP
        >>> len(pairs), pairs.in_dim, len(pairs.flipped_of)           # doctest: +SKIP
        (6016, 5440, 6016)
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise UserError(f"{path} is a folder; give the features file itself (e.g. DIR/MODEL/features.npy)")
    if os.path.exists(path):
        require_regular_file(path, "features file")  # a FIFO would block the read forever
    try:
        with open(path, "rb") as fh:
            magic = fh.read(len(_NPY_MAGIC))
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror or err}") from None
    if magic != _NPY_MAGIC:
        if magic[:1] == b"\x80" and not allow_pickle:
            raise UserError(f"{path} is a pickle; {_PICKLE_HINT}")
        if magic[:1] != b"\x80":
            raise UserError(f"{path} is not a .npy file")
    try:
        arr = np.load(path, allow_pickle=allow_pickle)
    except ValueError as err:
        if "allow_pickle" in str(err):
            raise UserError(f"{path} holds pickled objects (the original implementation's format?); {_PICKLE_HINT}") from None
        raise UserError(f"cannot read {path}: {err}") from None
    except (OSError, EOFError, struct.error, pickle.UnpicklingError, AttributeError, ImportError, TypeError) as err:
        # Truncated arrays raise OSError/EOFError; a foreign pickle (with --allow-pickle) may
        # also fail to find its classes (AttributeError, ImportError) or rebuild them (TypeError).
        raise UserError(f"cannot read {path}: {first_line(err)}") from None
    if isinstance(arr, np.lib.npyio.NpzFile):
        arr.close()
        raise UserError(f"{path} is an .npz archive, not a features file")
    if isinstance(arr, np.ndarray) and arr.dtype == object:
        obj = arr.item() if arr.size == 1 else None
        if not isinstance(obj, dict):
            raise UserError(f"{path} holds a pickled {type(obj).__name__ if obj is not None else 'object array'}, not the original implementation's dict {{{', '.join(PAPER_KEYS)}}}")
        return pairs_from_paper_dict(obj, source=path)
    return pairs_from_structured(arr, source=path)


def pairs_from_structured(arr: np.ndarray, source: str = "array") -> Pairs:
    """Check and convert an extract.py structured array (fields `PAIR_FIELDS`) to `Pairs`.

    Raises:
        UserError: see `load_pairs`; messages start with `source`.
    """
    fields = arr.dtype.names
    if fields is None:
        raise UserError(
            f"{source} holds a plain {arr.dtype} array of shape {arr.shape}, not pairs "
            f"(expected a structured array with fields {', '.join(PAIR_FIELDS)})"
        )
    if "feature" in fields and not {"left", "right"} & set(fields):
        raise UserError(
            f"{source} is the features file of a flat image folder (one vector per image), so it has no "
            "left/right pairs to train on; extract a dataset with left/ and right/ folders"
        )
    missing = [f for f in PAIR_FIELDS if f not in fields]
    if missing:
        raise UserError(f"{source} has no field {', '.join(missing)} (expected {', '.join(PAIR_FIELDS)})")
    if arr.ndim != 1:
        raise UserError(f"{source}: expected one row per pair, got an array of shape {arr.shape}")
    return _assemble(arr["name"], arr["augmented"], arr["left"], arr["right"], source)


def pairs_from_paper_dict(obj: dict[str, Any], source: str = "dict") -> Pairs:
    """Check and convert the original implementation's `{left, right, left_name, right_name}` dict to `Pairs`.

    A row whose `left_name` starts with `augmented_` is the flipped copy of the row named
    without that prefix.

    Raises:
        UserError: see `load_pairs`.
    """
    missing = [k for k in PAPER_KEYS if k not in obj]
    if missing:
        raise UserError(f"{source}: the pickled dict has no key {', '.join(missing)} (expected {', '.join(PAPER_KEYS)})")
    try:
        left = np.asarray(obj["left"], dtype=np.float32)
        right = np.asarray(obj["right"], dtype=np.float32)
    except (TypeError, ValueError) as err:
        raise UserError(f"{source}: left/right are not numeric arrays: {err}") from None
    raw = [str(n) for n in np.asarray(obj["left_name"]).reshape(-1)]
    augmented = np.array([n.startswith(PAPER_AUGMENTED_PREFIX) for n in raw], dtype=bool)
    names = [n[len(PAPER_AUGMENTED_PREFIX):] if a else n for n, a in zip(raw, augmented)]
    return _assemble(names, augmented, left, right, source)


def to_paper_dict(pairs: Pairs) -> dict[str, Any]:
    """`pairs` in the original implementation's layout, the dict its train.py loads (`np.save` it).

    Originals first, then one flipped copy per original in the same order, named
    `augmented_<name>`: the paper's code takes row i + N as the flipped copy of row i, so
    every original needs exactly one copy (or none at all). `pairs_from_paper_dict` reads it back.

    Raises:
        UserError: some originals have a flipped copy and others not.
    """
    names = list(pairs.names)
    left, right = [pairs.left], [pairs.right]
    if len(pairs.flipped_of):
        order = np.argsort(pairs.flipped_of, kind="stable")
        if not np.array_equal(pairs.flipped_of[order], np.arange(len(pairs))):
            raise UserError(f"the original implementation's layout needs one flipped copy per pair or none; "
                            f"{len(pairs.flipped_of)} copies for {len(pairs)} pairs")
        left.append(pairs.flipped_left[order])
        right.append(pairs.flipped_right[order])
        names += [PAPER_AUGMENTED_PREFIX + n for n in pairs.names]
    return {"left": np.concatenate(left), "right": np.concatenate(right), "left_name": list(names),
            "right_name": list(names)}


def _assemble(names: Sequence[Any], augmented: np.ndarray, left: np.ndarray, right: np.ndarray, source: str) -> Pairs:
    left, right = np.asarray(left), np.asarray(right)
    if left.ndim != 2 or right.ndim != 2:
        raise UserError(
            f"{source}: left and right must hold one vector per pair, got shapes {left.shape} and {right.shape}"
        )
    if left.shape[1] != right.shape[1]:
        raise UserError(f"{source}: left vectors have {left.shape[1]} dimensions but right vectors {right.shape[1]}")
    if not (len(left) == len(right) == len(names) == len(augmented)):
        raise UserError(f"{source}: {len(left)} left, {len(right)} right vectors and {len(names)} names do not match")
    if left.shape[1] == 0 or len(left) == 0:
        raise UserError(f"{source} holds no features (shape {left.shape})")
    left, right = left.astype(np.float32, copy=False), right.astype(np.float32, copy=False)
    names = [str(n) for n in names]
    augmented = np.asarray(augmented, dtype=bool)

    bad = ~(np.isfinite(left).all(axis=1) & np.isfinite(right).all(axis=1))
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise UserError(f"{source}: {int(bad.sum())} rows hold NaN or inf values (first: {names[first]!r})")

    orig_rows = np.flatnonzero(~augmented)
    index: dict[str, int] = {}
    for i, row in enumerate(orig_rows):
        if names[row] in index:
            raise UserError(f"{source}: the name {names[row]!r} is used by two original pairs")
        index[names[row]] = i
    flip_rows = np.flatnonzero(augmented)
    flipped_of = np.empty(len(flip_rows), dtype=np.int64)
    seen: set[str] = set()
    for j, row in enumerate(flip_rows):
        name = names[row]
        if name not in index:
            raise UserError(f"{source}: the flipped copy {name!r} has no original pair of that name")
        if name in seen:
            raise UserError(f"{source}: the pair {name!r} has two flipped copies")
        seen.add(name)
        flipped_of[j] = index[name]
    return Pairs(
        names=[names[r] for r in orig_rows],
        left=left[orig_rows],
        right=right[orig_rows],
        flipped_left=left[flip_rows],
        flipped_right=right[flip_rows],
        flipped_of=flipped_of,
    )


def _record_dtype(names: Sequence[str], sides: Sequence[str], shape: tuple[int, ...]) -> np.dtype:
    width = max([len(n) for n in names] + [1])
    return np.dtype([("name", f"<U{width}"), ("augmented", "?")] + [(side, "<f4", shape) for side in sides])


def make_records(names: Sequence[str], vectors: np.ndarray, sides: Sequence[str]) -> np.ndarray:
    """Build the structured array from (n, sides, flips, D) vectors: originals, then flipped copies.

    `sides` is `("left", "right")` for pairs, `("feature",)` for a flat folder.
    """
    n, n_sides, n_flips, dim = vectors.shape
    rec = np.zeros(n * n_flips, dtype=_record_dtype(names, sides, (dim,)))
    for f in range(n_flips):
        rows = slice(f * n, (f + 1) * n)
        rec["name"][rows] = names
        rec["augmented"][rows] = f > 0
        for s, side in enumerate(sides):
            rec[side][rows] = vectors[:, s, f]
    return rec


class RecordsWriter:
    """Write a features file block by block, as `make_records` would lay it out, in bounded memory.

    The `.npy` header is written first, then each block of items goes to its place in the file
    (their original rows, then their flipped copies) with positioned writes: no memory map, so
    the written pages stay in the page cache and out of the process's resident memory. The file
    has a temporary name beside `path` until `close` fsyncs it and renames it onto `path`; on an
    error (`abort`, or leaving the `with` block by an exception) it is removed and `path` is
    untouched. The bytes equal `np.save(path, make_records(...))`.

    Example:
        >>> import numpy as np
        >>> with RecordsWriter("f.npy", ["a", "b"], ("feature",), dim=4, n_flips=1) as w:   # doctest: +SKIP
        ...     w.write(0, np.zeros((2, 1, 1, 4)))
    """

    def __init__(self, path: str | os.PathLike, names: Sequence[str], sides: Sequence[str], dim: int, n_flips: int):
        import tempfile
        from pathlib import Path

        self.path, self.names, self.sides, self.n_flips = Path(path), names, tuple(sides), n_flips
        self.dtype = _record_dtype(names, sides, (dim,))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp.npy", dir=self.path.parent)
        self.tmp = Path(tmp)
        self.fh = os.fdopen(fd, "wb")
        started = False
        try:  # the caller's `with` has not begun: a failure here must drop the temporary file itself
            self._start()
            started = True
        except OSError as err:
            raise self._named(err) from None
        finally:
            if not started:
                self.abort()

    def _start(self) -> None:
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False,
                  "shape": (len(self.names) * self.n_flips,)}
        try:
            np.lib.format.write_array_header_1_0(self.fh, header)
        except ValueError:  # a header too long for format 1.0, as np.save would fall back
            np.lib.format.write_array_header_2_0(self.fh, header)
        self.fh.flush()
        self.offset = self.fh.tell()
        self.fh.truncate(self.offset + self.dtype.itemsize * len(self.names) * self.n_flips)

    def write(self, start: int, vectors: np.ndarray) -> None:
        """Rows for items `start .. start + len(vectors)` from their (n, sides, flips, D) vectors."""
        n, total = len(vectors), len(self.names)
        block = np.zeros(n, dtype=self.dtype)
        block["name"] = self.names[start:start + n]
        for f in range(self.n_flips):
            block["augmented"] = f > 0
            for s, side in enumerate(self.sides):
                block[side] = vectors[:, s, f]
            try:
                os.pwrite(self.fh.fileno(), block.tobytes(), self.offset + (f * total + start) * self.dtype.itemsize)
            except OSError as err:
                raise self._named(err) from None

    def _named(self, err: OSError) -> OSError:
        # pwrite/fsync errors carry no file name; the one-line error should say which file (a full disk).
        return err if err.filename else OSError(err.errno, err.strerror, str(self.path))

    def close(self) -> None:
        """Fsync and put the file in place."""
        try:
            os.fsync(self.fh.fileno())
        except OSError as err:
            raise self._named(err) from None
        self.fh.close()
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(self.tmp, 0o666 & ~mask)  # mkstemp's 0600 would make results private by accident
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        """Drop the unfinished file."""
        try:
            self.fh.close()  # may flush buffered bytes into the full disk that caused the abort
        except OSError:
            pass  # the file is being dropped anyway
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> "RecordsWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.abort() if exc_type is not None else self.close()


def to_structured(names: Sequence[str], augmented: Sequence[bool], left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Build an array in extract.py's pairs format (fields `PAIR_FIELDS`), rows in the given order.

    Example:
        >>> import numpy as np
        >>> arr = to_structured(["a.jpg"], [False], np.zeros((1, 4)), np.ones((1, 4)))
        >>> arr.dtype.names, arr["left"].shape
        (('name', 'augmented', 'left', 'right'), (1, 4))
    """
    left = np.asarray(left, dtype=np.float32)
    right = np.asarray(right, dtype=np.float32)
    arr = np.empty(len(names), dtype=_record_dtype(names, ("left", "right"), left.shape[1:]))
    arr["name"], arr["augmented"], arr["left"], arr["right"] = names, augmented, left, right
    return arr
