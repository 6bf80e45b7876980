"""The train/test split: which original pairs are held out, and the three sets a run uses.

`split_indices` draws the test pairs and `split_data` puts the three sets (train originals,
their flipped copies, test originals) on a device as tensors. A test pair's flipped copy never
reaches training.

Example:
    >>> from synthetic.planted import planted_pairs
    >>> pairs = planted_pairs(n_pairs=8, dim=4)
    >>> data = split_data(pairs, *split_indices(len(pairs), test_split=0.25, seed=0))
    >>> data.test[0].shape
    torch.Size([2, 4])
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
import torch

from featuresExtractor.pairs_file import Pairs
from toolkit.utils import UserError

__all__ = ["TrainData", "split_indices", "split_data", "split_each"]


@dataclass(frozen=True)
class TrainData:
    """The three sets a run uses, as tensors on one device.

    Attributes:
        train: `(left, right)` of the original training pairs, each `(N_train, D)`.
        flipped: `(left, right)` of those pairs' flipped copies, or None when the file has none.
        test: `(left, right)` of the original test pairs, each `(N_test, D)`.
        train_names, test_names: the pairs' names, in row order.
        val: `(left, right)` of the original validation pairs (held out of training, see
            `adaptation.selection.split_validation`), or None without a validation split.
        val_names: their names.
    """

    train: tuple[torch.Tensor, torch.Tensor]
    flipped: tuple[torch.Tensor, torch.Tensor] | None
    test: tuple[torch.Tensor, torch.Tensor]
    train_names: list[str]
    test_names: list[str]
    val: tuple[torch.Tensor, torch.Tensor] | None = None
    val_names: list[str] = field(default_factory=list)

    @property
    def train_sets(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The sets the loss averages over: the originals, then the flipped copies if any."""
        return [self.train] + ([self.flipped] if self.flipped is not None else [])


def split_indices(
    n_pairs: int, test_split: float, seed: int, topk: Sequence[int] = ()
) -> tuple[np.ndarray, np.ndarray]:
    """Draw the test pairs at random: `floor(test_split * n_pairs)` of them, as the paper's code did.

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
        raise UserError(f"test_split must lie strictly between 0 and 1, got {test_split}")
    n_test = int(math.floor(test_split * n_pairs))
    if n_test < 2:
        raise UserError(
            f"test_split {test_split} of {n_pairs} pairs leaves {n_test} test pairs; retrieval needs at least 2"
        )
    if n_pairs - n_test < 1:
        raise UserError(f"test_split {test_split} of {n_pairs} pairs leaves no training pairs")
    too_big = [k for k in topk if k > n_test]
    if too_big:
        raise UserError(f"top-k {too_big[0]} is larger than the test set ({n_test} pairs)")
    perm = np.random.default_rng(seed).permutation(n_pairs)
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


def split_data(
    pairs: Pairs, train_idx: np.ndarray, test_idx: np.ndarray, device: str | torch.device = "cpu",
    val_idx: np.ndarray | None = None,
) -> TrainData:
    """Gather the train originals, their flipped copies and the test originals as tensors on `device`.

    Only flipped copies of training pairs are kept; a test or validation pair's copy never
    reaches training. `val_idx` (pairs in neither `train_idx` nor `test_idx`), when given and
    not empty, become `TrainData.val`.
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
        val=tensors(pairs.left[val_idx], pairs.right[val_idx]) if val_idx is not None and len(val_idx) else None,
        val_names=[pairs.names[i] for i in val_idx] if val_idx is not None else [],
    )


def split_each(
    pairs: Pairs, splits: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray | None]],
    device: str | torch.device = "cpu",
) -> Iterator[TrainData]:
    """`split_data` for each `(train_idx, test_idx, val_idx)` in turn, letting `pairs` go after the last one.

    Why: the sets are copies of the pairs' vectors (about 0.8 GB each at 200,000 pairs of 256-d
    with flipped copies). Once the caller drops its own reference, the generator holds the only
    one and releases it as soon as the last run's sets are made, so that run trains with one
    copy in memory, not two. Take each run's sets just before training it: the previous run's
    must be released first for the same reason.

    Example:
        >>> from synthetic.planted import planted_pairs
        >>> pairs = planted_pairs(n_pairs=8, dim=4)
        >>> runs = split_each(pairs, [(*split_indices(8, 0.25, seed=s), None) for s in (0, 1)])
        >>> del pairs
        >>> [len(data.test[0]) for data in runs]
        [2, 2]
    """
    for i, (train_idx, test_idx, val_idx) in enumerate(splits):
        data = split_data(pairs, train_idx, test_idx, device, val_idx)
        if i == len(splits) - 1:
            del pairs
        yield data
