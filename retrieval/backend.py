"""The one interface every similarity index backend implements, so that callers never ask where the vectors live.

Two backends implement `VectorIndex`:

- `retrieval.index.SimilarityIndex` (`backend == "faiss"`): the vectors are a faiss index kept in
  the index folder and searched in this process.
- `retrieval.milvus_index.MilvusIndex` (`backend == "milvus"`): the vectors live in a Milvus
  collection (Milvus Lite here, a Milvus cluster there); the folder keeps only the manifest.

`retrieval.index_folder.read` opens either from its folder; `VisualSimilarity.search`,
`look_alike_pairs`, `index add` and a search service take a `VectorIndex` and work the same
on both. All vectors are adapted and L2-normalised, and the score is their inner product (the
adapted cosine).

Example:
    >>> from retrieval import index_folder
    >>> ix = index_folder.read("photos_index")                   # doctest: +SKIP
    >>> scores, ids = ix.search(query_rows, k=5)                 # doctest: +SKIP
    >>> [ix.names[i] for i in ids[0] if i >= 0]                  # doctest: +SKIP
"""

from __future__ import annotations

import abc
from pathlib import Path
from typing import Sequence

import numpy as np

__all__ = ["VectorIndex"]


class VectorIndex(abc.ABC):
    """A gallery's adapted, L2-normalised vectors with each item's name and image path.

    Attributes every backend has: `manifest` (a dict: `kind`, `params`, `dim`, `identity`,
    `backend`, ...), `path` (the index folder, or None before it is written), `names` (item
    names: `names[i]` is the item of id `i` that `search` returns) and `images` (their image
    paths, None where not known, in `names` order).
    """

    manifest: dict
    path: Path | None
    names: list[str]
    images: list[str | None]

    backend: str = ""
    """Where the vectors live: "faiss" or "milvus"."""

    @abc.abstractmethod
    def __len__(self) -> int:
        """How many items the index holds now."""


    @property
    def kind(self) -> str:
        """The index kind (`flat`, `hnsw`, ...), as in the manifest."""
        return self.manifest["kind"]

    @property
    def dim(self) -> int:
        """The vector dimension."""
        return int(self.manifest["dim"])

    @abc.abstractmethod
    def search(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids), each (n, k), best first, for L2-normalised query rows (n, dim).

        `ids` index `names` / `images`; -1 pads a row with fewer than k hits.
        Raises `toolkit.utils.UserError` for a `k` outside 1..len(self).
        """

    @abc.abstractmethod
    def vectors(self) -> np.ndarray:
        """All stored vectors, (len(self), dim), in `names` order."""

    @abc.abstractmethod
    def set_search(self, ef_search: int | None = None, nprobe: int | None = None) -> None:
        """Change the search-time settings where the kind has them (others are ignored)."""

    @abc.abstractmethod
    def unknown(self, items: Sequence[tuple[str, str | None]]) -> list[int]:
        """Positions in `items` ((name, image path) pairs) of those the index does not hold yet."""

    @abc.abstractmethod
    def add(self, vectors: np.ndarray, names: Sequence[str], images: Sequence[str | None],
            progress: bool = False) -> None:
        """Add L2-normalised `vectors` with their names and image paths.

        faiss: in memory (`retrieval.index_folder.write` saves); Milvus: in the collection at once.
        """
