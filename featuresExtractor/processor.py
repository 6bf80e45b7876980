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

Each processor is a type (`Adapt`, `AdaptPCA`, `PerTapPCA`, `Save`); `parse_processor` turns
`-p`'s tokens into one, and `Processor.from_record` a manifest's record: those are the only places a
processor's name is read. The rest of the code asks the type: which PCAs it fits (`pca_stems`), which
files it writes and their widths (`files`), how pooled parts become those files' vectors (`project`).

Processors are stateless: `project` is a pure function of the pooled parts, so nothing piles up
between batches; the extraction loop stores pooled parts, and at the end `featuresExtractor.merge`
fits the PCAs by streaming and projects block by block; `featuresExtractor.encode` projects new
images through the same `project`.

Example:
    >>> import numpy as np
    >>> proc = parse_processor(["adapt"])
    >>> pooled = {"layer1": np.ones((4, 2, 1, 3)), "attnpool": np.ones((4, 2, 1, 5))}
    >>> proc.project(pooled, "attnpool", {})["features.npy"].shape
    (4, 2, 1, 8)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Mapping, Sequence

import numpy as np

from .pca import PCAParams
from .pooling import NORMALIZE_MODES, concat_parts, part_slices
from toolkit.utils import UserError

__all__ = ["Processor", "Adapt", "AdaptPCA", "PerTapPCA", "Save", "KINDS", "parse_processor", "FLAG", "CONCATENATION"]

FLAG = "-p/--processor"
"""The flag that chooses a processor, named by every error about one."""

CONCATENATION = "features.npy"
"""The file of the whole concatenation (`adapt`, `adapt-pca`)."""


@dataclass(frozen=True)
class Processor:
    """A processor choice: N for the PCA ones, and the normalisation. Subclasses say what it does."""

    n_components: int | None = None
    normalize: str = "all"

    name: ClassVar[str]
    takes_n: ClassVar[bool] = False  # the processor takes N (the PCA dimension)
    default_normalize: ClassVar[str] = "none"
    pooled: ClassVar[bool] = True  # False for `save`, which keeps raw tap outputs instead of pooled vectors
    concatenates: ClassVar[bool] = False  # it writes the concatenation `features.npy`

    @classmethod
    def from_record(cls, record: Mapping) -> "Processor":
        """The processor a manifest records (`{"name", "n_components", "normalize"}`, checked by its reader)."""
        return KINDS[record["name"]](record["n_components"], record["normalize"])

    def record(self) -> dict:
        """What a manifest records of this processor (`from_record` reads it back)."""
        return {"name": self.name, "n_components": self.n_components, "normalize": self.normalize}

    @property
    def label(self) -> str:
        """The processor as `-p` takes it, e.g. `adapt-pca 256`."""
        return self.name if self.n_components is None else f"{self.name} {self.n_components}"

    def pca_stems(self, taps: Sequence[str]) -> dict[str, str | None]:
        """The PCA files (stems relative to the model folder) it fits, each with the tap it reduces
        (None: the whole concatenation)."""
        return {}

    def files(self, dims: Mapping[str, int]) -> dict[str, int]:
        """Each features file it writes, with its vector dim, for pooled taps of `dims` (tap -> dim, in order)."""
        return {}

    def parts(self, file: str, dims: Mapping[str, int]) -> dict[str, tuple[int, int]]:
        """Where each tap's part sits in the vectors of `file`: tap -> (start, stop); {} when no part is a tap's."""
        return part_slices(dims if file == CONCATENATION else {tap: self.n_components for tap in dims})

    def project(self, pooled: Mapping[str, np.ndarray], embedding: str | None,
                pcas: Mapping[str, PCAParams]) -> dict[str, np.ndarray]:
        """Pooled parts (tap -> (..., dim)) to its vectors, by output file name.

        This one function turns pooled taps into saved vectors, for the extracted dataset and
        for any new image later (similarity.py), so both take the same path. `pcas` maps each of
        `pca_stems` to its fitted parameters.
        """
        raise ValueError(f"processor {self.name!r} has no pooled outputs")

    def check_components(self, n_vectors: int, dims: Mapping[str, int]) -> None:
        """Refuse a PCA N above the number of vectors or the dimension, before any work."""


@dataclass(frozen=True)
class Adapt(Processor):
    """`adapt`: every tap pooled, L2-normalised, concatenated."""

    name: ClassVar[str] = "adapt"
    default_normalize: ClassVar[str] = "all"
    concatenates: ClassVar[bool] = True

    def files(self, dims: Mapping[str, int]) -> dict[str, int]:
        return {CONCATENATION: sum(dims.values())}

    def project(self, pooled, embedding, pcas):
        return {CONCATENATION: concat_parts(pooled, self.normalize, embedding)}


class _PCA(Processor):
    """What the two PCA processors share: N, and its limit."""

    takes_n: ClassVar[bool] = True
    limited_by: ClassVar[str]  # what bounds N besides the number of vectors

    @property
    def reduced_file(self) -> str:
        """The features file of the N-d vectors."""
        return f"features_pca{self.n_components}.npy"

    def pca_dim(self, dims: Mapping[str, int]) -> int:
        raise NotImplementedError

    def check_components(self, n_vectors: int, dims: Mapping[str, int]) -> None:
        dim = self.pca_dim(dims)
        limit = min(n_vectors, dim)
        if self.n_components > limit:
            what = "vectors" if n_vectors <= dim else self.limited_by
            raise UserError(f"{FLAG} {self.label}: PCA N={self.n_components} is above the {limit} {what} "
                            f"available; use N <= {limit}")


@dataclass(frozen=True)
class AdaptPCA(_PCA, Adapt):
    """`adapt-pca N`: the concatenation (embedding left raw by default), then one PCA to N dims."""

    name: ClassVar[str] = "adapt-pca"
    default_normalize: ClassVar[str] = "layers"
    limited_by: ClassVar[str] = "dimensions"

    def pca_dim(self, dims: Mapping[str, int]) -> int:
        return sum(dims.values())

    def pca_stems(self, taps):
        return {f"pca{self.n_components}": None}

    def files(self, dims):
        return {**super().files(dims), self.reduced_file: self.n_components}

    def parts(self, file, dims):
        # One PCA of the whole concatenation mixes the taps: its N dims are no tap's part.
        return {} if file == self.reduced_file else super().parts(file, dims)

    def project(self, pooled, embedding, pcas):
        out = super().project(pooled, embedding, pcas)
        (stem,) = self.pca_stems(list(pooled))
        out[self.reduced_file] = pcas[stem].transform(out[CONCATENATION])
        return out


@dataclass(frozen=True)
class PerTapPCA(_PCA):
    """`pca N`: a separate PCA per tap on its pooled vector, the N-d parts concatenated."""

    name: ClassVar[str] = "pca"
    limited_by: ClassVar[str] = "dimensions of the smallest tap"

    def pca_dim(self, dims: Mapping[str, int]) -> int:
        return min(dims.values())

    def pca_stems(self, taps):
        return {f"pca{self.n_components}/{tap}": tap for tap in taps}

    def files(self, dims):
        return {self.reduced_file: self.n_components * len(dims)}

    def project(self, pooled, embedding, pcas):
        stems = self.pca_stems(list(pooled))
        reduced = {tap: pcas[stem].transform(concat_parts({tap: pooled[tap]}, self.normalize, embedding))
                   for stem, tap in stems.items()}
        return {self.reduced_file: concat_parts(reduced, "none")}


@dataclass(frozen=True)
class Save(Processor):
    """`save`: each tap's raw output, float16, no pooling (written by the extraction loop itself)."""

    name: ClassVar[str] = "save"
    pooled: ClassVar[bool] = False


KINDS: dict[str, type[Processor]] = {kind.name: kind for kind in (Adapt, AdaptPCA, PerTapPCA, Save)}
"""Processor name -> its type: the one place a name becomes a processor."""


def parse_processor(tokens: Sequence[str], normalize: str | None = None) -> Processor:
    """Parse `-p`'s tokens such as ["adapt-pca", "256"] (and `--normalize`) into a `Processor`."""
    given = " ".join(tokens)
    if not tokens or tokens[0] not in KINDS:
        raise UserError(f"{FLAG} {given!r}: unknown processor; choose adapt, adapt-pca N, pca N or save")
    kind, rest = KINDS[tokens[0]], list(tokens[1:])
    n = None
    if kind.takes_n:
        if len(rest) != 1 or not rest[0].isdigit() or int(rest[0]) < 1:
            raise UserError(f"{FLAG} {given}: {kind.name} needs one positive integer N, e.g. -p {kind.name} 256")
        n = int(rest[0])
    elif rest:
        raise UserError(f"{FLAG} {given}: {kind.name} takes no argument")
    if normalize is not None and normalize not in NORMALIZE_MODES:
        raise UserError(f"normalize must be one of {', '.join(NORMALIZE_MODES)}")
    return kind(n, normalize or kind.default_normalize)
