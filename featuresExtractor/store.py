"""The resumable chunk store of an extraction (`MODEL/.partial/`).

While extraction runs, finished batches go to `MODEL/.partial/` as chunk files, so an
interrupted run resumes where it stopped. The final features files are written by
`featuresExtractor.pairs_file`.
"""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from toolkit.utils import UserError, atomic_path, first_line, read_json, write_json

__all__ = ["ChunkStore"]


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

    def config(self) -> dict | None:
        if not (self.config_path.exists() or self.config_path.is_symlink()):
            return None
        config = read_json(self.config_path)
        if not isinstance(config, dict):
            raise UserError(f"{self.config_path} is damaged (a JSON {type(config).__name__}, not an object); "
                            f"delete {self.folder} to start the extraction over")
        return config

    def start(self, config: Mapping) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
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

    def done(self) -> set[int]:
        done: set[int] = set()
        for path in self.chunks():
            try:
                done.update(self._read(path)["indices"].tolist())
            except ValueError as err:
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

    def load(self) -> tuple[np.ndarray, dict[str, np.ndarray], dict[int, str]]:
        """All chunks merged: kept item indices (sorted), tap -> pooled array, skipped index -> reason."""
        indices, parts, skipped = [], {}, {}
        for path in self.chunks():
            try:
                z = self._read(path)
            except ValueError as err:
                raise UserError(f"{path} is damaged ({err}); re-run the same command to extract its items again") from None
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
