"""The end of an extraction: the chunk store turned into the output files, in bounded memory.

`write_outputs` reads the kept items of the chunk store (`featuresExtractor.store.StoredRows`)
a block of items at a time, twice when the processor fits a PCA:

1. the PCA pass feeds each block's vectors to a `featuresExtractor.pca.StreamingPCA`
   (exact: the Gram matrix of the rows up to as many vectors as dims, else the float64
   covariance and its top eigenpairs);
2. the write pass projects each block (`featuresExtractor.processor.Processor.project`, the function
   similarity.py uses for new images) and writes it into the features files
   (`featuresExtractor.pairs_file.RecordsWriter`, positioned writes).

Memory is one block (about `BLOCK_BYTES` of pooled values) plus the d x d covariance, whatever
the number of images. Blocks are cut by item position, so a run sharded over any number of
ranks writes the same bytes as a one-process run.

Example:
    >>> outputs = write_outputs(proc, store.rows(), names, ("left", "right"), 2, "attnpool",
    ...                         dims, out_dir)                               # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from .pairs_file import RecordsWriter
from .pca import PCAParams, StreamingPCA, save_pca
from .pooling import concat_parts
from .processor import Processor
from .store import StoredRows

__all__ = ["BLOCK_BYTES", "block_items", "fit_pcas", "write_outputs"]

BLOCK_BYTES = 8 * 2**20
"""Pooled float32 values read per block while merging."""


def block_items(dims: Mapping[str, int], n_sides: int, n_flips: int) -> int:
    """Items per block: about `BLOCK_BYTES` of pooled values. It depends only on the configuration."""
    per_item = 4 * sum(dims.values()) * n_sides * n_flips
    return max(1, BLOCK_BYTES // max(1, per_item))


def fit_pcas(proc: Processor, rows: StoredRows, dims: Mapping[str, int], embedding: str | None,
             block: int, device=None) -> dict[str, object]:
    """Fit the processor's PCAs by streaming over the stored rows: PCA stem -> fitted PCA.

    `device`: None fits on the CPU; a torch device (the extraction's CUDA device) fits there.
    """
    stems = proc.pca_stems(list(dims))
    if not stems:
        return {}
    fits = {stem: StreamingPCA(sum(dims.values()) if tap is None else dims[tap], proc.n_components, device=device)
            for stem, tap in stems.items()}
    for _, pooled in rows.blocks(block):
        for stem, tap in stems.items():
            fit_on = concat_parts(pooled if tap is None else {tap: pooled[tap]}, proc.normalize, embedding)
            fits[stem].update(fit_on.reshape(-1, fit_on.shape[-1]))
    return {stem: fit.fit() for stem, fit in fits.items()}


def write_outputs(proc: Processor, rows: StoredRows, names: Sequence[str], sides: Sequence[str], n_flips: int,
                  embedding: str | None, dims: Mapping[str, int], folder: Path, pca_device=None) -> dict[str, dict]:
    """Write the processor's features files and PCA files into `folder`; their manifest entries.

    `rows` are the kept items, `names` their names in the same order; `dims` the pooled dim of
    each tap, in tap order; `pca_device` where the PCA is fitted (`fit_pcas`).
    """
    folder = Path(folder)
    block = block_items(dims, len(sides), n_flips)
    pcas = fit_pcas(proc, rows, dims, embedding, block, pca_device)
    params = {stem: PCAParams.from_sklearn(p) for stem, p in pcas.items()}
    files = proc.files(dims)
    writers = {file: RecordsWriter(folder / file, names, sides, dim, n_flips) for file, dim in files.items()}
    try:
        for start, pooled in rows.blocks(block):
            for file, vectors in proc.project(pooled, embedding, params).items():
                writers[file].write(start, vectors)
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    for w in writers.values():
        w.close()
    outputs: dict[str, dict] = {}
    for file, dim in files.items():
        parts = proc.parts(file, dims)
        outputs[file] = {"kind": "features", "rows": len(names) * n_flips, "dim": dim,
                         "fields": ["name", "augmented", *sides], "parts": {k: list(v) for k, v in parts.items()}}
    for stem, pca in pcas.items():
        for path in save_pca(folder / stem, pca):
            outputs[str(path.relative_to(folder))] = {
                "kind": "pca", "n_components": proc.n_components, "in_dim": int(pca.n_features_in_),
                "explained_variance": float(np.sum(pca.explained_variance_ratio_)), "pickle": path.suffix == ".pkl",
                "solver": pca.solver_}
    return outputs

