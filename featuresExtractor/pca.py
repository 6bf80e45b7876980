"""PCA fitting and a pickle-free PCA file (`pca{N}.npz`).

The toolkit fits scikit-learn's PCA with an exact, deterministic solver: the same vectors always give the same components (signs included,
through sklearn's `svd_flip`). The fitted parameters are stored as a plain `.npz`
that loads without pickle; `PCAParams.transform` reproduces `PCA.transform`.

extract.py fits its PCA by streaming (`StreamingPCA`): the vectors arrive in blocks, the
mean and the covariance are accumulated in float64, and one eigendecomposition gives the
components, so memory does not grow with the number of vectors. Up to `MAX_COVARIANCE_DIM`
input dims (the d x d float64 covariance then takes at most 2 GiB) this equals `fit_pca`'s
covariance solver to 1e-6; above it, scikit-learn's `IncrementalPCA` is fed the same blocks
(memory in block rows x d; an incremental, not exact, SVD).

Example:
    >>> import numpy as np
    >>> x = np.random.default_rng(0).normal(size=(50, 8)).astype("float32")
    >>> p = PCAParams.from_sklearn(fit_pca(x, 3))
    >>> p.transform(x).shape
    (50, 3)
    >>> s = StreamingPCA(8, 3)
    >>> for block in (x[:20], x[20:]):
    ...     s.update(block)
    >>> s.fit().components_.shape
    (3, 8)
"""

from __future__ import annotations

import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from toolkit.utils import UserError, atomic_path, first_line

__all__ = ["fit_pca", "StreamingPCA", "MAX_COVARIANCE_DIM", "PCAParams", "save_pca", "load_pca"]

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


MAX_COVARIANCE_DIM = 16384
"""Above this many input dims, `StreamingPCA` uses IncrementalPCA instead of a d x d covariance."""


class StreamingPCA:
    """A PCA fitted on vectors that arrive in blocks; memory independent of the number of vectors.

    Up to `max_dim` dims: float64 sums of the vectors and of their outer products (shifted by the
    first block's mean, which keeps the cancellation in `S - n m m^T` small), then one
    `numpy.linalg.eigh`, signs fixed as sklearn's `svd_flip` fixes them. The result is a fitted
    `sklearn.decomposition.PCA` (so `save_pca` writes it like any other). The same blocks in the
    same order give the same bytes.

    Above `max_dim`: `sklearn.decomposition.IncrementalPCA.partial_fit` on the blocks (buffered so
    each call sees at least `n_components` rows).
    """

    def __init__(self, dim: int, n_components: int, max_dim: int = MAX_COVARIANCE_DIM):
        self.dim, self.n_components, self.n = int(dim), int(n_components), 0
        self.incremental = self.dim > max_dim
        self._shift: np.ndarray | None = None
        if self.incremental:
            from sklearn.decomposition import IncrementalPCA

            self._ipca = IncrementalPCA(n_components=self.n_components)
            self._buffer: list[np.ndarray] = []
        else:
            self._sum = np.zeros(self.dim, dtype=np.float64)
            self._outer = np.zeros((self.dim, self.dim), dtype=np.float64)

    def update(self, x: np.ndarray) -> None:
        """Add the rows of `x` (rows, dim)."""
        x = np.asarray(x, dtype=np.float32).reshape(-1, self.dim)
        if not len(x):
            return
        self.n += len(x)
        if self.incremental:
            self._buffer.append(x)
            if sum(len(b) for b in self._buffer) >= 8 * self.n_components:
                # Keep 4 N rows back, so the last partial_fit also sees at least N rows.
                rows = np.concatenate(self._buffer)
                self._ipca.partial_fit(rows[: -4 * self.n_components])
                self._buffer = [rows[-4 * self.n_components:]]
            return
        x64 = x.astype(np.float64)
        if self._shift is None:
            self._shift = x64.mean(axis=0)
        x64 -= self._shift
        self._sum += x64.sum(axis=0)
        self._outer += x64.T @ x64

    def fit(self):
        """The fitted `sklearn.decomposition.PCA` (or `IncrementalPCA` above `max_dim`)."""
        if self.n < 2 or self.n_components > min(self.n, self.dim):
            raise ValueError(f"cannot fit {self.n_components} components on {self.n} vectors of {self.dim} dims")
        if self.incremental:
            if self._buffer:
                self._ipca.partial_fit(np.concatenate(self._buffer))
                self._buffer = []
            return self._ipca
        from sklearn.decomposition import PCA

        n, k = self.n, self.n_components
        centred_mean = self._sum / n
        cov = (self._outer - n * np.outer(centred_mean, centred_mean)) / (n - 1)
        values, vectors = np.linalg.eigh(cov)
        values, vectors = values[::-1].copy(), vectors[:, ::-1].T.copy()
        values[values < 0.0] = 0.0
        # sklearn's svd_flip(u_based_decision=False): the largest |value| of each component is positive.
        signs = np.sign(vectors[np.arange(len(vectors)), np.argmax(np.abs(vectors), axis=1)])
        signs[signs == 0] = 1.0
        vectors *= signs[:, None]
        total = values.sum()
        pca = PCA(n_components=k, svd_solver="covariance_eigh")
        pca.n_features_in_, pca.n_samples_, pca.n_components_ = self.dim, n, k
        pca.mean_ = (self._shift + centred_mean).astype(np.float32)
        pca.components_ = vectors[:k].astype(np.float32)
        pca.explained_variance_ = values[:k].astype(np.float32)
        pca.explained_variance_ratio_ = (values[:k] / total if total > 0 else np.zeros(k)).astype(np.float32)
        pca.singular_values_ = np.sqrt(values[:k] * (n - 1)).astype(np.float32)
        pca.noise_variance_ = float(values[k:min(n, self.dim)].mean()) if k < min(n, self.dim) else 0.0
        return pca


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
        """Project rows of `x` (..., in_dim) to (..., n_components), as `PCA.transform` does.

        A torch tensor gives a tensor (the ONNX export, `adaptation.export`, traces this same function).
        """
        if type(x).__module__.startswith("torch"):  # without importing torch for numpy callers
            x = x.float()
            return (x - x.new_tensor(self.mean_)) @ x.new_tensor(self.components_).T
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
