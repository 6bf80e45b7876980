"""A calibrated "look-alike or not": cosine thresholds chosen on validation pairs.

On a set of N validation pairs, the adapted cosine of left i and right j is a **positive**
when i == j (partners) and a **negative** otherwise (all other left-right pairings), so there
are N positives and N(N-1) negatives. A threshold t says "alike" when `score >= t`. Two are
computed:

- **max F1**: the t that maximises F1 = 2PR / (P + R) over these N^2 scores;
- **95% precision**: the lowest t whose precision is at least 0.95 (the most recall for that
  precision), or None when no threshold reaches it.

Candidate thresholds are the distinct scores themselves (any t between two consecutive
distinct scores decides exactly as the higher one does). Ties in F1 go to the higher threshold.

Precision depends on the share of positives, here 1 in N: a threshold calibrated on N
validation pairs means "95% precision when one candidate in N is a true partner". The
figures stored with it say on how many pairs it was calibrated.

Example:
    >>> import torch
    >>> sim = torch.tensor([[0.9, 0.2, 0.1], [0.3, 0.8, 0.4], [0.0, 0.5, 0.7]])
    >>> t = calibrate(sim)
    >>> round(t.max_f1, 4), t.f1, t.n_pairs
    (0.7, 1.0, 3)
"""

from __future__ import annotations

import numbers
from dataclasses import asdict, dataclass

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch is imported where a tensor comes in: Threshold is read by ONNX exports, without torch
    import torch

__all__ = ["Threshold", "pair_scores", "threshold_curve", "max_f1_threshold", "precision_threshold", "calibrate"]

TARGET_PRECISION = 0.95


@dataclass(frozen=True)
class Threshold:
    """Cosine thresholds calibrated on validation pairs (see the module docstring).

    Attributes:
        max_f1: the threshold of maximum F1; `f1`, `precision`, `recall` are its figures.
        at_precision: the lowest threshold with precision >= `target_precision`, or None.
        recall_at_precision: the recall at `at_precision` (None with it).
        target_precision: 0.95 by default.
        n_pairs: the validation pairs it was calibrated on (N positives, N(N-1) negatives).
    """

    max_f1: float
    f1: float
    precision: float
    recall: float
    at_precision: float | None
    recall_at_precision: float | None
    target_precision: float
    n_pairs: int

    def to_dict(self) -> dict:
        """Plain values, for JSON and checkpoints."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Threshold":
        """The inverse of `to_dict`; raises ValueError naming the first entry of the wrong shape.

        Thresholds are cosines (finite, in [-1, 1]); rates are in [0, 1]; `n_pairs` is a count.
        """
        if not isinstance(d, dict):
            raise ValueError(f"expected a dict, got {type(d).__name__}")
        for key, lo, hi, optional in (("max_f1", -1, 1, False), ("f1", 0, 1, False), ("precision", 0, 1, False),
                                      ("recall", 0, 1, False), ("at_precision", -1, 1, True),
                                      ("recall_at_precision", 0, 1, True), ("target_precision", 0, 1, False)):
            v = d.get(key)
            if v is None and optional and key in d:
                continue
            # 1e-4: a calibrated cosine can exceed 1 by float rounding.
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not lo - 1e-4 <= v <= hi + 1e-4:
                raise ValueError(f"{key} is {v!r}; expected a number in [{lo}, {hi}]")
        if (d["at_precision"] is None) != (d["recall_at_precision"] is None):
            raise ValueError("at_precision and recall_at_precision must both be set or both be None")
        n = d.get("n_pairs")
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
            raise ValueError(f"n_pairs is {n!r}; expected a positive count")
        return cls(**{k: d[k] for k in cls.__dataclass_fields__})


def pair_scores(sim: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flatten an (N, N) left-by-right similarity matrix into scores and labels (diagonal = 1)."""
    if not isinstance(sim, np.ndarray):
        import torch

        sim = torch.as_tensor(sim).detach().float().cpu().numpy()
    sim = np.asarray(sim, dtype=np.float64)
    if sim.ndim != 2 or sim.shape[0] != sim.shape[1] or sim.shape[0] < 2:
        raise ValueError(f"expected a square similarity matrix of at least 2 pairs, got shape {sim.shape}")
    return sim.ravel(), np.eye(len(sim), dtype=bool).ravel()


def threshold_curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each distinct score t, descending: t, and the true and false positives of `score >= t`.

    Returns:
        `(thresholds, tp, fp)`, three arrays of the same length; O(n log n).
    """
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=bool)
    if scores.shape != labels.shape or scores.ndim != 1 or not len(scores):
        raise ValueError("scores and labels must be 1-D arrays of the same, non-zero length")
    if not np.isfinite(scores).all():
        raise ValueError("scores must be finite")
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], labels[order]
    tp, fp = np.cumsum(y), np.cumsum(~y)
    # Keep the last of each run of equal scores: `>= t` admits all of them at once.
    last = np.r_[s[1:] != s[:-1], True]
    return s[last], tp[last], fp[last]


def max_f1_threshold(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float, float, float]:
    """The threshold of maximum F1 and its `(threshold, f1, precision, recall)`; ties: the higher threshold."""
    t, tp, fp = threshold_curve(scores, labels)
    positives = int(np.asarray(labels, dtype=bool).sum())
    if positives == 0:
        raise ValueError("no positive among the labels")
    precision, recall = tp / (tp + fp), tp / positives
    f1 = np.where(tp > 0, 2 * tp / (tp + fp + positives), 0.0)
    best = int(np.argmax(f1))  # the first maximum, i.e. the highest threshold
    return float(t[best]), float(f1[best]), float(precision[best]), float(recall[best])


def precision_threshold(scores: np.ndarray, labels: np.ndarray,
                        target: float = TARGET_PRECISION) -> tuple[float, float] | None:
    """The lowest threshold whose precision is at least `target`, with its recall; None if none is."""
    t, tp, fp = threshold_curve(scores, labels)
    positives = int(np.asarray(labels, dtype=bool).sum())
    if positives == 0:
        raise ValueError("no positive among the labels")
    ok = np.flatnonzero(tp / (tp + fp) >= target)
    if not len(ok):
        return None
    i = int(ok[-1])  # thresholds descend, so the last one that qualifies is the lowest
    return float(t[i]), float(tp[i] / positives)


def calibrate(sim: torch.Tensor | np.ndarray, target_precision: float = TARGET_PRECISION) -> Threshold:
    """Both thresholds from an (N, N) validation similarity matrix, partners on the diagonal."""
    scores, labels = pair_scores(sim)
    t, f1, p, r = max_f1_threshold(scores, labels)
    at = precision_threshold(scores, labels, target_precision)
    return Threshold(max_f1=t, f1=f1, precision=p, recall=r,
                     at_precision=None if at is None else at[0], recall_at_precision=None if at is None else at[1],
                     target_precision=float(target_precision), n_pairs=int(np.sqrt(len(scores))))
