"""The faiss side of the similarity index: a run's adapted, L2-normalised gallery vectors in faiss, in memory.

Vectors are adapted then L2-normalised, so the inner product the index ranks by is the
adapted cosine that `VisualSimilarity.score` returns. Kinds:

- `flat`: `faiss.IndexFlatIP`, exact.
- `hnsw`: `faiss.IndexHNSWFlat` (inner product); `hnsw_m`, `ef_construction`, `ef_search`.
- `ivfpq`: `faiss.IndexIVFPQ` over an `IndexFlatIP` coarse quantizer; `nlist`, `pq_m`, `nbits`,
  `nprobe`. Vectors are stored compressed, so its scores are approximate too.

`retrieval.index_folder` owns the folder an index is kept in (written, read, validated);
`look_alike_pairs` lists the look-alike pairs of an index.

Example:
    >>> import numpy as np
    >>> x = normalise(np.random.default_rng(0).normal(size=(100, 16)))
    >>> ix = build(x, [f"v{i}" for i in range(100)], [None] * 100, IndexParams("flat"), identity={})
    >>> scores, ids = ix.search(x[:2], 3)
    >>> ids[:, 0].tolist()
    [0, 1]
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from toolkit.utils import UserError, first_line

__all__ = ["KINDS", "IndexParams", "SimilarityIndex", "normalise", "build", "add", "save_faiss", "load_faiss",
           "look_alike_pairs"]

KINDS = ("flat", "hnsw", "ivfpq")
TRAIN_SAMPLE = 65536  # rows used to train ivfpq's quantizers; more adds build time, not recall


def _faiss():
    try:
        import faiss
    except ImportError:  # pragma: no cover - faiss-cpu is in requirements.txt
        raise UserError("faiss is not installed: pip install faiss-cpu") from None
    return faiss


@dataclass(frozen=True)
class IndexParams:
    """How to build an index. Zero for `nlist` / `pq_m` means: chosen from the gallery size / dim.

    `ef_search` and `nprobe` are search-time settings; they are stored and can be changed at load.
    """

    kind: str = "flat"
    hnsw_m: int = 32
    ef_construction: int = 80
    ef_search: int = 128
    nlist: int = 0
    pq_m: int = 0
    nbits: int = 8
    nprobe: int = 32

    def __post_init__(self):
        if self.kind not in KINDS:
            raise UserError(f"unknown index kind {self.kind!r}; choose one of {', '.join(KINDS)}")
        for name in ("hnsw_m", "ef_construction", "ef_search", "nprobe", "nbits"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(self, name)})")
        if self.nlist < 0 or self.pq_m < 0:
            raise UserError("--nlist and --pq-m must be 0 (automatic) or positive")
        if self.nbits > 16:
            raise UserError(f"--nbits must be at most 16 (got {self.nbits})")

    def resolved(self, n: int, dim: int) -> dict:
        """The parameters that matter for this kind, automatic ones filled in for `n` vectors of `dim`."""
        if self.kind == "flat":
            return {}
        if self.kind == "hnsw":
            return {"hnsw_m": self.hnsw_m, "ef_construction": self.ef_construction, "ef_search": self.ef_search}
        # faiss wants about 39 training points per list; 4 sqrt(n) lists is its usual advice.
        nlist = self.nlist or max(1, min(int(4 * math.sqrt(n)), n // 39))
        pq_m = self.pq_m or max(m for m in range(1, max(1, dim // 8) + 1) if dim % m == 0)
        if dim % pq_m:
            raise UserError(f"--pq-m {pq_m} must divide the vector dimension {dim}")
        return {"nlist": nlist, "pq_m": pq_m, "nbits": self.nbits, "nprobe": min(self.nprobe, nlist)}


def normalise(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm, as contiguous float32 (all-zero rows stay zero)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.maximum(norms, 1e-12), dtype=np.float32)


@dataclass
class SimilarityIndex:
    """A faiss index with its item names, image paths and manifest (kind, params, dim, count, identity, ...;
    `retrieval.index_folder` adds the folder's own entries when it writes or reads one)."""

    index: object  # a faiss.Index
    names: list[str]
    images: list[str | None]
    manifest: dict
    path: Path | None = None

    def __len__(self) -> int:
        return int(self.index.ntotal)

    @property
    def kind(self) -> str:
        return self.manifest["kind"]

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    def set_search(self, ef_search: int | None = None, nprobe: int | None = None) -> None:
        """Change the search-time settings (kept in the manifest when the index is written)."""
        faiss = _faiss()
        params = self.manifest["params"]
        if ef_search is not None and self.kind == "hnsw":
            if ef_search < 1:
                raise UserError(f"--ef-search must be at least 1 (got {ef_search})")
            params["ef_search"] = int(ef_search)
        if nprobe is not None and self.kind == "ivfpq":
            if nprobe < 1:
                raise UserError(f"--nprobe must be at least 1 (got {nprobe})")
            params["nprobe"] = min(int(nprobe), params["nlist"])
        if self.kind == "hnsw":
            faiss.downcast_index(self.index).hnsw.efSearch = params["ef_search"]
        elif self.kind == "ivfpq":
            faiss.extract_index_ivf(self.index).nprobe = params["nprobe"]

    def search(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids), each (n, k), best first, for L2-normalised query rows of this index's dim."""
        if not 1 <= k <= len(self):
            raise UserError(f"k={k} but the index has {len(self)} item(s); use 1 <= k <= {len(self)}")
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise ValueError(f"expected (n, {self.dim}) query vectors, got {vectors.shape}")
        if self.kind == "hnsw":
            # HNSW returns fewer than k hits when efSearch < k.
            faiss = _faiss()
            h = faiss.downcast_index(self.index).hnsw
            h.efSearch = max(self.manifest["params"]["ef_search"], k)
        scores, ids = self.index.search(vectors, k)
        if self.kind == "hnsw":
            h.efSearch = self.manifest["params"]["ef_search"]
        return scores, ids

    def vectors(self) -> np.ndarray:
        """All stored vectors, (count, dim); for ivfpq the compressed (approximate) ones."""
        faiss = _faiss()
        if self.kind == "ivfpq":
            faiss.extract_index_ivf(self.index).make_direct_map()
        return self.index.reconstruct_n(0, len(self))


def _new_faiss_index(dim: int, params: IndexParams, resolved: dict):
    faiss = _faiss()
    if params.kind == "flat":
        return faiss.IndexFlatIP(dim)
    if params.kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, resolved["hnsw_m"], faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = resolved["ef_construction"]
        index.hnsw.efSearch = resolved["ef_search"]
        return index
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFPQ(quantizer, dim, resolved["nlist"], resolved["pq_m"], resolved["nbits"],
                             faiss.METRIC_INNER_PRODUCT)
    index.own_fields = True  # the IVF index owns its quantizer (else it is freed under it)
    quantizer.this.disown()
    index.nprobe = resolved["nprobe"]
    return index


def _add_in_chunks(index, vectors: np.ndarray, progress: bool, desc: str) -> None:
    from tqdm.auto import tqdm

    step = 16384
    for start in tqdm(range(0, len(vectors), step), desc=desc, unit="chunk", leave=False,
                      disable=not progress or len(vectors) <= step):
        index.add(vectors[start:start + step])


def build(vectors: np.ndarray, names: Sequence[str], images: Sequence[str | None], params: IndexParams,
          identity: dict, progress: bool = False, seed: int = 0) -> SimilarityIndex:
    """A new in-memory index of L2-normalised `vectors` (n, dim) with their names and image paths.

    `identity` (the run's checkpoint sha256, backbone, PCA) goes into the manifest.
    """
    faiss = _faiss()
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, dim = vectors.shape
    if n == 0:
        raise UserError("the gallery has no readable image: nothing to index")
    if len(names) != n or len(images) != n:
        raise ValueError("names and images must have one entry per vector")
    resolved = params.resolved(n, dim)
    if params.kind == "ivfpq":
        need = max(resolved["nlist"], 2 ** resolved["nbits"])
        if n < need:
            raise UserError(f"an ivfpq index of {n} vectors cannot train {resolved['nlist']} lists and "
                            f"{2 ** resolved['nbits']} codes per part; use --kind flat or hnsw, or lower --nlist / "
                            f"--nbits (at least {need} vectors needed)")
    index = _new_faiss_index(dim, params, resolved)
    if params.kind == "ivfpq":
        rng = np.random.default_rng(seed)
        sample = vectors if n <= TRAIN_SAMPLE else vectors[np.sort(rng.choice(n, TRAIN_SAMPLE, replace=False))]
        index.train(sample)
    _add_in_chunks(index, vectors, progress, f"index ({params.kind})")
    manifest = {"kind": params.kind, "params": resolved, "dim": dim,
                "count": n, "metric": "inner_product", "normalised": True, "faiss_version": faiss.__version__,
                "identity": identity}
    return SimilarityIndex(index, list(names), list(images), manifest)


def add(ix: SimilarityIndex, vectors: np.ndarray, names: Sequence[str], images: Sequence[str | None],
        progress: bool = False) -> None:
    """Append L2-normalised `vectors` with their names and image paths (in memory; `write` saves).

    An ivfpq index keeps the quantizers it was trained on; add mostly similar images, or rebuild.
    """
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or vectors.shape[1] != ix.dim:
        raise ValueError(f"expected (n, {ix.dim}) vectors, got {vectors.shape}")
    _add_in_chunks(ix.index, vectors, progress, "index add")
    ix.names.extend(names)
    ix.images.extend(images)
    ix.manifest["count"] = len(ix.names)


def save_faiss(ix: SimilarityIndex, path: str | os.PathLike) -> None:
    """Write the faiss part of `ix` to the file `path` (faiss's own I/O errors are `RuntimeError`s)."""
    _faiss().write_index(ix.index, str(path))


def load_faiss(path: str | os.PathLike, kind: str):
    """Read a faiss index file that must hold an inner-product index of `kind`; a `UserError` says what is wrong."""
    faiss = _faiss()
    try:
        index = faiss.read_index(str(path))
    except RuntimeError as err:
        raise UserError(f"cannot read {path} ({first_line(err)}); rebuild the index") from None
    want = {"flat": faiss.IndexFlat, "hnsw": faiss.IndexHNSW, "ivfpq": faiss.IndexIVFPQ}[kind]
    if not isinstance(faiss.downcast_index(index), want) or index.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise UserError(f"{path} is not an inner-product {kind} index as its manifest says; rebuild the index")
    return index


def look_alike_pairs(ix: SimilarityIndex, threshold: float | None = None, top: int | None = None,
                     per_item: int = 100, batch: int = 4096) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
    """Pairs of different gallery items, each pair once, best first: `(a, b, score, capped)`.

    With `threshold`, every pair scoring at least it (each item's best `per_item` neighbours are
    looked at; `capped` is True when some item had more above the threshold). With `top`, the
    `top` best pairs of the whole gallery (exact for a flat index). `a < b` are item ids.
    """
    if (threshold is None) == (top is None):
        raise ValueError("give exactly one of threshold and top")
    n = len(ix)
    k = min(n, (top + 1) if top is not None else per_item + 1)
    x = ix.vectors()
    best = (np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float32))
    capped = False
    for start in range(0, n, batch):
        scores, ids = ix.search(x[start:start + batch], k)
        rows = np.repeat(np.arange(start, start + len(ids)), k)
        cols, s = ids.ravel(), scores.ravel()
        keep = (cols >= 0) & (cols != rows)
        if threshold is not None:
            capped |= bool(k < n and (scores[:, -1] >= threshold).any())
            keep &= s >= threshold
        a, b = np.minimum(rows, cols)[keep], np.maximum(rows, cols)[keep]
        best = _dedupe(np.concatenate([best[0], a]), np.concatenate([best[1], b]), np.concatenate([best[2], s[keep]]))
        if top is not None:
            best = tuple(v[:top] for v in best)
    return best[0], best[1], best[2], capped


def _dedupe(a: np.ndarray, b: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One row per (a, b), keeping its highest score; sorted by score, then a, then b."""
    order = np.lexsort((-s, b, a))
    a, b, s = a[order], b[order], s[order]
    first = np.ones(len(a), bool)
    first[1:] = (a[1:] != a[:-1]) | (b[1:] != b[:-1])
    a, b, s = a[first], b[first], s[first]
    order = np.lexsort((b, a, -s))
    return a[order], b[order], s[order]
