"""The index folder: the format a similarity index is kept in; this module writes, reads and validates it.

A faiss index (`"backend": "faiss"`, or no backend: folders written before Milvus):

    INDEX_DIR/
      index.faiss     the faiss index (`retrieval.index.save_faiss`), ids 0..count-1 in `names.json` order
      names.json      [{"name": ..., "image": path or null}, ...]
      manifest.json   format, version, backend, kind, parameters, count, dim, metric, sha256 of the two
                      files above, and the run's identity: checkpoint sha256, backbone (model, weights,
                      taps, precision), PCA

A Milvus index (`"backend": "milvus"`, `retrieval.milvus_index`) keeps only `manifest.json`: the
same entries less `count` and `files`, plus `milvus`: the server URI, the collection and the token
file's path (never the token). Its vectors, names and images live in the collection.
`read` opens either as a `retrieval.backend.VectorIndex`.

The folder is the index's own: it holds these three files and nothing else. A folder holding
anything else, or another format's folder (an extraction, a run), is refused even with
`--overwrite`, listing what it holds (`toolkit.folders`). A folder is written whole into a
hidden temporary sibling of its real (link-resolved) path and swapped into place, under a lock
(`toolkit.lock.sibling_lock`), so an interrupted or concurrent build never leaves a half-written
index, a symlinked index stays a symlink, and nothing is left beside it.

Example:
    >>> ix = read("photos_index")          # doctest: +SKIP
    >>> check_identity(ix, sim.identity())  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Iterator

from toolkit.hashing import file_sha256
from toolkit.folders import FolderFormat, by_manifest, check_folder, replacing_folder
from toolkit.lock import sibling_lock
from toolkit.utils import UserError, first_line, read_json

from .backend import VectorIndex
from .index import KINDS, SimilarityIndex, load_faiss, save_faiss

__all__ = ["FORMAT", "VERSION", "INDEX_FILE", "NAMES_FILE", "MANIFEST_FILE", "INDEX_FOLDER", "check_target", "write",
           "read", "read_manifest", "check_identity", "locked"]

FORMAT = "visual-similarity-index"
VERSION = 1
INDEX_FILE, NAMES_FILE, MANIFEST_FILE = "index.faiss", "names.json", "manifest.json"


@contextlib.contextmanager
def locked(index_dir: str | os.PathLike, flag: str = "index folder") -> Iterator[Path]:
    """Hold the writer's lock of `index_dir` (see `toolkit.lock.sibling_lock`); yields the real folder."""
    with sibling_lock(index_dir, flag) as real:
        yield real


INDEX_FOLDER = FolderFormat("an index folder", (INDEX_FILE, NAMES_FILE, MANIFEST_FILE),
                            by_manifest(MANIFEST_FILE, FORMAT))
"""The index folder as `toolkit.folders` sees it: the three files it owns, and how one is told."""


def check_target(index_dir: str | os.PathLike, overwrite: bool, flag: str = "-o", existing: bool = False) -> Path:
    """The real folder an index may be written to (`toolkit.folders.check_folder`); a `UserError` otherwise.

    With `existing`, it must be an index folder already (one to add to), holding nothing else.
    """
    if existing:
        read_manifest(index_dir)  # says how to build one when it is not
    return check_folder(index_dir, INDEX_FOLDER, overwrite=overwrite or existing, flag=flag, must_exist=existing)


def write(ix: VectorIndex, index_dir: str | os.PathLike, overwrite: bool = False, flag: str = "-o") -> Path:
    """Write `ix` to `index_dir` whole, or not at all; returns `index_dir`.

    A missing or empty folder is written; an existing index needs `overwrite`; any other folder is
    refused (`check_target`). A symlinked index stays a symlink: its target is replaced.
    A Milvus index writes its manifest only (its vectors are in the collection already).
    Call under `locked(index_dir)` when other processes may write the same folder.
    """
    target = Path(index_dir)
    real = check_target(target, overwrite, flag)
    faiss = ix.backend == "faiss"
    if faiss and (len(ix.names) != len(ix) or len(ix.images) != len(ix)):
        raise ValueError("the index, its names and its images differ in length")
    if faiss:
        ix.manifest["count"] = len(ix)
    try:
        with replacing_folder(real, INDEX_FOLDER, flag) as tmp:
            files = {}
            if faiss:
                save_faiss(ix, tmp / INDEX_FILE)
                entries = [{"name": n, "image": im} for n, im in zip(ix.names, ix.images)]
                (tmp / NAMES_FILE).write_text(json.dumps(entries) + "\n")
                files = {f: file_sha256(tmp / f) for f in (INDEX_FILE, NAMES_FILE)}
            manifest = dict(ix.manifest, format=FORMAT, version=VERSION, files=files)
            (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    except (OSError, RuntimeError) as err:  # RuntimeError: faiss's own I/O errors (disk full, ...)
        raise UserError(f"cannot write {target} ({first_line(err)}); nothing was changed: free some space or "
                        f"choose a writable folder") from None
    ix.manifest, ix.path = manifest, target
    return target


def read(index_dir: str | os.PathLike) -> VectorIndex:
    """Read and validate an index folder written by `write`; a `UserError` says what is wrong.

    A Milvus index is opened on its server (`retrieval.milvus_index.open_index`): a server that
    cannot be reached, a refused token, a missing or mismatched collection are each a `UserError`.
    """
    path = Path(index_dir)
    manifest = read_manifest(path)
    if manifest.get("backend") == "milvus":
        from .milvus_index import open_index

        ix = open_index(manifest, path)
        ix.set_search()
        return ix
    for f in (INDEX_FILE, NAMES_FILE):
        if not (path / f).is_file():
            raise UserError(f"{path} lacks {f}; rebuild the index")
        if manifest["files"].get(f) != file_sha256(path / f):
            raise UserError(f"{path / f} is damaged (its sha256 differs from the manifest's); rebuild the index")
    index = load_faiss(path / INDEX_FILE, manifest["kind"])
    entries = read_json(path / NAMES_FILE)
    count = manifest["count"]
    if index.ntotal != count or not isinstance(entries, list) or len(entries) != count or index.d != manifest["dim"]:
        raise UserError(f"{path} is inconsistent (index, names and manifest disagree on count or dim); rebuild it")
    if not all(isinstance(e, dict) and isinstance(e.get("name"), str) and isinstance(e.get("image", 0), (str, type(None)))
               for e in entries):
        raise UserError(f"{path / NAMES_FILE} is damaged (each entry must be {{\"name\": text, \"image\": path or "
                        f"null}}); rebuild the index")
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
    kind, params, backend = manifest.get("kind"), manifest.get("params"), manifest.get("backend", "faiss")
    need = {"flat": (), "hnsw": ("hnsw_m", "ef_construction", "ef_search"), "ivf": ("nlist", "nprobe"),
            "ivfpq": ("nlist", "pq_m", "nbits", "nprobe")}.get(kind)
    milvus = manifest.get("milvus")
    problems = [
        ("backend", backend in ("faiss", "milvus"), "faiss or milvus"),
        ("kind", need is not None, f"one of {', '.join(KINDS)}"),
        ("dim", _count(manifest.get("dim")) and manifest.get("dim", 0) > 0, "a positive integer"),
        ("identity", isinstance(manifest.get("identity"), dict), "a dict"),
        ("params", isinstance(params, dict) and all(_count(params.get(k)) and params[k] > 0 for k in need or ()),
         f"a dict of positive integers {', '.join(need or ())}".rstrip()),
    ] + ([
        ("count", _count(manifest.get("count")), "a count"),
        ("files", isinstance(manifest.get("files"), dict), f"a dict of sha256 sums of {INDEX_FILE} and {NAMES_FILE}"),
    ] if backend == "faiss" else [
        ("milvus", isinstance(milvus, dict) and isinstance(milvus.get("uri"), str)
         and isinstance(milvus.get("collection"), str) and isinstance(milvus.get("token_file"), (str, type(None))),
         "a dict of uri, collection and token_file"),
    ])
    for key, ok, what in problems:
        if not ok:
            raise UserError(f"{path / MANIFEST_FILE} is damaged: {key} is {manifest.get(key)!r}, expected {what}; "
                            f"rebuild the index")


def check_identity(ix: VectorIndex, identity: dict) -> None:
    """Refuse, with one line, an index built with another run, backbone or PCA than `identity`."""
    theirs = ix.manifest.get("identity", {})
    for key, what in (("checkpoint_sha256", "another run (checkpoint sha256 differs)"),
                      ("backbone", "another backbone"), ("pca", "another PCA"), ("out_dim", "another model"),
                      # an ONNX export's vectors (retrieval.deploy) agree with the run's only to its check's figure
                      ("encoder", "another encoder (an ONNX export and the run's torch path differ)")):
        if theirs.get(key) != identity.get(key):
            raise UserError(f"{ix.path} was built with {what}; rebuild it with this run: "
                            f"similarity.py --run RUN index build GALLERY -o {ix.path} --overwrite")


