"""Bounded-memory pieces of the extraction: streamed PCA, block reader, memory-mapped writer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from featuresExtractor.pairs_file import RecordsWriter, make_records
from featuresExtractor.pca import PCAParams, StreamingPCA, fit_pca
from featuresExtractor.store import ChunkStore


def _data(n=3000, d=48, seed=0, offset=5.0):
    rng = np.random.default_rng(seed)
    scales = 3.0 * 0.85 ** np.arange(d)  # well separated eigenvalues: the components are well defined
    return (rng.normal(size=(n, d)) * scales + rng.normal(size=d) * offset).astype(np.float32)


@pytest.mark.parametrize("blocks", [1, 7, 3000])
def test_streamed_pca_equals_the_covariance_solver(blocks):
    from sklearn.decomposition import PCA

    x = _data()
    s = StreamingPCA(x.shape[1], 10)
    for part in np.array_split(x, blocks):
        s.update(part)
    got = s.fit()
    # The same solver (covariance + eigh, sklearn's svd_flip signs) on all rows at once, in float64.
    exact = PCA(10, svd_solver="covariance_eigh").fit(x.astype(np.float64))
    for field in ("components_", "mean_", "explained_variance_ratio_"):
        np.testing.assert_allclose(getattr(got, field), getattr(exact, field), atol=1e-6, err_msg=field)
    np.testing.assert_allclose(got.explained_variance_, exact.explained_variance_, rtol=1e-6)
    np.testing.assert_allclose(PCAParams.from_sklearn(got).transform(x), exact.transform(x), atol=2e-5)
    np.testing.assert_allclose(got.transform(x[:5]), exact.transform(x[:5]), atol=1e-5)  # the pickled object works
    # fit_pca (sklearn's covariance solver on float32 rows, what extract.py used before), on data
    # centred about as well as pooled features: equal within 1e-6.
    y = _data(offset=0.1)
    s = StreamingPCA(y.shape[1], 10)
    for part in np.array_split(y, blocks):
        s.update(part)
    got, ref = s.fit(), fit_pca(y, 10)
    for field in ("components_", "mean_", "explained_variance_ratio_"):
        np.testing.assert_allclose(getattr(got, field), getattr(ref, field), atol=1e-6, err_msg=field)


def _sklearn_case(n, d, kind, seed=1):
    """float32 rows with a mean offset of 5, unit-scale decaying variances; `kind` makes them rank-deficient."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)) * 0.9 ** np.arange(d) + 5.0
    if kind == "duplicates":  # each row twice: rank about n / 2
        x[1::2] = x[0::2][: n // 2]
    elif kind == "zero column":
        x[:, 7] = 0.0
    return x.astype(np.float32)


_CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))


# numpy/scipy; the torch code CUDA runs, on the CPU; and on CUDA where there is one.
@pytest.mark.parametrize("device", [None, "cpu", _CUDA])
@pytest.mark.parametrize("kind", ["plain", "duplicates", "zero column"])
@pytest.mark.parametrize("n,d", [(24, 40), (40, 40), (300, 40)])  # n < d, n = d (Gram solver), n > d (covariance)
def test_streamed_pca_equals_sklearns_full_svd(n, d, kind, device):
    from sklearn.decomposition import PCA

    x = _sklearn_case(n, d, kind)
    for k in (5, min(n, d)):
        s = StreamingPCA(d, k, device=device)
        for part in np.split(x, range(15, n, 15)):  # n > d: 30 rows kept, then folded into the covariance
            s.update(part)
        got, ref = s.fit(), PCA(k, svd_solver="full").fit(x.astype(np.float64))
        assert got.solver_.startswith("gram" if n <= d else "streamed covariance")
        for field in ("mean_", "explained_variance_", "explained_variance_ratio_"):
            np.testing.assert_allclose(getattr(got, field), getattr(ref, field), atol=1e-5, err_msg=field)
        assert abs(got.noise_variance_ - ref.noise_variance_) < 1e-5
        np.testing.assert_allclose(got.singular_values_, ref.singular_values_, atol=1e-4)
        # Components with a variance are unique up to sign (svd_flip fixes it); those without one (rank
        # deficiency, and the last one of n <= d centred rows) are any orthonormal completion.
        real = ref.explained_variance_ > 1e-9
        assert real.sum() >= min(k, 5)
        np.testing.assert_allclose(got.components_[real], ref.components_[real], atol=1e-5)
        np.testing.assert_allclose(got.components_ @ got.components_.T, np.eye(k), atol=1e-5)
        np.testing.assert_allclose(PCAParams.from_sklearn(got).transform(x), ref.transform(x.astype(np.float64)),
                                   atol=1e-5)


def test_streamed_pca_fits_once():
    x = _sklearn_case(50, 8, "plain")
    s = StreamingPCA(8, 3)
    s.update(x)
    first = s.fit()
    assert s.fit() is first  # the sums were freed; the fitted object is kept
    with pytest.raises(RuntimeError, match="after fit"):
        s.update(x)


def test_streamed_pca_refuses_too_few_vectors():
    s = StreamingPCA(4, 3)
    s.update(np.zeros((2, 4)))
    with pytest.raises(ValueError, match="3 components on 2 vectors"):
        s.fit()


def test_above_the_covariance_limit_incremental_pca_spans_the_same_subspace():
    x = _data(n=600, d=32, offset=0.1)
    s = StreamingPCA(32, 4, max_dim=16)
    assert s.incremental
    for part in np.array_split(x, 9):
        s.update(part)
    got, ref = s.fit(), fit_pca(x, 4)
    assert type(got).__name__ == "IncrementalPCA"
    # Same subspace: projecting the reference components onto the incremental ones keeps them.
    overlap = np.abs(ref.components_ @ got.components_.T)
    # (an incremental SVD, close but not exact)
    np.testing.assert_allclose(np.linalg.svd(overlap, compute_uv=False), 1, atol=2e-2)


def _store(tmp_path, batches, skips=()):
    store = ChunkStore(tmp_path / "store")
    store.start({"x": 1})
    for idx in batches:
        parts = {"a": np.asarray(idx, dtype=np.float32)[:, None, None, None] * [1, 2],
                 "b": -np.asarray(idx, dtype=np.float32)[:, None, None, None]}
        store.write(idx, parts, [(i, f"bad {i}") for i in idx if i in skips])
    return store


@pytest.mark.parametrize("block", [1, 3, 100])
def test_stored_rows_come_in_item_order_whatever_the_chunks(tmp_path, block):
    # Chunks as a resumed, re-sharded run leaves them: interleaved ranges, one item twice.
    store = _store(tmp_path, [[0, 1, 2], [7, 8], [3, 9, 4], [5, 6, 1]], skips={4})
    rows = store.rows()
    assert rows.kept.tolist() == [0, 1, 2, 3, 5, 6, 7, 8, 9]
    assert rows.skipped == {4: "bad 4"}
    seen, starts = [], []
    for start, parts in rows.blocks(block):
        starts.append(start)
        assert list(parts) == ["a", "b"]
        assert parts["a"].shape[1:] == (1, 1, 2)
        np.testing.assert_array_equal(parts["b"][:, 0, 0, 0], -parts["a"][:, 0, 0, 0])
        seen += parts["a"][:, 0, 0, 0].astype(int).tolist()
    assert seen == rows.kept.tolist()
    assert starts == list(range(0, 9, block))


def test_records_writer_writes_what_make_records_builds(tmp_path):
    rng = np.random.default_rng(0)
    names = [f"img{i}.jpg" for i in range(7)]
    vectors = rng.normal(size=(7, 2, 2, 5)).astype(np.float32)
    with RecordsWriter(tmp_path / "f.npy", names, ("left", "right"), 5, 2) as w:
        for start in (0, 3, 6):
            w.write(start, vectors[start:start + 3])
        assert not (tmp_path / "f.npy").exists()  # only whole files appear
    got, want = np.load(tmp_path / "f.npy"), make_records(names, vectors, ("left", "right"))
    assert got.dtype == want.dtype and got.tobytes() == want.tobytes()
    with pytest.raises(RuntimeError):
        with RecordsWriter(tmp_path / "g.npy", names, ("left", "right"), 5, 2) as w:
            raise RuntimeError("disk full")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.npy"]


def test_records_writer_failing_to_start_names_the_file_and_leaves_nothing(tmp_path):
    # Before: a refused write while the header and size were set up (full disk, file size limit) came out
    # as "an output file: File too large" and left the hidden .f.npy.*.tmp.npy behind, since the caller's
    # `with` block had not begun.
    import resource

    names = [f"img{i}.jpg" for i in range(50)]
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1000, hard))  # Python ignores SIGXFSZ: writes past it fail (EFBIG)
    try:
        with pytest.raises(OSError) as err:
            RecordsWriter(tmp_path / "f.npy", names, ("left", "right"), 100, 2)  # 80 kB of rows
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert err.value.filename == str(tmp_path / "f.npy")
    assert list(tmp_path.iterdir()) == []
