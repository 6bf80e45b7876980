"""The faiss side of the similarity index: a run's adapted, L2-normalised gallery vectors in faiss, in memory.

Vectors are adapted then L2-normalised, so the inner product the index ranks by is the
adapted cosine that `VisualSimilarity.score` returns. Kinds:

- `flat`: `faiss.IndexFlatIP`, exact.
- `hnsw`: `faiss.IndexHNSWFlat` (inner product); `hnsw_m`, `ef_construction`, `ef_search`.
- `ivf`: `faiss.IndexIVFFlat` over an `IndexFlatIP` coarse quantizer; `nlist`, `nprobe`. Vectors
  are stored whole, so its scores are exact; only which lists are visited is approximate.
  Trained on at most `TRAIN_SAMPLE` vectors, so it needs at least `IVF_MIN_TRAIN` per list.
- `ivfpq`: `faiss.IndexIVFPQ` over an `IndexFlatIP` coarse quantizer; `nlist`, `pq_m`, `nbits`,
  `nprobe`. Vectors are stored compressed, so its scores are approximate too.

`IndexParams.target_recall` makes `build` choose `ef_search` (hnsw) or `nprobe` (ivf kinds): a
held-out sample of the gallery's own vectors (`tune_queries`, added to the index last) is searched
against exact search over the rest, and the smallest setting of `EF_GRID` / `NPROBE_GRID` that
reaches the recall@10 asked for is kept; the choice and its measured recall go in the manifest
(`tuned`).

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

from .backend import VectorIndex

__all__ = ["KINDS", "IVF_KINDS", "IndexParams", "SimilarityIndex", "normalise", "item_key", "build", "tune",
           "tune_queries", "recall_at", "add", "save_faiss", "load_faiss", "look_alike_pairs"]

KINDS = ("flat", "hnsw", "ivf", "ivfpq")
IVF_KINDS = ("ivf", "ivfpq")
TRAIN_SAMPLE = 65536  # rows used to train the ivf kinds' quantizers; more adds build time, not recall
IVF_MIN_TRAIN = 39  # training points per list below which faiss's k-means warns (and lists are poor)
IVF_MIN_LISTS = 16  # an ivf of fewer lists saves little over flat
TUNE_K = 10
TUNE_QUERIES = 1000  # held-out vectors --target-recall measures on (at most a tenth of the gallery)
EF_GRID = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048)
PLATEAU_STEPS, PLATEAU_GAIN = 3, 0.002
NPROBE_GRID = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 4096)


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
    target_recall: float | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise UserError(f"unknown index kind {self.kind!r}; choose one of {', '.join(KINDS)}")
        if self.target_recall is not None and not 0 < self.target_recall <= 1:  # NaN fails this too
            raise UserError(f"--target-recall must be a recall in (0, 1], such as 0.98 (got {self.target_recall})")
        if self.target_recall is not None and self.kind == "flat":
            raise UserError("--target-recall chooses an approximate kind's search setting; a flat index is exact: "
                            "use --kind hnsw or ivf with it, or leave it out")
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
        nlist = self.nlist or max(1, min(int(4 * math.sqrt(n)), min(n, TRAIN_SAMPLE) // IVF_MIN_TRAIN))
        if self.kind == "ivf":
            return {"nlist": nlist, "nprobe": min(self.nprobe, nlist)}
        pq_m = self.pq_m or max(m for m in range(1, max(1, dim // 8) + 1) if dim % m == 0)
        if dim % pq_m:
            raise UserError(f"--pq-m {pq_m} must divide the vector dimension {dim}")
        return {"nlist": nlist, "pq_m": pq_m, "nbits": self.nbits, "nprobe": min(self.nprobe, nlist)}


def normalise(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm, as contiguous float32 (all-zero rows stay zero)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.maximum(norms, 1e-12), dtype=np.float32)


def item_key(name: str, image: str | None) -> str:
    """What identifies a faiss index's item across runs: its image's real path (links and `..` resolved), else its name."""
    return os.path.realpath(image) if image else name


@dataclass
class SimilarityIndex(VectorIndex):
    """A faiss index with its item names, image paths and manifest (kind, params, dim, count, identity, ...;
    `retrieval.index_folder` adds the folder's own entries when it writes or reads one).
    The faiss backend of `retrieval.backend.VectorIndex`."""

    index: object  # a faiss.Index
    names: list[str]
    images: list[str | None]
    manifest: dict
    path: Path | None = None
    backend = "faiss"

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def unknown(self, items: Sequence[tuple[str, str | None]]) -> list[int]:
        """Positions of the `items` whose image (by real path), or name when it has none, is not indexed yet."""
        known = {item_key(n, im) for n, im in zip(self.names, self.images)}
        return [i for i, (n, im) in enumerate(items) if item_key(n, im) not in known]

    def add(self, vectors: np.ndarray, names: Sequence[str], images: Sequence[str | None],
            progress: bool = False) -> None:
        """Append L2-normalised `vectors` with their names and image paths (in memory; `index_folder.write` saves).

        An ivf index keeps the quantizers it was trained on; add mostly similar images, or rebuild.
        """
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise ValueError(f"expected (n, {self.dim}) vectors, got {vectors.shape}")
        _add_in_chunks(self.index, vectors, progress, "index add")
        self.names.extend(names)
        self.images.extend(images)
        self.manifest["count"] = len(self.names)

    def set_search(self, ef_search: int | None = None, nprobe: int | None = None) -> None:
        """Change the search-time settings (kept in the manifest when the index is written)."""
        faiss = _faiss()
        params = self.manifest["params"]
        if ef_search is not None and self.kind == "hnsw":
            if ef_search < 1:
                raise UserError(f"--ef-search must be at least 1 (got {ef_search})")
            params["ef_search"] = int(ef_search)
        if nprobe is not None and self.kind in IVF_KINDS:
            if nprobe < 1:
                raise UserError(f"--nprobe must be at least 1 (got {nprobe})")
            params["nprobe"] = min(int(nprobe), params["nlist"])
        if self.kind == "hnsw":
            faiss.downcast_index(self.index).hnsw.efSearch = params["ef_search"]
        elif self.kind in IVF_KINDS:
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
        if self.kind in IVF_KINDS:
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
    if params.kind == "ivf":
        index = faiss.IndexIVFFlat(quantizer, dim, resolved["nlist"], faiss.METRIC_INNER_PRODUCT)
    else:
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

    `identity` (the run's checkpoint sha256, backbone, PCA) goes into the manifest. With
    `params.target_recall`, the search setting is chosen (`tune`): the held-out sample is added
    last, so those items come after the others in `names`.
    """
    faiss = _faiss()
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, dim = vectors.shape
    if n == 0:
        raise UserError("the gallery has no readable image: nothing to index")
    if len(names) != n or len(images) != n:
        raise ValueError("names and images must have one entry per vector")
    resolved = params.resolved(n, dim)
    _check_size(params.kind, resolved, n)
    rng = np.random.default_rng(seed)
    index = _new_faiss_index(dim, params, resolved)
    if params.kind in IVF_KINDS:
        index.train(vectors if n <= TRAIN_SAMPLE else vectors[np.sort(rng.choice(n, TRAIN_SAMPLE, replace=False))])
    order = np.arange(n)
    if params.target_recall is not None:
        held = tune_queries(n, rng)
        order = np.concatenate([np.setdiff1d(order, held), held])
        _add_in_chunks(index, vectors[order[:n - len(held)]], progress, f"index ({params.kind})")
    else:
        _add_in_chunks(index, vectors, progress, f"index ({params.kind})")
    manifest = {"backend": "faiss", "kind": params.kind, "params": resolved, "dim": dim,
                "count": n, "metric": "inner_product", "normalised": True, "faiss_version": faiss.__version__,
                "identity": identity}
    ix = SimilarityIndex(index, [names[i] for i in order], [images[i] for i in order], manifest)
    if params.target_recall is not None:
        rest = vectors[order[:n - len(held)]]
        manifest["tuned"] = tune(ix, rest, vectors[held], params.target_recall)
        index.add(vectors[held])
    return ix


def _check_size(kind: str, resolved: dict, n: int) -> None:
    """A `UserError` naming the smallest gallery an ivf kind of these parameters can be trained on."""
    if kind == "ivf":
        need = IVF_MIN_TRAIN * max(resolved["nlist"], IVF_MIN_LISTS)
        if n < need or resolved["nlist"] < IVF_MIN_LISTS:
            raise UserError(f"an ivf index needs at least {need} vectors ({IVF_MIN_TRAIN} per list, at least "
                            f"{IVF_MIN_LISTS} lists; this gallery has {n}); use --kind flat (exact, and as fast at "
                            f"this size) or hnsw")
    if kind == "ivfpq":
        need = max(resolved["nlist"], 2 ** resolved["nbits"])
        if n < need:
            raise UserError(f"an ivfpq index of {n} vectors cannot train {resolved['nlist']} lists and "
                            f"{2 ** resolved['nbits']} codes per part; use --kind flat or hnsw, or lower --nlist / "
                            f"--nbits (at least {need} vectors needed)")


def tune_queries(n: int, rng: np.random.Generator) -> np.ndarray:
    """The sorted ids of the held-out sample `--target-recall` measures on: a tenth of `n`, at most `TUNE_QUERIES`."""
    m = min(TUNE_QUERIES, n // 10)
    if m < 1 or n - m < 1:
        raise UserError(f"--target-recall holds out a tenth of the gallery to measure recall on; this one has {n} "
                        f"image(s): give at least 10, or leave --target-recall out")
    return np.sort(rng.choice(n, m, replace=False))


def recall_at(ids: np.ndarray, truth: np.ndarray) -> float:
    """Mean share of each row of `truth` (n, k) found in the same row of `ids` (n, k): recall@k."""
    k = truth.shape[1]
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(ids.tolist(), truth.tolist())]))


def tune(ix: SimilarityIndex, indexed: np.ndarray, queries: np.ndarray, target: float) -> dict:
    """Set the smallest `ef_search` (hnsw) / `nprobe` (ivf kinds) whose recall@10 on `queries` reaches `target`.

    `indexed` are the vectors `ix` holds (in id order): exact search over them is the truth.
    Returns what goes in the manifest's `tuned`: param, value, recall, target, k, queries, reached.
    When no setting reaches it (or recall stops rising: `PLATEAU_STEPS` steps adding under
    `PLATEAU_GAIN`), the best tried is kept and `reached` is False.
    """
    faiss = _faiss()
    k = min(TUNE_K, len(indexed))
    exact = faiss.IndexFlatIP(indexed.shape[1])
    exact.add(indexed)
    truth = exact.search(queries, k)[1]
    if ix.kind == "hnsw":
        param, grid = "ef_search", EF_GRID
    else:
        nlist = ix.manifest["params"]["nlist"]
        param, grid = "nprobe", tuple(p for p in NPROBE_GRID if p < nlist) + (nlist,)
    tried: list[tuple[float, int]] = []
    for value in grid:
        ix.set_search(**{param: value})
        recall = recall_at(ix.search(queries, k)[1], truth)
        tried.append((recall, value))
        # reached; or a plateau (ivfpq's compressed scores cap its recall): more would only cost time
        if recall >= target or (len(tried) > PLATEAU_STEPS and recall - tried[-1 - PLATEAU_STEPS][0] < PLATEAU_GAIN):
            break
    recall, value = max(tried, key=lambda rv: (rv[0], -rv[1]))  # unreached: the best, at its smallest setting
    ix.set_search(**{param: value})
    return {"param": param, "value": value, "recall": recall, "target": target, "k": k, "queries": len(queries),
            "reached": recall >= target}


def add(ix: VectorIndex, vectors: np.ndarray, names: Sequence[str], images: Sequence[str | None],
        progress: bool = False) -> None:
    """`ix.add(...)`: add L2-normalised `vectors` with their names and image paths to any backend's index."""
    ix.add(vectors, names, images, progress=progress)


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
    want = {"flat": faiss.IndexFlat, "hnsw": faiss.IndexHNSW, "ivf": faiss.IndexIVFFlat, "ivfpq": faiss.IndexIVFPQ}[kind]
    if not isinstance(faiss.downcast_index(index), want) or index.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise UserError(f"{path} is not an inner-product {kind} index as its manifest says; rebuild the index")
    return index


def look_alike_pairs(ix: VectorIndex, threshold: float | None = None, top: int | None = None,
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
