"""The four processors: what extract.py does with the tapped features.

Pass one with `-p/--processor NAME [N]`:

| processor     | output (in `SAVE_DIR/MODEL/`)                                          |
|---------------|-------------------------------------------------------------------------|
| `adapt`       | `features.npy`: every tap pooled, L2-normalised, concatenated (5440-d for RN50x4) |
| `adapt-pca N` | `features.npy` as above but with the embedding left raw, then `features_pca{N}.npy`, `pca{N}.npz` and `pca{N}.pkl` |
| `pca N`       | `features_pca{N}.npy`: a separate PCA per tap on its pooled vector, the N-d parts concatenated; `pca{N}/{tap}.npz` and `.pkl` |
| `save`        | `raw/{tap}/{row}.npy`: each tap's raw output, float16, no pooling         |

**Normalisation** (`--normalize`). Conv taps (`layer1`-`layer4`) are
global-average-pooled; their scale varies wildly between layers, so each is
L2-normalised before concatenation. The embedding (`attnpool`) is another story:

* `layers`: normalise the conv taps only and keep the embedding's own norm. This
  is the default of `adapt-pca` and is how the published 39.39% top-1 was
  produced: the raw 640-d embedding has a norm well above 1, so it dominates the
  PCA's variance and hence the 256 components.
* `all`: normalise every part, so each of the five taps weighs the same on the
  unit sphere. The default of `adapt`.
* `none`: no normalisation; the default of `pca`, whose per-tap PCAs do not mix scales.

**PCA** is fitted on every extracted vector (both sides of every pair, and the
flipped copies with `--data-aug`), by `featuresExtractor.pca.StreamingPCA` (float64
covariance, one eigendecomposition; deterministic).

Processors are stateless: `process` is a pure function of the pooled parts, so
nothing piles up between batches; the extraction loop stores pooled parts, and at the
end `featuresExtractor.merge` runs the same steps (`pca_stems`, the streamed fit,
`project`) block by block over the stored parts. `process` is the in-memory form.

Example:
    >>> import numpy as np
    >>> pooled = {"layer1": np.ones((4, 2, 1, 3)), "attnpool": np.ones((4, 2, 1, 5))}
    >>> out = process(parse_processor(["adapt"]), pooled, embedding="attnpool")
    >>> out.vectors["features.npy"].shape
    (4, 2, 1, 8)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from .pca import PCAParams, StreamingPCA
from .pooling import NORMALIZE_MODES, concat_parts, part_slices
from toolkit.utils import UserError

__all__ = ["Processor", "PROCESSORS", "parse_processor", "pca_stems", "project", "process", "Outputs"]

#: processor name -> (takes N, default normalisation)
PROCESSORS = {"adapt": (False, "all"), "adapt-pca": (True, "layers"), "pca": (True, "none"), "save": (False, "none")}


@dataclass(frozen=True)
class Processor:
    """A processor choice: its name, N for the PCA ones, and the normalisation."""

    name: str
    n_components: int | None = None
    normalize: str = "all"

    @property
    def pooled(self) -> bool:
        """False for `save`, which keeps raw tap outputs instead of pooled vectors."""
        return self.name != "save"


def parse_processor(tokens: Sequence[str], normalize: str | None = None) -> Processor:
    """Parse processor tokens (extract.py's `-p`) such as ["adapt-pca", "256"] into a `Processor`."""
    if not tokens or tokens[0] not in PROCESSORS:
        raise UserError(f"unknown processor {' '.join(tokens)!r}; choose adapt, adapt-pca N, pca N or save")
    name, rest = tokens[0], list(tokens[1:])
    takes_n, default_norm = PROCESSORS[name]
    if takes_n:
        if len(rest) != 1 or not rest[0].isdigit() or int(rest[0]) < 1:
            raise UserError(f"processor {name} needs one positive integer N, e.g. processor {name} 256")
        n = int(rest[0])
    elif rest:
        raise UserError(f"processor {name} takes no argument (got {' '.join(rest)})")
    else:
        n = None
    if normalize is not None and normalize not in NORMALIZE_MODES:
        raise UserError(f"normalize must be one of {', '.join(NORMALIZE_MODES)}")
    return Processor(name, n, normalize or default_norm)


def check_components(proc: Processor, n_vectors: int, dims: Mapping[str, int]) -> None:
    """Refuse a PCA N above the number of vectors or the dimension, before any work."""
    if proc.n_components is None:
        return
    dim = sum(dims.values()) if proc.name == "adapt-pca" else min(dims.values())
    limit = min(n_vectors, dim)
    if proc.n_components > limit:
        what = "vectors" if n_vectors <= dim else ("dimensions" if proc.name == "adapt-pca" else "dimensions of the smallest tap")
        raise UserError(f"PCA N={proc.n_components} is above the {limit} {what} available; use N <= {limit}")


@dataclass
class Outputs:
    """What a processor produced: vector arrays by file name, fitted PCAs, and part layouts."""

    vectors: dict[str, np.ndarray] = field(default_factory=dict)  # file -> (..., D)
    pcas: dict[str, object] = field(default_factory=dict)  # file stem (relative) -> fitted sklearn PCA
    parts: dict[str, dict[str, tuple[int, int]]] = field(default_factory=dict)  # file -> tap -> (start, stop)


def _flat(x: np.ndarray) -> np.ndarray:
    return x.reshape(-1, x.shape[-1])


def pca_stems(proc: Processor, taps: Sequence[str]) -> dict[str, str | None]:
    """The PCA files (stems relative to the model folder) a processor fits, each with
    the tap it reduces (None: the whole concatenation)."""
    if proc.name == "adapt-pca":
        return {f"pca{proc.n_components}": None}
    if proc.name == "pca":
        return {f"pca{proc.n_components}/{tap}": tap for tap in taps}
    return {}


def project(proc: Processor, pooled: Mapping[str, np.ndarray], embedding: str | None,
            pcas: Mapping[str, PCAParams]) -> dict[str, np.ndarray]:
    """Pooled parts (tap -> (..., dim)) to the processor's vectors, by output file name.

    This one function turns pooled taps into saved vectors, for the extracted
    dataset and for any new image later (similarity.py), so both take the same path.
    `pcas` maps each of `pca_stems` to its fitted parameters.
    """
    if proc.name in ("adapt", "adapt-pca"):
        full = concat_parts(pooled, proc.normalize, embedding)
        out = {"features.npy": full}
        if proc.name == "adapt-pca":
            out[f"features_pca{proc.n_components}.npy"] = pcas[f"pca{proc.n_components}"].transform(full)
        return out
    if proc.name == "pca":
        reduced = {name: pcas[f"pca{proc.n_components}/{name}"].transform(
            concat_parts({name: part}, proc.normalize, embedding)) for name, part in pooled.items()}
        return {f"features_pca{proc.n_components}.npy": concat_parts(reduced, "none")}
    raise ValueError(f"processor {proc.name!r} has no pooled outputs")


def process(proc: Processor, pooled: Mapping[str, np.ndarray], embedding: str | None) -> Outputs:
    """Fit the processor's PCAs on pooled parts (tap -> (n, sides, flips, dim)) and project them."""
    out = Outputs()
    dims = {name: a.shape[-1] for name, a in pooled.items()}
    for stem, tap in pca_stems(proc, list(pooled)).items():
        fit_on = concat_parts(pooled if tap is None else {tap: pooled[tap]}, proc.normalize, embedding)
        fit = StreamingPCA(fit_on.shape[-1], proc.n_components)
        fit.update(_flat(fit_on))
        out.pcas[stem] = fit.fit()
    params = {stem: PCAParams.from_sklearn(pca) for stem, pca in out.pcas.items()}
    out.vectors = project(proc, pooled, embedding, params)
    for file in out.vectors:
        out.parts[file] = part_slices(dims if file == "features.npy" else {k: proc.n_components for k in dims})
    return out
