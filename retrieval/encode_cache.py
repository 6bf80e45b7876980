"""Encoded chunks of a gallery kept beside an index folder while it is built, so an interrupted build resumes.

    INDEX_DIR.partial/
      .made-by.json      the marker that says this command made the folder (`toolkit.folders.claim_scratch`)
      key.txt            sha256 of the work (the run's identity and the item list)
      chunk0000000.npz   vectors, names, images and skipped items of one chunk (no pickles)

A folder at that name that the command did not make (a user's `photos.partial/`) is never used or
removed: the build stops, naming it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from toolkit.folders import claim_scratch, discard_scratch, scratch_format
from toolkit.utils import UserError, atomic_path, first_line

__all__ = ["EncodeCache", "CACHE_FOLDER"]

CACHE_FOLDER = scratch_format("the resumable encoding of an index build", "retrieval.encode_cache",
                              ("key.txt", "chunk[0-9]*.npz", ".chunk[0-9]*"))
"""The cache folder as `toolkit.folders` sees it: its names (with atomic writes' temporary ones) and its marker."""


class EncodeCache:
    """Encoded chunks of a gallery kept in `INDEX_DIR.partial/`, so an interrupted build resumes.

    `key` identifies the work (the run's identity and the item list); the chunks of a cache this
    command left for other work are discarded. Each chunk is one pickle-free `.npz` written atomically.
    `flag` and `shown` name the output in the message that refuses a folder of that name which is
    not this command's.
    """

    def __init__(self, index_dir: str | os.PathLike, key: dict, flag: str = "-o", shown: str | None = None):
        target = Path(index_dir)
        self.dir = target.parent / f"{target.name}.partial"
        self.key = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
        key_file = self.dir / "key.txt"
        try:
            self.dir.parent.mkdir(parents=True, exist_ok=True)
            claim_scratch(self.dir, CACHE_FOLDER, owner="retrieval.encode_cache", flag=flag, shown=shown or str(target))
            if not key_file.is_file() or key_file.read_text().strip() != self.key:
                for chunk in self.dir.glob("chunk*.npz"):  # this command's, for other work
                    chunk.unlink()
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
        with atomic_path(self._chunk(i), suffix=".npz") as tmp:
            np.savez(tmp, vectors=np.asarray(vectors, dtype=np.float32), names=np.asarray(names, dtype=str),
                     images=np.asarray([im or "" for im in images], dtype=str),
                     skipped_names=np.asarray(list(skipped), dtype=str),
                     skipped_reasons=np.asarray(list(skipped.values()), dtype=str))

    def remove(self) -> None:
        """Remove the cache folder (this command's own: its marker, nothing but its names)."""
        discard_scratch(self.dir, CACHE_FOLDER)
