"""PCA fitting and a pickle-free PCA file (`pca{N}.npz`).

The toolkit fits scikit-learn's PCA with an exact, deterministic solver: the same vectors always give the same components (signs included,
through sklearn's `svd_flip`). The fitted parameters are stored as a plain `.npz`
that loads without pickle; `PCAParams.transform` reproduces `PCA.transform`.

extract.py fits its PCA by streaming (`StreamingPCA`): the vectors arrive in blocks and the fit
is exact, at a cost that follows the data. Up to as many vectors as dims (a demo, a small
gallery) the rows are kept and the n x n Gram matrix of the centred rows is decomposed (the
SVD that `PCA(svd_solver="full")` computes); with more vectors, the mean and the covariance
are accumulated in float64 and only the top `n_components` eigenpairs are computed, so memory
does not grow with the number of vectors. Both equal scikit-learn's full SVD to 1e-5
(tests/test_scale.py). Above `MAX_COVARIANCE_DIM` input dims (the d x d float64 covariance
would take more than 2 GiB), scikit-learn's `IncrementalPCA` is fed the same blocks (memory in
block rows x d; an incremental, not exact, SVD). On a torch device (CUDA) the same code runs
there, with `torch.linalg.eigh`.

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

_CHUNK_ROWS = 1024  # rows turned into float64 at a time: bounds the temporary copy of a large block


class StreamingPCA:
    """A PCA fitted on vectors that arrive in blocks, exact, with a cost that follows the data.

    Up to `max_dim` dims, two exact solvers, chosen by the number of vectors n:

    * n <= dim (a demo, a test, a small gallery): the rows are kept (n x dim float32, no more
      than the dim x dim covariance would take) and the n x n Gram matrix of the centred rows is
      decomposed, then one Rayleigh-Ritz step on the rows gives the components: the SVD of the
      centred rows, which is what `PCA(svd_solver="full")` computes, in O(n^2 dim) instead of O(dim^3).
    * n > dim (TLL: 24,064 x 5,440): the rows are folded into float64 sums of the vectors and of
      their outer products (shifted by the first rows' mean, which keeps the cancellation in
      `S - n m m^T` small), and only the top `n_components` eigenpairs of the covariance are computed.

    `device=None` runs on the CPU with numpy/scipy (BLAS syrk for the sums, LAPACK's subset
    eigensolver); a torch device (`"cuda"`, or `"cpu"` to run the same code on the CPU) keeps the
    sums on that device and decomposes them with `torch.linalg.eigh` there.

    `fit` returns a fitted `sklearn.decomposition.PCA` with scikit-learn's conventions (`svd_flip`
    signs, `explained_variance_`, `explained_variance_ratio_`, `noise_variance_`), so `save_pca`
    writes it like any other; its `solver_` attribute names the solver used. The same blocks in the
    same order on the same device give the same bytes.

    Above `max_dim`: `sklearn.decomposition.IncrementalPCA.partial_fit` on the blocks (buffered so
    each call sees at least `n_components` rows).
    """

    def __init__(self, dim: int, n_components: int, max_dim: int = MAX_COVARIANCE_DIM, device=None):
        self.dim, self.n_components, self.n = int(dim), int(n_components), 0
        self.device = device
        self.incremental = self.dim > max_dim
        self._rows: list[np.ndarray] = []  # float32 blocks, kept while n <= dim (the Gram solver's input)
        self._shift = self._sum = self._outer = None
        self._fitted = None
        if self.incremental:
            from sklearn.decomposition import IncrementalPCA

            self._ipca = IncrementalPCA(n_components=self.n_components)
            self._buffer: list[np.ndarray] = []

    def update(self, x: np.ndarray) -> None:
        """Add the rows of `x` (rows, dim)."""
        if self._fitted is not None:
            raise RuntimeError("StreamingPCA.update after fit: the sums were used up by the fit")
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
        if self._outer is None and self.n <= self.dim:
            self._rows.append(x.copy())  # a copy: the caller may reuse its array
            return
        if self._outer is None:
            self._start_covariance(self._rows or [x])
            rows, self._rows = self._rows, []
            while rows:  # each kept block is freed once folded in
                self._accumulate(rows.pop(0))
        self._accumulate(x)

    def _start_covariance(self, first: list[np.ndarray]) -> None:
        """Allocate the sums; the shift is the mean of the `first` rows."""
        shift = sum(r.sum(axis=0, dtype=np.float64) for r in first) / sum(len(r) for r in first)
        if self.device is None:
            self._shift, self._sum = shift, np.zeros(self.dim)
            self._outer = np.zeros((self.dim, self.dim), order="F")  # F order: syrk updates it in place
        else:
            import torch

            self._shift = torch.from_numpy(shift).to(self.device)
            self._sum = torch.zeros(self.dim, dtype=torch.float64, device=self.device)
            self._outer = torch.zeros(self.dim, self.dim, dtype=torch.float64, device=self.device)

    def _accumulate(self, x: np.ndarray) -> None:
        for start in range(0, len(x), _CHUNK_ROWS):
            part = _as_float64(x[start:start + _CHUNK_ROWS], self.device)
            part -= self._shift
            self._sum += part.sum(0)
            _add_gram(self._outer, part)

    def fit(self):
        """The fitted `sklearn.decomposition.PCA` (or `IncrementalPCA` above `max_dim`).

        The sums are used up (and freed): a second call returns the same object, `update` then fails.
        """
        if self._fitted is not None:
            return self._fitted
        n, k = self.n, self.n_components
        if n < 2 or k > min(n, self.dim):
            raise ValueError(f"cannot fit {k} components on {n} vectors of {self.dim} dims")
        if self.incremental:
            if self._buffer:
                self._ipca.partial_fit(np.concatenate(self._buffer))
                self._buffer = []
            self._ipca.solver_ = "IncrementalPCA"
            self._fitted = self._ipca
            return self._fitted
        where = "cpu" if self.device is None else f"torch {self.device}"
        if self._outer is None:
            x, self._rows = _stack_float64(self._rows, self.device), []  # the float32 rows go before the solve
            mean, components, variance, total = _gram_solver(x, k)
            solver = f"gram eigh of the centred rows + Rayleigh-Ritz (float64, {where})"
        else:
            mean, components, variance, total = self._covariance_solver()
            solver = f"streamed covariance + top-{k} eigh (float64, {where})"
        self._sum = self._outer = None
        self._fitted = _sklearn_pca(mean, components, variance, total, n, solver)
        return self._fitted

    def _covariance_solver(self):
        """mean, the top k eigenvectors (k, dim) and eigenvalues of the covariance, its trace."""
        n, acc = self.n, self._outer
        centred_mean = self._sum / n
        # acc becomes the covariance in place (no second dim x dim array): (acc - n m m^T) / (n - 1).
        if self.device is None:
            from scipy.linalg.blas import dsyr

            acc = dsyr(-float(n), centred_mean, a=acc, lower=0, overwrite_a=1)
        else:
            acc.addr_(centred_mean, centred_mean, alpha=-n)
        acc /= n - 1
        total = float(acc.trace())  # before the eigensolver, which may overwrite acc
        values, vectors = _top_eigh(acc, self.n_components)
        return _numpy(self._shift + centred_mean), _numpy(vectors).T, _numpy(values), total


def _as_float64(x: np.ndarray, device):
    """`x` as a float64 array (device None) or a float64 tensor on `device`: a new copy either way."""
    if device is None:
        return x.astype(np.float64)
    import torch

    return torch.from_numpy(np.ascontiguousarray(x)).to(device=device, dtype=torch.float64)


def _stack_float64(blocks: list[np.ndarray], device):
    """The rows of `blocks` in one float64 array or tensor, filled block by block (no float32 concatenation)."""
    if device is None:
        out = np.empty((sum(len(b) for b in blocks), blocks[0].shape[1]))
        start = 0
        for b in blocks:
            out[start:start + len(b)] = b
            start += len(b)
        return out
    import torch

    return torch.cat([_as_float64(b, device) for b in blocks])


def _numpy(a) -> np.ndarray:
    return a if isinstance(a, np.ndarray) else a.cpu().numpy()


def _add_gram(acc, a) -> None:
    """`acc += a^T a` in place (`a`: rows x cols, C-ordered float64; `acc`: cols x cols).

    numpy (`acc` in F order): the upper triangle only, by BLAS syrk (half a matrix product's
    flops, no temporary); the solvers read that triangle. torch: the whole matrix, by addmm.
    """
    if isinstance(acc, np.ndarray):
        from scipy.linalg.blas import dsyrk

        # syrk wants F-ordered operands: a.T is, and trans=0 makes it compute a.T @ a.
        out = dsyrk(1.0, a.T, beta=1.0, c=acc, trans=0, lower=0, overwrite_c=1)
        if not np.shares_memory(out, acc):  # never expected: acc is F-ordered float64
            raise RuntimeError("dsyrk did not update the sums in place")
    else:
        acc.addmm_(a.T, a)


def _top_eigh(a, k: int):
    """The top `k` eigenvalues (descending) and eigenvectors (columns) of the symmetric `a`.

    Only the upper triangle of `a` is read; `a` may be overwritten. numpy: LAPACK's subset
    solver (scipy `eigh(subset_by_index=...)`); torch: `torch.linalg.eigh` on `a`'s device.
    """
    m = a.shape[0]
    if isinstance(a, np.ndarray):
        from scipy.linalg import eigh

        values, vectors = eigh(a, lower=False, subset_by_index=[m - k, m - 1], driver=_EIGH_DRIVER,
                               overwrite_a=True, check_finite=False)
        return values[::-1].copy(), vectors[:, ::-1].copy()
    import torch

    values, vectors = torch.linalg.eigh(a, UPLO="U")
    return values[m - k:].flip(0), vectors[:, m - k:].flip(1)


_EIGH_DRIVER = "evx"  # the fastest subset driver at d = 5440 on the 2-core EPYC (bench/extract.py, README)


def _gram_solver(x, k: int):
    """mean, components (k, dim), their variances and the total variance of the rows of `x` (n <= dim), exactly.

    `x`: float64 (n, dim), a numpy array or a torch tensor (on any device); centred in place.

    The top k eigenvectors U of the n x n Gram matrix G = X X^T of the centred rows X span the top k
    left singular vectors; Q = qr(X^T U) then spans the right ones, and the SVD of the n x k matrix X Q
    gives them one by one (accurately even for tiny or zero variances, where X^T u / |X^T u| would not).
    """
    n = x.shape[0]
    mean = x.mean(0)
    x -= mean
    if isinstance(x, np.ndarray):
        linalg = np.linalg
    else:
        import torch

        linalg = torch.linalg
    gram = x @ x.T  # numpy and torch see the transposed pair: one syrk-like product
    total = float(gram.trace())
    _, u = _top_eigh(gram, k)
    q, _ = linalg.qr(x.T @ u)
    _, s, wt = linalg.svd(x @ q, full_matrices=False)
    return _numpy(mean), _numpy(wt @ q.T), _numpy(s) ** 2 / (n - 1), total / (n - 1)


def _sklearn_pca(mean, components, variance, total, n: int, solver: str):
    """A fitted `PCA` from float64 results, with scikit-learn's conventions.

    `components` (k, dim) and their `variance` in descending order, `total` the sum of all the variances.
    """
    from sklearn.decomposition import PCA

    components = np.array(components, dtype=np.float64)
    variance = np.maximum(np.asarray(variance, dtype=np.float64), 0.0)  # rounding can leave -1e-17
    k, dim = components.shape
    # sklearn's svd_flip(u_based_decision=False): the largest |value| of each component is positive.
    signs = np.sign(components[np.arange(k), np.argmax(np.abs(components), axis=1)])
    signs[signs == 0] = 1.0
    components *= signs[:, None]
    rest = min(n, dim) - k  # the variances not computed: sklearn's noise_variance_ is their mean
    pca = PCA(n_components=k, svd_solver="full")
    pca.n_features_in_, pca.n_samples_, pca.n_components_ = dim, n, k
    pca.mean_ = mean.astype(np.float32)
    pca.components_ = components.astype(np.float32)
    pca.explained_variance_ = variance.astype(np.float32)
    pca.explained_variance_ratio_ = (variance / total if total > 0 else np.zeros(k)).astype(np.float32)
    pca.singular_values_ = np.sqrt(variance * (n - 1)).astype(np.float32)
    pca.noise_variance_ = max(total - float(variance.sum()), 0.0) / rest if rest > 0 else 0.0
    pca.solver_ = solver
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

        A torch tensor gives a tensor (the ONNX export, `retrieval.export`, traces this same function).
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
