"""Model selection that never reads the test set: a validation split, the best epoch, early stopping.

`split_validation` holds a share of the *training* pairs out of training; the test pairs
are drawn before it and are untouched, so `val_split=0` leaves the run exactly as without it.
Every epoch the model is evaluated on those pairs (`Val/...` figures, see
`adaptation.training.train`), and:

- the **best epoch** is the one of highest validation top-1 (the first k), ties broken by
  higher validation MRR, then by the earlier epoch;
- **early stopping** with patience P stops once P epochs have passed without a better one.

Both are pure functions of the per-epoch rows `train` returns.

Example:
    >>> import numpy as np
    >>> train_idx, val_idx = split_validation(np.arange(10), 0.2, seed=0)
    >>> len(train_idx), len(val_idx), set(train_idx) & set(val_idx)
    (8, 2, set())
    >>> rows = [{"Val/top 1": 0.5, "Val/MRR": 0.6}, {"Val/top 1": 0.7, "Val/MRR": 0.7},
    ...         {"Val/top 1": 0.7, "Val/MRR": 0.65}]
    >>> best_epoch(rows, k=1), patience_exhausted(rows, patience=1, k=1)
    (2, True)
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from toolkit.checks import Check
from toolkit.utils import UserError

__all__ = ["VAL_SPLIT", "split_validation", "selection_key", "best_epoch", "patience_exhausted"]

VAL_SPLIT = Check(float, "at least 0 and below 1", lambda v: 0.0 <= v < 1.0)
"""The rule of a validation share (train.py's `--val-split` reads it with the same rule)."""

_VAL_STREAM = 1  # the validation draw's own random stream, so the test draw is unchanged


def split_validation(train_idx: np.ndarray, val_split: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Hold `floor(val_split * len(train_idx))` of the training pairs out for validation.

    Args:
        train_idx: the training pairs' indices (from `adaptation.data.split_indices`).
        val_split: the share of them to hold out, in [0, 1); 0 holds out nothing.
        seed: seeds the draw (its own stream: the test split drawn with the same seed is not affected).

    Returns:
        `(train_idx, val_idx)`, sorted int64; with `val_split=0`, `train_idx` itself and an empty array.

    Raises:
        UserError: a share outside [0, 1), fewer than 2 validation pairs, or no training pair left.
    """
    train_idx = np.asarray(train_idx, dtype=np.int64)
    problem = VAL_SPLIT.problem(val_split)
    if problem is not None:
        raise UserError(f"val_split {problem}")
    if val_split == 0:
        return train_idx, np.empty(0, dtype=np.int64)
    n_val = int(math.floor(val_split * len(train_idx)))
    if n_val < 2:
        raise UserError(f"val_split {val_split} of {len(train_idx)} training pairs leaves {n_val} validation "
                        "pairs; retrieval and calibration need at least 2 (raise val_split)")
    if n_val >= len(train_idx):
        raise UserError(f"val_split {val_split} of {len(train_idx)} training pairs leaves none to train on")
    perm = np.random.default_rng([seed, _VAL_STREAM]).permutation(len(train_idx))
    return np.sort(train_idx[perm[n_val:]]), np.sort(train_idx[perm[:n_val]])


def selection_key(row: dict[str, float], k: int) -> tuple[float, float]:
    """What the selection maximises in one epoch's row: (validation top-k, validation MRR); NaN counts as worst."""
    def finite(v: float) -> float:
        return v if math.isfinite(v) else -math.inf

    return finite(row[f"Val/top {k}"]), finite(row["Val/MRR"])


def best_epoch(history: Sequence[dict[str, float]], k: int) -> int:
    """The 1-based epoch of the highest `selection_key`, the earliest among equals."""
    if not history:
        raise ValueError("no epoch to choose from")
    keys = [selection_key(row, k) for row in history]
    return max(range(len(keys)), key=lambda i: (keys[i], -i)) + 1


def patience_exhausted(history: Sequence[dict[str, float]], patience: int, k: int) -> bool:
    """True when the last `patience` epochs brought nothing better than the best before them."""
    if patience < 1:
        raise ValueError(f"patience must be at least 1, got {patience}")
    return len(history) - best_epoch(history, k) >= patience
