"""The resumable chunk store of an extraction (`MODEL/.partial/`).

While extraction runs, finished batches go to `MODEL/.partial/` as chunk files, so an
interrupted run resumes where it stopped. The final features files are written by
`featuresExtractor.pairs_file`. The folder is a `toolkit.folders` scratch folder (`PARTIAL_FOLDER`):
made with a marker, resumed and removed only when the marker is extract.py's.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np

from toolkit.folders import claim_scratch, describe_entries, discard_scratch, is_own_scratch, scratch_format
from toolkit.utils import UserError, atomic_path, first_line, read_json, write_json

__all__ = ["ChunkStore", "StoredRows", "PARTIAL_FOLDER"]

_OWNER = "featuresExtractor.store"
PARTIAL_FOLDER = scratch_format("an extraction's resumable work", _OWNER,
                                ("config.json", ".config.json.*", "chunk_*.npz", ".chunk_*", "raw", "staged"))
"""The chunk store as `toolkit.folders` sees it: its names (atomic writes' temporary ones too) and its marker."""


class ChunkStore:
    """Finished batches of an extraction, kept until the final files are written.

    Each chunk is one atomically written `.npz` holding the item indices it covers,
    the skipped items with their reasons, and one pooled array per tap. `config.json`
    records which configuration the chunks belong to, so that a resumed run never
    mixes chunks from two configurations.

    A chunk that cannot be read back whole (truncated, corrupt, wrong contents) is removed by
    `done()` and listed in `discarded` as (file name, reason): its items count as not done, so
    the resumed run extracts them again.
    """

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.discarded: list[tuple[str, str]] = []

    @property
    def config_path(self) -> Path:
        return self.folder / "config.json"

    def check_own(self, flag: str = "-s") -> None:
        """A one-line `UserError` when a folder stands where the store goes that extract.py did not make (it is kept)."""
        if os.path.lexists(self.folder) and not is_own_scratch(self.folder, PARTIAL_FOLDER):
            held = (f"it holds {describe_entries(self.folder, os.listdir(self.folder)) or 'nothing'}"
                    if self.folder.is_dir() and not self.folder.is_symlink() else "it is not a folder")
            raise UserError(f"{flag} {self.folder.parent} holds {self.folder.name}, which extract.py did not make "
                            f"({held}); it is left alone, even with --overwrite: move it away or choose another {flag}")

    def config(self) -> dict | None:
        if not (self.config_path.exists() or self.config_path.is_symlink()):
            return None
        config = read_json(self.config_path)
        if not isinstance(config, dict):
            raise UserError(f"{self.config_path} is damaged (a JSON {type(config).__name__}, not an object); "
                            f"delete {self.folder} to start the extraction over")
        return config

    def start(self, config: Mapping, flag: str = "-s") -> None:
        """Make the store (with its marker; or find extract.py's own one there) and record `config` in it."""
        self.folder.parent.mkdir(parents=True, exist_ok=True)
        claim_scratch(self.folder, PARTIAL_FOLDER, owner=_OWNER, flag=flag, shown=str(self.folder.parent))
        write_json(self.config_path, dict(config))

    def chunks(self) -> list[Path]:
        return sorted(self.folder.glob("chunk_*.npz")) if self.folder.is_dir() else []

    @staticmethod
    def _read(path: Path) -> dict[str, np.ndarray]:
        """A chunk's arrays, checked to be whole and consistent; ValueError says what is wrong."""
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as err:
            raise ValueError(first_line(err)) from None
        for key in ("indices", "names", "skip_index", "skip_reason"):
            if key not in arrays:
                raise ValueError(f"no {key!r} array")
        n = len(arrays["indices"])
        if arrays["indices"].ndim != 1 or arrays["indices"].dtype.kind not in "iu" or n == 0:
            raise ValueError("bad item indices")
        if len(arrays["skip_index"]) != len(arrays["skip_reason"]):
            raise ValueError("skip lists of different lengths")
        for i in range(len(arrays["names"])):
            part = arrays.get(f"part_{i}")
            if part is None or part.ndim < 1 or len(part) != n:
                raise ValueError(f"part {i} missing or of the wrong length")
        return arrays

    def done(self, discard: bool = True) -> set[int]:
        """Item indices held by whole chunks. A damaged chunk is removed (and listed in `discarded`)
        when `discard`, else only left out: under torchrun rank 0 alone discards, before the other
        ranks look (`featuresExtractor.pipeline`), so no rank removes a chunk another one reads."""
        done: set[int] = set()
        for path in self.chunks():
            try:
                done.update(self._read(path)["indices"].tolist())
            except ValueError as err:
                if discard:
                    self.discarded.append((path.name, str(err)))
                    path.unlink()
        return done

    def write(self, indices: Sequence[int], parts: Mapping[str, np.ndarray],
              skipped: Sequence[tuple[int, str]]) -> Path:
        path = self.folder / f"chunk_{min(indices):09d}.npz"
        arrays = {f"part_{i}": np.ascontiguousarray(a, dtype=np.float32) for i, a in enumerate(parts.values())}
        with atomic_path(path, suffix=".npz") as tmp:
            np.savez(tmp, indices=np.asarray(indices, dtype=np.int64), names=np.asarray(list(parts), dtype=str),
                     skip_index=np.asarray([i for i, _ in skipped], dtype=np.int64),
                     skip_reason=np.asarray([r for _, r in skipped] or [""], dtype=str)[: len(skipped)],
                     **arrays)
        return path

    def rows(self) -> "StoredRows":
        """The kept items of every chunk, readable in item order block by block (see `StoredRows`)."""
        return StoredRows(self.chunks())

    def remove(self) -> None:
        """Remove the store, when it is extract.py's own (`toolkit.folders.discard_scratch`)."""
        discard_scratch(self.folder, PARTIAL_FOLDER)


class StoredRows:
    """The kept items of a set of chunks, in item order, read a block of items at a time.

    Only the item indices of every chunk are held (8 bytes an item, three times); the pooled
    values are read from the chunks a block at a time, so merging needs memory for one block
    (and the chunks it touches), not for the dataset. Blocks are cut by item position, never by
    chunk, so the blocks, and whatever is computed from them, do not depend on how the items
    were batched or sharded over ranks. An item found in two chunks is taken from the first.
    """

    def __init__(self, chunks: Sequence[Path]):
        self.chunks = list(chunks)
        items, where, skipped = [], [], {}
        for c, path in enumerate(self.chunks):
            with np.load(path, allow_pickle=False) as z:
                idx, skip = z["indices"], z["skip_index"]
                skipped.update(zip(skip.tolist(), z["skip_reason"].tolist()))
            rows = np.flatnonzero(~np.isin(idx, skip))
            items.append(idx[rows])
            where.append(np.stack([np.full(len(rows), c), rows], axis=1))
        self.skipped: dict[int, str] = skipped
        if not items:
            self.kept = np.zeros(0, dtype=np.int64)
            self._where = np.zeros((0, 2), dtype=np.int64)
            return
        all_items, all_where = np.concatenate(items), np.concatenate(where)
        # np.unique returns the first occurrence of each item, in sorted item order.
        self.kept, first = np.unique(all_items, return_index=True)
        self._where = all_where[first]
        kept = set(self.kept.tolist())
        self.skipped = {i: r for i, r in skipped.items() if i not in kept}

    def __len__(self) -> int:
        return len(self.kept)

    def blocks(self, block_items: int) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """Yield (position of the block's first kept item, tap -> pooled values of the block's items)."""
        cache: dict[int, dict[str, np.ndarray]] = {}
        for start in range(0, len(self.kept), block_items):
            where = self._where[start:start + block_items]
            needed = np.unique(where[:, 0]).tolist()
            cache = {c: cache[c] if c in cache else self._read(c) for c in needed}
            parts = {}
            for name in cache[needed[0]]:
                parts[name] = np.concatenate([cache[c][name][where[where[:, 0] == c, 1]] for c in needed])
            # Rows came grouped by chunk; put them back in item order.
            order = np.concatenate([np.flatnonzero(where[:, 0] == c) for c in needed])
            inverse = np.empty_like(order)
            inverse[order] = np.arange(len(order))
            yield start, {k: v[inverse] for k, v in parts.items()}

    def _read(self, c: int) -> dict[str, np.ndarray]:
        with np.load(self.chunks[c], allow_pickle=False) as z:
            return {name: z[f"part_{i}"] for i, name in enumerate(z["names"].tolist())}
