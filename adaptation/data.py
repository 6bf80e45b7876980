"""Loading pairs of features, checking them, and splitting them into train and test.

Two on-disk formats are read:

- **extract.py's features file** (`DIR/MODEL/features.npy` or `features_pca256.npy`): a
  structured array, one row per pair, with fields `name` (str), `augmented` (bool),
  `left` and `right` (float32 vectors of shape `(D,)`). A flipped copy (`augmented=True`)
  shares its name with its original; rows may come in any order. Loaded without pickle.
- **the seed's file**: `np.save` of a pickled dict `{left, right, left_name, right_name}`
  whose augmented rows are named `augmented_<original name>`. Unpickling can run code, so
  `load_pairs` reads it only with `allow_pickle=True`.

Either way the result is a `Pairs`: the originals, plus the flipped copies with the index of
the original each belongs to. `split_indices` draws the test pairs and `split_data` puts the
three sets (train originals, their flipped copies, test originals) on a device as tensors.
A test pair's flipped copy never reaches training.

Example:
    >>> pairs = load_pairs("features/clip_rn50x4/features_pca256.npy")   # doctest: +SKIP
    >>> train_idx, test_idx = split_indices(len(pairs), test_split=0.25, seed=0)  # doctest: +SKIP
    >>> data = split_data(pairs, train_idx, test_idx, device="cpu")       # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
import pickle
import struct
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from featuresExtractor.utils import UserError, first_line

__all__ = [
    "PAIR_FIELDS",
    "SEED_KEYS",
    "SEED_AUGMENTED_PREFIX",
    "Pairs",
    "TrainData",
    "load_pairs",
    "pairs_from_structured",
    "pairs_from_seed_dict",
    "to_structured",
    "split_indices",
    "split_data",
]

PAIR_FIELDS = ("name", "augmented", "left", "right")
"""Fields of a pairs features file written by extract.py."""
SEED_KEYS = ("left", "right", "left_name", "right_name")
"""Keys of the seed's pickled dict."""
SEED_AUGMENTED_PREFIX = "augmented_"
"""How the seed names a flipped copy: this prefix before the original's name."""

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


@dataclass(frozen=True)
class TrainData:
    """The three sets a run uses, as tensors on one device.

    Attributes:
        train: `(left, right)` of the original training pairs, each `(N_train, D)`.
        flipped: `(left, right)` of those pairs' flipped copies, or None when the file has none.
        test: `(left, right)` of the original test pairs, each `(N_test, D)`.
        train_names, test_names: the pairs' names, in row order.
    """

    train: tuple[torch.Tensor, torch.Tensor]
    flipped: tuple[torch.Tensor, torch.Tensor] | None
    test: tuple[torch.Tensor, torch.Tensor]
    train_names: list[str]
    test_names: list[str]

    @property
    def train_sets(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The sets the loss averages over: the originals, then the flipped copies if any."""
        return [self.train] + ([self.flipped] if self.flipped is not None else [])


def load_pairs(path: str | os.PathLike, allow_pickle: bool = False) -> Pairs:
    """Read a features file of pairs, in extract.py's format or (with `allow_pickle`) the seed's.

    Args:
        path: the `.npy` file.
        allow_pickle: also accept the seed's pickled dict. Only for files you trust.

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
            raise UserError(f"{path} holds pickled objects (the seed's format?); {_PICKLE_HINT}") from None
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
            raise UserError(f"{path} holds a pickled {type(obj).__name__ if obj is not None else 'object array'}, not the seed's dict {{{', '.join(SEED_KEYS)}}}")
        return pairs_from_seed_dict(obj, source=path)
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


def pairs_from_seed_dict(obj: dict[str, Any], source: str = "dict") -> Pairs:
    """Check and convert the seed's `{left, right, left_name, right_name}` dict to `Pairs`.

    A row whose `left_name` starts with `augmented_` is the flipped copy of the row named
    without that prefix.

    Raises:
        UserError: see `load_pairs`.
    """
    missing = [k for k in SEED_KEYS if k not in obj]
    if missing:
        raise UserError(f"{source}: the pickled dict has no key {', '.join(missing)} (expected {', '.join(SEED_KEYS)})")
    try:
        left = np.asarray(obj["left"], dtype=np.float32)
        right = np.asarray(obj["right"], dtype=np.float32)
    except (TypeError, ValueError) as err:
        raise UserError(f"{source}: left/right are not numeric arrays: {err}") from None
    raw = [str(n) for n in np.asarray(obj["left_name"]).reshape(-1)]
    augmented = np.array([n.startswith(SEED_AUGMENTED_PREFIX) for n in raw], dtype=bool)
    names = [n[len(SEED_AUGMENTED_PREFIX):] if a else n for n, a in zip(raw, augmented)]
    return _assemble(names, augmented, left, right, source)


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


def to_structured(names: Sequence[str], augmented: Sequence[bool], left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Build an array in extract.py's pairs format (fields `PAIR_FIELDS`), e.g. for tests or synthetic data.

    Example:
        >>> import numpy as np
        >>> arr = to_structured(["a.jpg"], [False], np.zeros((1, 4)), np.ones((1, 4)))
        >>> arr.dtype.names, arr["left"].shape
        (('name', 'augmented', 'left', 'right'), (1, 4))
    """
    left = np.asarray(left, dtype=np.float32)
    right = np.asarray(right, dtype=np.float32)
    width = max([len(n) for n in names] + [1])
    dtype = np.dtype(
        [("name", f"<U{width}"), ("augmented", "?"), ("left", "<f4", left.shape[1:]), ("right", "<f4", right.shape[1:])]
    )
    arr = np.empty(len(names), dtype=dtype)
    arr["name"], arr["augmented"], arr["left"], arr["right"] = names, augmented, left, right
    return arr


def split_indices(
    n_pairs: int, test_split: float, seed: int, topk: Sequence[int] = ()
) -> tuple[np.ndarray, np.ndarray]:
    """Draw the test pairs at random: `floor(test_split * n_pairs)` of them, as the seed did.

    Args:
        n_pairs: the number of original pairs.
        test_split: the test fraction, strictly between 0 and 1.
        seed: seeds the draw; the same seed always gives the same split.
        topk: the k values that will be evaluated; each must fit in the test set.

    Returns:
        `(train_idx, test_idx)`, sorted int64 index arrays.

    Raises:
        UserError: a test-split outside (0, 1), fewer than 2 test pairs or 1 training pair,
        or a k larger than the test set.

    Example:
        >>> train_idx, test_idx = split_indices(8, 0.25, seed=0)
        >>> len(train_idx), len(test_idx)
        (6, 2)
    """
    if not (0.0 < test_split < 1.0) or math.isnan(test_split):
        raise UserError(f"--test-split must lie strictly between 0 and 1, got {test_split}")
    n_test = int(math.floor(test_split * n_pairs))
    if n_test < 2:
        raise UserError(
            f"--test-split {test_split} of {n_pairs} pairs leaves {n_test} test pairs; retrieval needs at least 2"
        )
    if n_pairs - n_test < 1:
        raise UserError(f"--test-split {test_split} of {n_pairs} pairs leaves no training pairs")
    too_big = [k for k in topk if k > n_test]
    if too_big:
        raise UserError(f"top-k {too_big[0]} is larger than the test set ({n_test} pairs)")
    perm = np.random.default_rng(seed).permutation(n_pairs)
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


def split_data(
    pairs: Pairs, train_idx: np.ndarray, test_idx: np.ndarray, device: str | torch.device = "cpu"
) -> TrainData:
    """Gather the train originals, their flipped copies and the test originals as tensors on `device`.

    Only flipped copies of training pairs are kept; a test pair's copy never reaches training.
    """
    train_idx, test_idx = np.asarray(train_idx), np.asarray(test_idx)
    in_train = np.zeros(len(pairs), dtype=bool)
    in_train[train_idx] = True
    keep = in_train[pairs.flipped_of]

    def tensors(left: np.ndarray, right: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return (
            torch.as_tensor(np.ascontiguousarray(left)).to(device),
            torch.as_tensor(np.ascontiguousarray(right)).to(device),
        )

    return TrainData(
        train=tensors(pairs.left[train_idx], pairs.right[train_idx]),
        flipped=tensors(pairs.flipped_left[keep], pairs.flipped_right[keep]) if keep.any() else None,
        test=tensors(pairs.left[test_idx], pairs.right[test_idx]),
        train_names=[pairs.names[i] for i in train_idx],
        test_names=[pairs.names[i] for i in test_idx],
    )
