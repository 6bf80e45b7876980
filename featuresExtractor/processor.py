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
flipped copies with `--data-aug`), with the full, deterministic SVD.

Processors are stateless: `process` is a pure function of the pooled parts, so
nothing piles up between batches; the extraction loop stores pooled parts and the
processor runs once at the end.

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

from .pca import fit_pca
from .pooling import NORMALIZE_MODES, concat_parts, part_slices
from .utils import UserError

__all__ = ["Processor", "PROCESSORS", "parse_processor", "process", "Outputs"]

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
    """Parse `-p` tokens such as ["adapt-pca", "256"] into a `Processor`."""
    if not tokens or tokens[0] not in PROCESSORS:
        raise UserError(f"unknown processor {' '.join(tokens)!r}; choose adapt, adapt-pca N, pca N or save")
    name, rest = tokens[0], list(tokens[1:])
    takes_n, default_norm = PROCESSORS[name]
    if takes_n:
        if len(rest) != 1 or not rest[0].isdigit() or int(rest[0]) < 1:
            raise UserError(f"processor {name} needs one positive integer N, e.g. -p {name} 256")
        n = int(rest[0])
    elif rest:
        raise UserError(f"processor {name} takes no argument (got {' '.join(rest)})")
    else:
        n = None
    if normalize is not None and normalize not in NORMALIZE_MODES:
        raise UserError(f"--normalize must be one of {', '.join(NORMALIZE_MODES)}")
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

    vectors: dict[str, np.ndarray] = field(default_factory=dict)  # file -> (n, sides, flips, D)
    pcas: dict[str, object] = field(default_factory=dict)  # file stem (relative) -> fitted sklearn PCA
    parts: dict[str, dict[str, tuple[int, int]]] = field(default_factory=dict)  # file -> tap -> (start, stop)


def _flat(x: np.ndarray) -> np.ndarray:
    return x.reshape(-1, x.shape[-1])


def process(proc: Processor, pooled: Mapping[str, np.ndarray], embedding: str | None) -> Outputs:
    """Turn pooled parts (tap -> (n, sides, flips, dim)) into the processor's outputs."""
    out = Outputs()
    dims = {name: a.shape[-1] for name, a in pooled.items()}
    if proc.name in ("adapt", "adapt-pca"):
        full = concat_parts(pooled, proc.normalize, embedding)
        out.vectors["features.npy"] = full
        out.parts["features.npy"] = part_slices(dims)
        if proc.name == "adapt-pca":
            pca = fit_pca(_flat(full), proc.n_components)
            out.pcas[f"pca{proc.n_components}"] = pca
            out.vectors[f"features_pca{proc.n_components}.npy"] = pca.transform(_flat(full)).reshape(
                *full.shape[:-1], proc.n_components).astype(np.float32)
    elif proc.name == "pca":
        reduced = {}
        for name, part in pooled.items():
            part = concat_parts({name: part}, proc.normalize, embedding)
            pca = fit_pca(_flat(part), proc.n_components)
            out.pcas[f"pca{proc.n_components}/{name}"] = pca
            reduced[name] = pca.transform(_flat(part)).reshape(*part.shape[:-1], proc.n_components)
        file = f"features_pca{proc.n_components}.npy"
        out.vectors[file] = concat_parts(reduced, "none")
        out.parts[file] = part_slices({name: proc.n_components for name in reduced})
    else:
        raise ValueError(f"processor {proc.name!r} has no pooled outputs")
    return out
