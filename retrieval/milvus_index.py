"""The Milvus side of the similarity index: a run's adapted, L2-normalised gallery vectors in a Milvus collection.

The index folder keeps only its manifest (`retrieval.index_folder`): the backend, the server
URI, the collection, the token file's path (never the token), the kind, metric and dimension,
and the run's identity. The vectors, names and image paths live in the collection, so
`search --index`, `pairs --index`, `index add` and `serve --index` work on such a folder as on
a faiss one (`retrieval.backend.VectorIndex`).

The same code talks to Milvus Lite (`milvus-lite server --data-dir D --host 127.0.0.1 --port P`,
a small Python server, marked Beta) and to a Milvus standalone or distributed deployment: the
URI and a token file are all that differ. The tests run against Milvus Lite, so they prove the
client contract, not a cluster's behaviour.

The collection (one per index):

    key     VARCHAR(64), primary: sha256 of the image file's bytes (of "name:NAME" for an item
            with no image file), so an add is an upsert and adds each image once, however often
            it is rerun (after a kill) or run at once with another add
    name    VARCHAR: the item's name          image   VARCHAR, nullable: its image path
    vector  FLOAT_VECTOR(dim), metric IP, index HNSW (M, efConstruction) or FLAT

Its properties record this toolkit's format and a sha256 of the run's identity and dimension, so
a folder never opens a collection written by another run, another encoder or another tool.

Example:
    >>> target = MilvusTarget("http://127.0.0.1:19530", "photos")          # doctest: +SKIP
    >>> ix = create(target, IndexParams("hnsw"), dim=1024, identity=sim.identity())   # doctest: +SKIP
    >>> ix.add(vectors, names, images)                                      # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from toolkit.hashing import file_sha256
from toolkit.utils import UserError, first_line

from .backend import VectorIndex
from .index import IndexParams

__all__ = ["MILVUS_KINDS", "MilvusTarget", "MilvusIndex", "create", "open_index", "item_keys", "default_collection"]

MILVUS_KINDS = ("flat", "hnsw")
FORMAT_PROPERTY, IDENTITY_PROPERTY = "visual_similarity.format", "visual_similarity.identity_sha256"
FORMAT_VALUE = "visual-similarity-index"
TIMEOUT_S = 10.0  # per call: a server that does not answer is reported, not waited for
UPSERT_BATCH = 2048
LIST_BATCH = 8192
NAME_LEN = 4096
_AUTH_CODES = {3, 1400, 1401, 1402, 1800}  # permission denied / not authenticated, across Milvus versions


@dataclass(frozen=True)
class MilvusTarget:
    """Where a Milvus index lives: the server `uri` (http://HOST:PORT, https://..., tcp://...), the
    `collection` name, and a file holding the token (None: the server needs none)."""

    uri: str
    collection: str
    token_file: str | None = None

    def __post_init__(self):
        if not re.fullmatch(r"(https?|tcp)://[^\s/]+(:\d+)?/?", self.uri or ""):
            raise UserError(f"--uri {self.uri!r} is not a Milvus server address; give one like http://127.0.0.1:19530")
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,254}", self.collection or ""):
            raise UserError(f"--collection {self.collection!r}: a Milvus collection name is letters, digits and "
                            f"underscores, starting with a letter or underscore (at most 255)")

    def token(self) -> str:
        """The token read from `token_file` ('' without one); a `UserError` when it cannot be read or is empty."""
        if self.token_file is None:
            return ""
        path = Path(self.token_file)
        try:
            if not path.is_file():
                raise UserError(f"token file {path} does not exist (or is not a file); give --token-file FILE "
                                f"holding the Milvus token (USER:PASSWORD or an API key) on one line")
            token = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as err:
            raise UserError(f"cannot read token file {path} ({first_line(err)})") from None
        if not token or "\n" in token:
            raise UserError(f"token file {path} must hold the token on one line (it is "
                            f"{'empty' if not token else 'several lines'})")
        return token

    def manifest(self) -> dict:
        """The manifest's `milvus` entry (the token file as an absolute path, never the token)."""
        return {"uri": self.uri, "collection": self.collection,
                "token_file": None if self.token_file is None else os.path.abspath(self.token_file)}


def default_collection(index_dir: str | os.PathLike) -> str:
    """A collection name made from the index folder's name (`--collection` left out)."""
    name = re.sub(r"[^A-Za-z0-9_]", "_", Path(os.path.abspath(index_dir)).name) or "index"
    return ("vs_" + name)[:255]


def _pymilvus():
    try:
        import pymilvus
    except ImportError:
        raise UserError("the Milvus backend needs pymilvus: pip install 'adaptation-similarity[milvus]' "
                        "(or pip install pymilvus)") from None
    # pymilvus logs each failed call with a traceback before raising: the one line this toolkit prints is enough.
    logging.getLogger("pymilvus").setLevel(logging.CRITICAL)
    return pymilvus


def _identity_sha256(identity: dict, dim: int) -> str:
    return hashlib.sha256(json.dumps({"identity": identity, "dim": dim}, sort_keys=True).encode()).hexdigest()


@contextlib.contextmanager
def server_errors(target: MilvusTarget) -> Iterator[None]:
    """Turn a pymilvus failure inside the block into one `UserError` line: unreachable, bad token, or other."""
    MilvusException = _pymilvus().exceptions.MilvusException
    try:
        yield
    except MilvusException as err:
        code, message = getattr(err, "code", None), first_line(getattr(err, "message", "") or str(err))
        low = message.lower()
        if code in _AUTH_CODES or "auth" in low or "unauthenticated" in low or "permission" in low:
            where = f"the token in {target.token_file}" if target.token_file else "no token (give --token-file FILE)"
            raise UserError(f"the Milvus server at {target.uri} refused {where}: {message}") from None
        if code == 2 or "fail connecting" in low or "unavailable" in low or "deadline" in low:
            raise UserError(f"cannot reach a Milvus server at {target.uri} ({message}); start it, or check the URI") \
                from None
        raise UserError(f"the Milvus server at {target.uri} failed on collection {target.collection}: {message}") \
            from None


def connect(target: MilvusTarget):
    """A `pymilvus.MilvusClient` for `target`; a `UserError` when it cannot be reached or refuses the token."""
    pymilvus = _pymilvus()
    token = target.token()
    with server_errors(target):
        return pymilvus.MilvusClient(uri=target.uri, token=token, timeout=TIMEOUT_S)


def item_keys(names: Sequence[str], images: Sequence[str | None]) -> list[str]:
    """Each item's primary key: sha256 of its image file's bytes, or of "name:NAME" when it has no readable file."""
    keys = []
    for name, image in zip(names, images):
        try:
            keys.append(file_sha256(image) if image else None)
        except OSError:
            keys.append(None)
        if keys[-1] is None:
            keys[-1] = hashlib.sha256(f"name:{name}".encode()).hexdigest()
    return keys


class MilvusIndex(VectorIndex):
    """An index whose vectors live in a Milvus collection: the Milvus backend of `retrieval.backend.VectorIndex`.

    `names` / `images` are the collection's listing, read once on first use (and again after an
    add); `search` maps the keys it gets back to positions in that listing.
    """

    backend = "milvus"

    def __init__(self, client, target: MilvusTarget, manifest: dict, path: Path | None = None):
        self.client, self.target, self.manifest, self.path = client, target, manifest, path
        self._listing: tuple[list[str], list[str], list[str | None]] | None = None
        self._position: dict[str, int] = {}

    # -- the listing -------------------------------------------------------------------------------------------
    def _list(self) -> tuple[list[str], list[str], list[str | None]]:
        if self._listing is None:
            keys, names, images = [], [], []
            with server_errors(self.target):
                it = self.client.query_iterator(self.target.collection, batch_size=LIST_BATCH,
                                                output_fields=["key", "name", "image"], timeout=TIMEOUT_S)
                try:
                    while batch := it.next():
                        for row in batch:
                            keys.append(row["key"])
                            names.append(row["name"])
                            images.append(row.get("image"))
                finally:
                    it.close()
            self._listing = (keys, names, images)
            self._position = {k: i for i, k in enumerate(keys)}
        return self._listing

    @property
    def names(self) -> list[str]:
        return self._list()[1]

    @property
    def images(self) -> list[str | None]:
        return self._list()[2]

    def __len__(self) -> int:
        with server_errors(self.target):
            rows = self.client.query(self.target.collection, output_fields=["count(*)"], timeout=TIMEOUT_S)
        return int(rows[0]["count(*)"])

    # -- search ------------------------------------------------------------------------------------------------
    def set_search(self, ef_search: int | None = None, nprobe: int | None = None) -> None:
        if ef_search is not None and self.kind == "hnsw":
            if ef_search < 1:
                raise UserError(f"--ef-search must be at least 1 (got {ef_search})")
            self.manifest["params"]["ef_search"] = int(ef_search)

    def search(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        n = len(self)
        if not 1 <= k <= n:
            raise UserError(f"k={k} but the index has {n} item(s); use 1 <= k <= {n}")
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise ValueError(f"expected (n, {self.dim}) query vectors, got {vectors.shape}")
        params = {"metric_type": "IP"}
        if self.kind == "hnsw":
            params["params"] = {"ef": max(int(self.manifest["params"]["ef_search"]), k)}
        scores = np.full((len(vectors), k), -np.inf, np.float32)
        ids = np.full((len(vectors), k), -1, np.int64)
        with server_errors(self.target):
            for start in range(0, len(vectors), 256):
                res = self.client.search(self.target.collection, data=vectors[start:start + 256].tolist(), limit=k,
                                         anns_field="vector", search_params=params, output_fields=[],
                                         timeout=TIMEOUT_S)
                for row, hits in enumerate(res, start=start):
                    for j, hit in enumerate(hits[:k]):
                        scores[row, j], ids[row, j] = hit["distance"], self._position_of(hit["key"])
        return scores, ids

    def _position_of(self, key: str) -> int:
        self._list()
        if key not in self._position:  # added by another process since the listing was read
            self._listing = None
            self._list()
        return self._position.get(key, -1)

    def vectors(self) -> np.ndarray:
        keys = self._list()[0]
        out = np.zeros((len(keys), self.dim), np.float32)
        with server_errors(self.target):
            for start in range(0, len(keys), LIST_BATCH):
                rows = self.client.get(self.target.collection, ids=keys[start:start + LIST_BATCH],
                                       output_fields=["key", "vector"], timeout=TIMEOUT_S)
                for row in rows:
                    out[self._position[row["key"]]] = row["vector"]
        return out

    # -- adds --------------------------------------------------------------------------------------------------
    def unknown(self, items: Sequence[tuple[str, str | None]]) -> list[int]:
        """Positions of the `items` whose content (image bytes) the collection does not hold yet."""
        keys = item_keys([n for n, _ in items], [im for _, im in items])
        held: set[str] = set()
        with server_errors(self.target):
            for start in range(0, len(keys), LIST_BATCH):
                rows = self.client.get(self.target.collection, ids=keys[start:start + LIST_BATCH],
                                       output_fields=["key"], timeout=TIMEOUT_S)
                held.update(r["key"] for r in rows)
        return [i for i, key in enumerate(keys) if key not in held]

    def add(self, vectors: np.ndarray, names: Sequence[str], images: Sequence[str | None],
            progress: bool = False) -> None:
        """Upsert the items into the collection, keyed by content: an image already there is replaced, not doubled."""
        from tqdm.auto import tqdm

        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise ValueError(f"expected (n, {self.dim}) vectors, got {vectors.shape}")
        rows = {}
        for key, name, image, v in zip(item_keys(names, images), names, images, vectors):
            rows.setdefault(key, {"key": key, "name": name[:NAME_LEN], "image": image, "vector": v.tolist()})
        rows = list(rows.values())
        with server_errors(self.target):
            for start in tqdm(range(0, len(rows), UPSERT_BATCH), desc="milvus upsert", unit="batch", leave=False,
                              disable=not progress or len(rows) <= UPSERT_BATCH):
                self.client.upsert(self.target.collection, rows[start:start + UPSERT_BATCH], timeout=TIMEOUT_S)
            self.client.flush(self.target.collection, timeout=TIMEOUT_S)  # sealed: indexed, and durable on return
        self._listing = None


def _schema(pymilvus, dim: int):
    schema = pymilvus.MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False,
                                                 description="adapted image vectors (visual similarity index)")
    schema.add_field("key", pymilvus.DataType.VARCHAR, is_primary=True, max_length=64)
    schema.add_field("name", pymilvus.DataType.VARCHAR, max_length=NAME_LEN)
    schema.add_field("image", pymilvus.DataType.VARCHAR, max_length=NAME_LEN, nullable=True)
    schema.add_field("vector", pymilvus.DataType.FLOAT_VECTOR, dim=dim)
    return schema


def _check_collection(client, target: MilvusTarget, dim: int, identity_sha: str, fix: str) -> None:
    """A `UserError` unless the collection is this toolkit's, for this run's identity and `dim`."""
    with server_errors(target):
        desc = client.describe_collection(target.collection, timeout=TIMEOUT_S)
    props = desc.get("properties") or {}
    where = f"collection {target.collection} at {target.uri}"
    if props.get(FORMAT_PROPERTY) != FORMAT_VALUE:
        raise UserError(f"{where} was not made by this toolkit; it is left alone: {fix}")
    dims = [f.get("params", {}).get("dim") for f in desc.get("fields", []) if f.get("name") == "vector"]
    if not dims or int(dims[0]) != dim:
        raise UserError(f"{where} holds {dims[0] if dims else 'no'}-d vectors, not {dim}-d ones: {fix}")
    if props.get(IDENTITY_PROPERTY) != identity_sha:
        raise UserError(f"{where} was built with another run or encoder: {fix}")


def create(target: MilvusTarget, params: IndexParams, dim: int, identity: dict, overwrite: bool = False,
           client=None) -> tuple[MilvusIndex, bool]:
    """The collection for a new index of `dim`-d vectors built with `identity`; returns (index, resumed).

    An existing collection of this toolkit for the same identity and dimension is kept and added to
    (`resumed`: a rerun after a kill adds nothing twice); with `overwrite` it is dropped and made
    afresh. A collection of anything else is refused, even with `overwrite`.
    """
    if params.kind not in MILVUS_KINDS:
        raise UserError(f"--backend milvus builds --kind {' or '.join(MILVUS_KINDS)} (got {params.kind})")
    pymilvus = _pymilvus()
    client = client or connect(target)
    sha = _identity_sha256(identity, dim)
    resolved = params.resolved(1, dim)
    resolved = {k: resolved[k] for k in ("hnsw_m", "ef_construction", "ef_search") if k in resolved}
    manifest = {"backend": "milvus", "kind": params.kind, "params": resolved, "dim": dim, "metric": "inner_product",
                "normalised": True, "identity": identity, "milvus": target.manifest(),
                "pymilvus_version": pymilvus.__version__}
    with server_errors(target):
        exists = client.has_collection(target.collection, timeout=TIMEOUT_S)
    if exists:
        _check_collection(client, target, dim, sha, "choose another --collection")
        if not overwrite:
            return MilvusIndex(client, target, manifest), True
        with server_errors(target):
            client.drop_collection(target.collection, timeout=TIMEOUT_S)
    index_params = client.prepare_index_params()
    if params.kind == "hnsw":
        index_params.add_index(field_name="vector", index_type="HNSW", metric_type="IP",
                               params={"M": resolved["hnsw_m"], "efConstruction": resolved["ef_construction"]})
    else:
        index_params.add_index(field_name="vector", index_type="FLAT", metric_type="IP")
    with server_errors(target):
        client.create_collection(target.collection, schema=_schema(pymilvus, dim), index_params=index_params,
                                 properties={FORMAT_PROPERTY: FORMAT_VALUE, IDENTITY_PROPERTY: sha},
                                 timeout=TIMEOUT_S)
    return MilvusIndex(client, target, manifest), False


def drop(ix: MilvusIndex) -> None:
    """Drop the collection of `ix` (a build that failed after making it leaves nothing behind)."""
    with contextlib.suppress(UserError), server_errors(ix.target):  # best effort: the first error is the one to show
        ix.client.drop_collection(ix.target.collection, timeout=TIMEOUT_S)


def open_index(manifest: dict, path: Path) -> MilvusIndex:
    """The index a Milvus index folder's (validated) `manifest` points at; a `UserError` when the server
    cannot be reached, refuses the token, or the collection is missing or another run's."""
    m = manifest["milvus"]
    target = MilvusTarget(m["uri"], m["collection"], m.get("token_file"))
    client = connect(target)
    fix = f"rebuild the index: similarity.py --run RUN index build GALLERY -o {path} --backend milvus --overwrite"
    with server_errors(target):
        exists = client.has_collection(target.collection, timeout=TIMEOUT_S)
    if not exists:
        raise UserError(f"collection {target.collection} does not exist at {target.uri} (dropped, or another "
                        f"server?): {fix}")
    _check_collection(client, target, int(manifest["dim"]), _identity_sha256(manifest["identity"],
                                                                              int(manifest["dim"])), fix)
    return MilvusIndex(client, target, manifest, path)
