"""Planted pairs: synthetic features where learning an adaptation visibly helps.

Each pair shares a latent signal in a few dimensions (plus a little per-image noise); the other
dimensions hold larger, independent nuisance values. Raw cosines are dominated by the nuisance,
so `dummy` retrieves poorly, while an adaptation that learns to keep the signal dimensions
retrieves well. Used by the tests and by `bench/train.py`.

Example:
    >>> pairs = planted_pairs(n_pairs=100, dim=32, seed=0)
    >>> len(pairs), pairs.in_dim, len(pairs.flipped_of)
    (100, 32, 100)
"""

from __future__ import annotations

import numpy as np

from featuresExtractor.pairs_file import Pairs, pairs_from_structured, to_structured

__all__ = ["planted_array", "planted_pairs"]


def planted_array(
    n_pairs: int,
    dim: int,
    signal_dim: int | None = None,
    noise: float = 0.5,
    nuisance: float = 3.0,
    flip_noise: float = 0.1,
    flipped: bool = True,
    seed: int = 0,
) -> np.ndarray:
    """Planted pairs in extract.py's structured format, rows shuffled (originals and copies mixed).

    Args:
        n_pairs: number of original pairs.
        dim: feature dimension D.
        signal_dim: dimensions carrying the shared latent (default `max(2, dim // 8)`), placed at
            random positions.
        noise: std of each image's own noise on the signal dimensions (latent std is 1).
        nuisance: std of the independent values in the other dimensions.
        flip_noise: std of the perturbation that makes a flipped copy from its original.
        flipped: add one flipped copy per pair (`augmented=True`, same name).
        seed: seeds everything.

    Returns:
        A structured array with fields `name`, `augmented`, `left`, `right`.
    """
    rng = np.random.default_rng(seed)
    s = signal_dim if signal_dim is not None else max(2, dim // 8)
    signal_dims = rng.permutation(dim)[:s]
    z = rng.standard_normal((n_pairs, s))

    def side() -> np.ndarray:
        x = nuisance * rng.standard_normal((n_pairs, dim))
        x[:, signal_dims] = z + noise * rng.standard_normal((n_pairs, s))
        return x

    left, right = side(), side()
    names = [f"pair{i:05d}.jpg" for i in range(n_pairs)]
    augmented = np.zeros(n_pairs, dtype=bool)
    if flipped:
        left = np.concatenate([left, left + flip_noise * rng.standard_normal(left.shape)])
        right = np.concatenate([right, right + flip_noise * rng.standard_normal(right.shape)])
        names = names + names
        augmented = np.concatenate([augmented, ~augmented])
    order = rng.permutation(len(names))
    return to_structured([names[i] for i in order], augmented[order], left[order], right[order])


def planted_pairs(n_pairs: int, dim: int, **kwargs) -> Pairs:
    """`planted_array(...)` as checked `Pairs` (see `planted_array` for the arguments)."""
    return pairs_from_structured(planted_array(n_pairs, dim, **kwargs), source="planted pairs")
