"""A persistent similarity index: a run's adapted, L2-normalised gallery vectors in faiss.

This module owns the index folder format; it writes, reads and validates it:

    INDEX_DIR/
      index.faiss     the faiss index (faiss.write_index), ids 0..count-1 in `names.json` order
      names.json      [{"name": ..., "image": path or null}, ...]
      manifest.json   format, version, kind, parameters, count, dim, and the run's identity:
                      checkpoint sha256, backbone (model, weights, taps, precision) and PCA

Vectors are adapted then L2-normalised, so the inner product the index ranks by is the
adapted cosine that `VisualSimilarity.score` returns. Kinds:

- `flat`: `faiss.IndexFlatIP`, exact.
- `hnsw`: `faiss.IndexHNSWFlat` (inner product); `hnsw_m`, `ef_construction`, `ef_search`.
- `ivfpq`: `faiss.IndexIVFPQ` over an `IndexFlatIP` coarse quantizer; `nlist`, `pq_m`, `nbits`,
  `nprobe`. Vectors are stored compressed, so its scores are approximate too.

A folder is written whole into a hidden temporary sibling and renamed into place, under a
lock file, so an interrupted or concurrent build never leaves a half-written index.
`EncodeCache` keeps encoded chunks of a gallery in `INDEX_DIR.partial/` so an interrupted
build resumes where it stopped.

Example:
    >>> import numpy as np
    >>> x = normalise(np.random.default_rng(0).normal(size=(100, 16)))
    >>> ix = build(x, [f"v{i}" for i in range(100)], [None] * 100, IndexParams("flat"), identity={})
    >>> scores, ids = ix.search(x[:2], 3)
    >>> ids[:, 0].tolist()
    [0, 1]
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from toolkit.lock import lock_holder
from toolkit.utils import UserError, _umask, file_sha256, first_line, read_json

__all__ = ["FORMAT", "VERSION", "KINDS", "IndexParams", "SimilarityIndex", "normalise", "build", "write", "read",
           "read_manifest", "check_identity", "locked", "EncodeCache", "look_alike_pairs"]

FORMAT = "visual-similarity-index"
VERSION = 1
KINDS = ("flat", "hnsw", "ivfpq")
INDEX_FILE, NAMES_FILE, MANIFEST_FILE = "index.faiss", "names.json", "manifest.json"
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
    """A faiss index with its item names, image paths and manifest (see the module docstring)."""

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
    manifest = {"format": FORMAT, "version": VERSION, "kind": params.kind, "params": resolved, "dim": dim,
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


@contextlib.contextmanager
def locked(index_dir: str | os.PathLike) -> Iterator[None]:
    """Hold the writer's lock of `index_dir`; a second writer is refused, naming the process that holds it.

    The lock is on a hidden sibling file, not on the folder as `toolkit.lock.folder_lock` does:
    an index folder is replaced whole by a rename, and a lock on the old folder would not guard
    the new one.
    """
    target = Path(index_dir)
    lock_file = target.parent / f".{target.name}.lock"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fh = open(lock_file, "a")
    except OSError as err:
        raise UserError(f"cannot write next to {target} ({first_line(err)}); choose a writable folder") from None
    with fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = lock_holder(lock_file)
            who = f"process {pid}" if pid else "another process"
            raise UserError(f"{target} is being written by {who}; wait for it to finish") from None
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _fsync(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def write(ix: SimilarityIndex, index_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write `ix` to `index_dir` whole, or not at all. An existing folder needs `overwrite`.

    Call under `locked(index_dir)` when other processes may write the same folder.
    """
    faiss = _faiss()
    target = Path(index_dir)
    if target.exists() and not overwrite:
        raise UserError(f"{target} already exists; pass --overwrite or choose another folder")
    if target.exists() and not (target / MANIFEST_FILE).is_file():
        raise UserError(f"{target} exists and is not an index folder; it is left alone: choose another folder")
    if len(ix.names) != len(ix) or len(ix.images) != len(ix):
        raise ValueError("the index, its names and its images differ in length")
    ix.manifest["count"] = len(ix)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    except OSError as err:
        raise UserError(f"cannot write {target} ({first_line(err)}); choose a writable folder") from None
    old = None
    try:
        faiss.write_index(ix.index, str(tmp / INDEX_FILE))
        entries = [{"name": n, "image": im} for n, im in zip(ix.names, ix.images)]
        (tmp / NAMES_FILE).write_text(json.dumps(entries) + "\n")
        manifest = dict(ix.manifest, files={INDEX_FILE: file_sha256(tmp / INDEX_FILE), NAMES_FILE: file_sha256(tmp / NAMES_FILE)})
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        for f in (INDEX_FILE, NAMES_FILE, MANIFEST_FILE):
            _fsync(tmp / f)
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's 0700 would make the index private by accident
        if target.exists():
            old = target.parent / f".{target.name}.old.{os.getpid()}"
            os.replace(target, old)
        os.replace(tmp, target)
    except (OSError, RuntimeError) as err:  # RuntimeError: faiss's own I/O errors (disk full, ...)
        if old is not None and not target.exists():
            os.replace(old, target)
            old = None
        raise UserError(f"cannot write {target} ({first_line(err)}); nothing was changed") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    ix.manifest, ix.path = manifest, target
    return target


def read(index_dir: str | os.PathLike) -> SimilarityIndex:
    """Read and validate an index folder written by `write`; a `UserError` says what is wrong."""
    faiss = _faiss()
    path = Path(index_dir)
    manifest = read_manifest(path)
    for f in (INDEX_FILE, NAMES_FILE):
        if not (path / f).is_file():
            raise UserError(f"{path} lacks {f}; rebuild the index")
        if manifest["files"].get(f) != file_sha256(path / f):
            raise UserError(f"{path / f} is damaged (its sha256 differs from the manifest's); rebuild the index")
    try:
        index = faiss.read_index(str(path / INDEX_FILE))
    except RuntimeError as err:
        raise UserError(f"cannot read {path / INDEX_FILE} ({first_line(err)}); rebuild the index") from None
    entries = read_json(path / NAMES_FILE)
    count = manifest["count"]
    if index.ntotal != count or not isinstance(entries, list) or len(entries) != count or index.d != manifest["dim"]:
        raise UserError(f"{path} is inconsistent (index, names and manifest disagree on count or dim); rebuild it")
    if not all(isinstance(e, dict) and isinstance(e.get("name"), str) and isinstance(e.get("image", 0), (str, type(None)))
               for e in entries):
        raise UserError(f"{path / NAMES_FILE} is damaged (each entry must be {{\"name\": text, \"image\": path or "
                        f"null}}); rebuild the index")
    want = {"flat": faiss.IndexFlat, "hnsw": faiss.IndexHNSW, "ivfpq": faiss.IndexIVFPQ}[manifest["kind"]]
    if not isinstance(faiss.downcast_index(index), want) or index.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise UserError(f"{path / INDEX_FILE} is not an inner-product {manifest['kind']} index as its manifest says; "
                        f"rebuild the index")
    ix = SimilarityIndex(index, [e["name"] for e in entries], [e["image"] for e in entries], manifest, path)
    ix.set_search()
    return ix


def read_manifest(index_dir: str | os.PathLike) -> dict:
    """The validated manifest of an index folder (the cheap part of `read`); a `UserError` says what is wrong."""
    path = Path(index_dir)
    if not (path / MANIFEST_FILE).is_file():
        raise UserError(f"{path} is not an index folder (no {MANIFEST_FILE}); build one with: similarity.py --run RUN "
                        f"index build GALLERY -o {path}")
    manifest = read_json(path / MANIFEST_FILE)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise UserError(f"{path / MANIFEST_FILE} is not a similarity index manifest")
    if manifest.get("version") != VERSION:
        raise UserError(f"{path} is index format version {manifest.get('version')}; this toolkit reads version "
                        f"{VERSION}: rebuild the index")
    _check_manifest(path, manifest)
    return manifest


def _count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _check_manifest(path: Path, manifest: dict) -> None:
    """A `UserError` naming the first manifest entry of the wrong type (a hand-edited or damaged file)."""
    kind, params = manifest.get("kind"), manifest.get("params")
    need = {"flat": (), "hnsw": ("hnsw_m", "ef_construction", "ef_search"),
            "ivfpq": ("nlist", "pq_m", "nbits", "nprobe")}.get(kind)
    problems = [
        ("kind", need is not None, f"one of {', '.join(KINDS)}"),
        ("dim", _count(manifest.get("dim")) and manifest.get("dim", 0) > 0, "a positive integer"),
        ("count", _count(manifest.get("count")), "a count"),
        ("files", isinstance(manifest.get("files"), dict), f"a dict of sha256 sums of {INDEX_FILE} and {NAMES_FILE}"),
        ("identity", isinstance(manifest.get("identity"), dict), "a dict"),
        ("params", isinstance(params, dict) and all(_count(params.get(k)) and params[k] > 0 for k in need or ()),
         f"a dict of positive integers {', '.join(need or ())}".rstrip()),
    ]
    for key, ok, what in problems:
        if not ok:
            raise UserError(f"{path / MANIFEST_FILE} is damaged: {key} is {manifest.get(key)!r}, expected {what}; "
                            f"rebuild the index")


def check_identity(ix: SimilarityIndex, identity: dict) -> None:
    """Refuse, with one line, an index built with another run, backbone or PCA than `identity`."""
    theirs = ix.manifest.get("identity", {})
    for key, what in (("checkpoint_sha256", "another run (checkpoint sha256 differs)"),
                      ("backbone", "another backbone"), ("pca", "another PCA"), ("out_dim", "another model"),
                      # an ONNX export's vectors (adaptation.deploy) agree with the run's only to its check's figure
                      ("encoder", "another encoder (an ONNX export and the run's torch path differ)")):
        if theirs.get(key) != identity.get(key):
            raise UserError(f"{ix.path} was built with {what}; rebuild it with this run: "
                            f"similarity.py --run RUN index build GALLERY -o {ix.path} --overwrite")


class EncodeCache:
    """Encoded chunks of a gallery kept in `INDEX_DIR.partial/`, so an interrupted build resumes.

    `key` identifies the work (the run's identity and the item list); a cache left by other work
    is discarded. Each chunk is one pickle-free `.npz` written atomically.
    """

    def __init__(self, index_dir: str | os.PathLike, key: dict):
        target = Path(index_dir)
        self.dir = target.parent / f"{target.name}.partial"
        self.key = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
        key_file = self.dir / "key.txt"
        try:
            if self.dir.exists() and (not key_file.is_file() or key_file.read_text().strip() != self.key):
                shutil.rmtree(self.dir)
            self.dir.mkdir(parents=True, exist_ok=True)
            key_file.write_text(self.key + "\n")
        except OSError as err:
            raise UserError(f"cannot write {self.dir} ({first_line(err)}); choose a writable folder") from None

    def _chunk(self, i: int) -> Path:
        return self.dir / f"chunk{i:07d}.npz"

    def load(self, i: int) -> tuple[np.ndarray, list[str], list[str | None], dict[str, str]] | None:
        """Chunk i as (vectors, names, images, skipped), or None when not (readably) there."""
        try:
            with np.load(self._chunk(i), allow_pickle=False) as z:
                images = [None if s == "" else str(s) for s in z["images"]]
                skipped = dict(zip(map(str, z["skipped_names"]), map(str, z["skipped_reasons"])))
                return z["vectors"].astype(np.float32), [str(s) for s in z["names"]], images, skipped
        except (OSError, ValueError, KeyError, EOFError):
            return None

    def save(self, i: int, vectors: np.ndarray, names: list[str], images: list[str | None],
             skipped: dict[str, str]) -> None:
        from toolkit.utils import atomic_path

        with atomic_path(self._chunk(i), suffix=".npz") as tmp:
            np.savez(tmp, vectors=np.asarray(vectors, dtype=np.float32), names=np.asarray(names, dtype=str),
                     images=np.asarray([im or "" for im in images], dtype=str),
                     skipped_names=np.asarray(list(skipped), dtype=str),
                     skipped_reasons=np.asarray(list(skipped.values()), dtype=str))

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


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
