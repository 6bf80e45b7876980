"""The resumable chunk store of an extraction (`MODEL/.partial/`).

While extraction runs, finished batches go to `MODEL/.partial/` as chunk files, so an
interrupted run resumes where it stopped. The final features files are written by
`featuresExtractor.pairs_file`.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from toolkit.utils import atomic_path, read_json, write_json

__all__ = ["ChunkStore"]


class ChunkStore:
    """Finished batches of an extraction, kept until the final files are written.

    Each chunk is one atomically written `.npz` holding the item indices it covers,
    the skipped items with their reasons, and one pooled array per tap. `config.json`
    records which configuration the chunks belong to, so that a resumed run never
    mixes chunks from two configurations.
    """

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    @property
    def config_path(self) -> Path:
        return self.folder / "config.json"

    def config(self) -> dict | None:
        return read_json(self.config_path) if self.config_path.is_file() else None

    def start(self, config: Mapping) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        write_json(self.config_path, dict(config))

    def chunks(self) -> list[Path]:
        return sorted(self.folder.glob("chunk_*.npz")) if self.folder.is_dir() else []

    def done(self) -> set[int]:
        done: set[int] = set()
        for path in self.chunks():
            with np.load(path, allow_pickle=False) as z:
                done.update(z["indices"].tolist())
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

    def load(self) -> tuple[np.ndarray, dict[str, np.ndarray], dict[int, str]]:
        """All chunks merged: kept item indices (sorted), tap -> pooled array, skipped index -> reason."""
        indices, parts, skipped = [], {}, {}
        for path in self.chunks():
            with np.load(path, allow_pickle=False) as z:
                ok = np.setdiff1d(z["indices"], z["skip_index"], assume_unique=False)
                keep = np.isin(z["indices"], ok)
                indices.append(z["indices"][keep])
                for i, name in enumerate(z["names"].tolist()):
                    parts.setdefault(name, []).append(z[f"part_{i}"][keep])
                skipped.update(zip(z["skip_index"].tolist(), z["skip_reason"].tolist()))
        if not indices:
            return np.zeros(0, dtype=np.int64), {}, skipped
        order_idx = np.concatenate(indices)
        order = np.argsort(order_idx, kind="stable")
        return order_idx[order], {k: np.concatenate(v)[order] for k, v in parts.items()}, skipped

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
