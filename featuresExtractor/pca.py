"""PCA fitting and a pickle-free PCA file (`pca{N}.npz`).

The toolkit fits scikit-learn's PCA with an exact, deterministic solver: the same vectors always give the same components (signs included,
through sklearn's `svd_flip`). The fitted parameters are stored as a plain `.npz`
that loads without pickle; `PCAParams.transform` reproduces `PCA.transform`.

Example:
    >>> import numpy as np
    >>> x = np.random.default_rng(0).normal(size=(50, 8)).astype("float32")
    >>> p = PCAParams.from_sklearn(fit_pca(x, 3))
    >>> p.transform(x).shape
    (50, 3)
"""

from __future__ import annotations

import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from toolkit.utils import UserError, atomic_path, first_line

__all__ = ["fit_pca", "PCAParams", "save_pca", "load_pca"]

_FIELDS = ("components_", "mean_", "explained_variance_", "explained_variance_ratio_")


def fit_pca(x: np.ndarray, n_components: int):
    """Fit sklearn's PCA on the rows of `x`, with a deterministic solver.

    With more rows than columns (TLL: 24,064 x 5440) the eigen-decomposition of the
    d x d covariance is used, which needs no centred copy of `x`; otherwise the full
    SVD. Both are exact and deterministic (signs fixed by sklearn's `svd_flip`).
    """
    from sklearn.decomposition import PCA

    x = np.asarray(x, dtype=np.float32)
    solver = "covariance_eigh" if x.shape[0] > x.shape[1] else "full"
    return PCA(n_components=n_components, svd_solver=solver).fit(x)


@dataclass(frozen=True)
class PCAParams:
    """The arrays of a fitted PCA: enough to project new vectors, no pickle."""

    components_: np.ndarray
    mean_: np.ndarray
    explained_variance_: np.ndarray
    explained_variance_ratio_: np.ndarray

    @classmethod
    def from_sklearn(cls, pca) -> "PCAParams":
        return cls(*(np.asarray(getattr(pca, f), dtype=np.float32) for f in _FIELDS))

    @property
    def n_components(self) -> int:
        return int(self.components_.shape[0])

    @property
    def in_dim(self) -> int:
        return int(self.components_.shape[1])

    def transform(self, x: np.ndarray) -> np.ndarray:
        """Project rows of `x` (..., in_dim) to (..., n_components), as `PCA.transform` does."""
        return ((np.asarray(x, dtype=np.float32) - self.mean_) @ self.components_.T).astype(np.float32)


def save_pca(stem: Path, pca) -> list[Path]:
    """Write `stem.npz` (pickle-free) and `stem.pkl` (the sklearn object, trusted-only)."""
    params = PCAParams.from_sklearn(pca)
    # Not with_suffix: a tap such as "transformer.resblocks.0" already contains dots.
    npz, pkl = stem.parent / f"{stem.name}.npz", stem.parent / f"{stem.name}.pkl"
    with atomic_path(npz, suffix=".npz") as tmp:
        np.savez(tmp, **{f: getattr(params, f) for f in _FIELDS})
    with atomic_path(pkl) as tmp:
        tmp.write_bytes(pickle.dumps(pca))
    return [npz, pkl]


def load_pca(path: str | Path) -> PCAParams:
    """Load a `pca{N}.npz` written by `save_pca` (no pickle involved)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"PCA file {path} is missing")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [f for f in _FIELDS if f not in z.files]
            if missing:
                raise UserError(f"{path} is not a PCA file written by extract.py (missing {missing})")
            return PCAParams(*(z[f] for f in _FIELDS))
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, AttributeError) as err:
        # np.load on a damaged archive: a bad zip, a truncated member, or not an npz at all.
        raise UserError(f"cannot read PCA file {path}: {first_line(err)}") from None
