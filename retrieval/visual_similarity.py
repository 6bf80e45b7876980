"""Apply a trained adaptation to new images: embed, score a pair, search a gallery.

A run folder of train.py records the features file it was trained on; beside that
file, extract.py's `manifest.json` and `pca{N}.npz` say how its vectors were made.
`VisualSimilarity.from_run` rebuilds that whole path (backbone, taps, normalisation,
PCA, adaptation), so a new image is treated exactly as the training images were.

Example:
    >>> from retrieval.visual_similarity import VisualSimilarity
    >>> sim = VisualSimilarity.from_run("runs/run1")                    # doctest: +SKIP
    >>> sim.score("cat.jpg", "cloud.jpg")                               # doctest: +SKIP
    0.8123
    >>> sim.judge("cat.jpg", "cloud.jpg")     # with the run's calibrated threshold  # doctest: +SKIP
    Verdict(score=0.8123, threshold=0.7412, alike=True)
    >>> [m.name for m in sim.search("cat.jpg", "gallery/", k=3)]        # doctest: +SKIP
    ['cloud.jpg', 'rock.jpg', 'dog.jpg']
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from featuresExtractor.dataset import discover
from featuresExtractor.transforms import BadImage, load_image
from toolkit.device import choose_device
from toolkit.folders import special_kind
from toolkit.hashing import file_sha256
from toolkit.utils import UserError, decode_text, first_line

from . import index as faiss_index
from . import index_folder
from adaptation.calibration import Threshold
from .deploy import OnnxEncoder
from .encode_cache import EncodeCache
from .backend import VectorIndex
from .index import IndexParams
from .milvus_index import MilvusTarget

# torch, the backbone and the checkpoint are imported by from_run, not here: an ONNX export
# (from_onnx) is used with neither torch nor open_clip installed.
if TYPE_CHECKING:
    import torch

    from featuresExtractor.encode import Encoder

__all__ = ["VisualSimilarity", "Gallery", "Match", "Hits", "Verdict", "NO_THRESHOLD", "gallery_items", "check_source"]

NO_THRESHOLD = ("no calibrated threshold: this run was trained without --val-split, so nothing says which "
                "score means alike")
GALLERY_CHUNK = 64
INDEX_CHUNK = 1024  # images per resumable chunk of an index build
ADAPT_BATCH = 8192
ImageLike = str | os.PathLike | Image.Image


def cosines(q, g) -> np.ndarray:
    """Cosines of one row `q` (1, d) with each row of `g` (n, d): (n,) float32 (numpy or torch rows)."""
    q, g = (np.asarray(a, dtype=np.float32) for a in (q, g))
    return (g @ q[0]) / np.maximum(np.linalg.norm(g, axis=1) * np.linalg.norm(q[0]), 1e-8)


@dataclass(frozen=True)
class Match:
    """One search result: the gallery item's name, its image (path, if known) and adapted cosine."""

    name: str
    score: float
    image: str | None


@dataclass(frozen=True)
class Verdict:
    """An adapted cosine with the run's calibrated decision.

    Attributes:
        score: the adapted cosine.
        threshold: the max-F1 threshold calibrated on the run's validation pairs, or None when
            the run had no validation split (then `alike` is None too: nothing says what is alike).
        alike: `score >= threshold`, or None.
    """

    score: float
    threshold: float | None
    alike: bool | None


@dataclass
class Gallery:
    """Gallery items: names, where their images are (if known), and their raw feature vectors."""

    names: list[str]
    images: list[str | None]
    vectors: np.ndarray  # (n, in_dim), before adaptation
    skipped: dict[str, str]  # unreadable images: name -> reason


@dataclass(frozen=True)
class Hits:
    """One query of a batch search: its label, image path, best matches, or why it failed."""

    query: str
    image: str | None
    matches: list[Match]
    error: str | None = None


def check_source(path: str | os.PathLike, what: str = "gallery") -> None:
    """A `UserError` unless `path` (a gallery or list argument) is a folder or a regular file.

    A FIFO, socket or device would block the read, or never end it: it is refused, never opened.
    """
    kind = special_kind(path)
    if kind in ("missing", "a broken link"):
        raise UserError(f"{what} {path} does not exist" + (" (a broken link)" if kind == "a broken link" else ""))
    if kind not in (None, "a folder"):
        raise UserError(f"{what} {path} is {kind}; give a folder of images, a list of image paths (one per line) "
                        f"or a features .npy file")


def entry_problem(image: ImageLike) -> str | None:
    """Why a gallery or query entry cannot be an image file (a FIFO, a folder, a broken link...); None if it can."""
    if isinstance(image, Image.Image):
        return None
    kind = special_kind(image)
    return None if kind is None else f"{kind}, not an image file"


def gallery_items(source: str | os.PathLike | Sequence[ImageLike]) -> list[tuple[str, ImageLike]]:
    """(name, image) for each gallery image: a flat or left/right folder, a list file, or a list.

    A list file holds one image path per line (a tab-separated pair of paths counts as two
    images); relative paths are relative to the list file, and the name is the path as written.
    A list file that is not a regular file (a FIFO...) is refused before it is opened.
    """
    if not isinstance(source, (str, os.PathLike)):
        return [(Path(im).name if not isinstance(im, Image.Image) else f"image{n}", im) for n, im in enumerate(source)]
    check_source(source, "image list" if not Path(source).is_dir() else "gallery")
    path = Path(source)
    if path.is_dir():
        layout = discover(path)
        return [((name if layout.kind == "flat" else f"{side}/{name}"), os.path.abspath(layout.path(i, side)))
                for side in layout.sides for i, name in enumerate(layout.names)]
    hint = "give a folder, a list of image paths (one per line) or a features .npy file"
    try:
        data = path.read_bytes()
    except OSError as err:
        raise UserError(f"cannot read image list {path} ({first_line(err)}); {hint}") from None
    lines = decode_text(data, f"image list {path}", hint).splitlines()
    items = [(f, os.path.abspath(path.parent / f)) for line in lines if line.strip() and not line.startswith("#")
             for f in (part.strip() for part in line.split("\t")) if f]
    if not items:
        raise UserError(f"image list {path} names no image (one path per line)")
    return items


class VisualSimilarity:
    """A trained adaptation with the feature extraction it was trained on (`from_run`), or its ONNX export
    (`from_onnx`, no torch: `encoder` is an `retrieval.deploy.OnnxEncoder` and `model` is None)."""

    def __init__(self, encoder: Encoder | OnnxEncoder, model: torch.nn.Module | None, checkpoint: dict,
                 device: torch.device | None, checkpoint_sha256: str | None = None, provenance_note: str | None = None):
        self.encoder, self.model, self.checkpoint, self.device = encoder, model, checkpoint, device
        self.checkpoint_sha256 = checkpoint_sha256
        self.provenance_note = provenance_note
        """None when the features, manifest and PCA were all found to be the run's own; else what the checkpoint's
        format could not record, so was not checked (`adaptation.checkpoint.check_provenance`), for a note."""
        self.engine_note: str | None = None
        """What `--engine auto` chose and why (`from_run`), for a note; None otherwise."""

    @property
    def onnx(self) -> bool:
        """True for an ONNX export: `raw` already gives the adapted, L2-normalised embedding."""
        return self.model is None

    @classmethod
    def from_onnx(cls, folder: str | os.PathLike, threads: int | None = None) -> "VisualSimilarity":
        """Open an export folder (`similarity.py --run RUN export -o DIR`) with onnxruntime; no torch needed.

        The result has the same `score`, `judge`, `search`, `embed` and index methods as `from_run`'s;
        `embed` gives L2-normalised numpy rows. `threads` sets onnxruntime's threads. Raises `UserError`.
        """
        encoder = OnnxEncoder.load(folder, threads=threads)
        threshold = encoder.manifest.get("threshold")
        if threshold is not None:
            try:
                Threshold.from_dict(threshold)
            except ValueError as err:
                raise UserError(f"{folder}: the manifest's threshold is damaged ({err}); export the run again") from None
        return cls(encoder, None, {"threshold": threshold}, None, encoder.manifest["identity"].get("checkpoint_sha256"))

    @classmethod
    def from_run(cls, run_dir: str | os.PathLike, device: str | torch.device | None = None,
                 weights: str | os.PathLike | None = None, best: bool = False, engine: str = "torch",
                 n_images: int | None = None) -> "VisualSimilarity":
        """Load `run_dir/model_and_optimizer.pt` (or, with `best`, `best.pt`) and the extraction its features came from.

        `device` defaults to CUDA when available (`toolkit.device.choose_device`). `weights` points at the backbone
        checkpoint when the extraction used `--weights` and the file has moved. `engine` runs the backbone
        (`featuresExtractor.engines.resolve_engine`: `auto` weighs `n_images`, None for many); what `auto`
        chose is said in `engine_note`.
        Raises `UserError` for a missing checkpoint, manifest or PCA, or a mismatch, among them a
        features file, extraction manifest or PCA other than the ones the run was trained on
        (`adaptation.checkpoint.check_provenance`, before the backbone loads).
        """
        import torch

        from featuresExtractor.encode import Encoder
        from featuresExtractor.engines import resolve_engine

        from adaptation.checkpoint import BEST_CHECKPOINT, CHECKPOINT, check_provenance, load_checkpoint

        run_dir = Path(run_dir)
        name = BEST_CHECKPOINT if best else CHECKPOINT
        ckpt_path = run_dir / name
        if best and not ckpt_path.is_file() and (run_dir / CHECKPOINT).is_file():
            raise UserError(f"no {BEST_CHECKPOINT} in {run_dir}: the run was trained without --val-split")
        if not ckpt_path.is_file():
            raise UserError(f"no {name} in {run_dir}: pass a run folder written by train.py, e.g. RUNS/run1")
        device = choose_device(device, flag="device")
        model, ckpt = load_checkpoint(ckpt_path, device)
        data = ckpt["config"].get("data")
        if not isinstance(data, str) or not data:
            raise UserError(f"{ckpt_path} does not record its features file; retrain with this toolkit's train.py")
        note = check_provenance(ckpt, ckpt_path)
        encoder = Encoder.from_features_file(data, device=device, weights=weights)
        if encoder.dim != int(ckpt["in_dim"]):
            raise UserError(f"{ckpt_path} expects {ckpt['in_dim']}-d features but {Path(data).name} "
                            f"(via its PCA) gives {encoder.dim}-d ones")
        engine, engine_note = resolve_engine(engine, device, encoder.extractor.precision, n_images=n_images)
        encoder.extractor.set_engine(engine)
        sim = cls(encoder, model, ckpt, device, file_sha256(ckpt_path), note)
        sim.engine_note = engine_note
        return sim

    def raw(self, images: Sequence[ImageLike]) -> np.ndarray:
        """The features before adaptation, as extract.py would have stored them: (n, in_dim)."""
        return self.encoder.encode(list(images))

    def adapt(self, raw: np.ndarray) -> torch.Tensor | np.ndarray:
        """Apply the adaptation to raw feature rows: (n, in_dim) -> (n, out_dim), on the CPU.

        An ONNX export's rows are already adapted: they are returned as they are (numpy).
        """
        if self.onnx:
            return np.asarray(raw, dtype=np.float32)
        import torch

        with torch.inference_mode():
            return self.model(torch.as_tensor(raw, dtype=torch.float32, device=self.device)).float().cpu()

    def embed(self, images: Sequence[ImageLike]) -> torch.Tensor | np.ndarray:
        """Adapted vectors for images (paths or PIL images): (n, out_dim), not normalised (a torch tensor);
        from an ONNX export, L2-normalised (a numpy array)."""
        return self.adapt(self.raw(images))

    @property
    def threshold(self) -> Threshold | None:
        """The thresholds calibrated on the run's validation pairs, or None (trained without --val-split)."""
        stored = self.checkpoint.get("threshold")
        if stored is None:
            return None
        return Threshold.from_dict(stored)  # checked by load_checkpoint

    def score(self, a: ImageLike, b: ImageLike) -> float:
        """The adapted cosine similarity of two images (the method's similarity function).

        `judge` gives the same score with the run's calibrated verdict.
        """
        return self.score_raw(self.raw([a, b]))

    def judge(self, a: ImageLike, b: ImageLike) -> Verdict:
        """`score(a, b)` with the max-F1 threshold and whether it is reached (None, None without one)."""
        return self.verdict(self.score(a, b))

    def verdict(self, score: float) -> Verdict:
        """The decision for an adapted cosine already computed (e.g. a search result's score)."""
        t = self.threshold
        return Verdict(score, None, None) if t is None else Verdict(score, t.max_f1, score >= t.max_f1)

    def score_raw(self, raw: np.ndarray) -> float:
        """The adapted cosine of two raw feature rows, (2, in_dim) as `raw` returns them."""
        e = self.adapt(raw)
        return float(cosines(e[:1], e[1:])[0])

    def gallery(self, source: str | os.PathLike | Sequence[ImageLike], strict: bool = False) -> Gallery:
        """A gallery from a folder of images (extracted now), a flat features file, an image list file, or a list.

        Unreadable images are skipped (listed in `Gallery.skipped`); with `strict`, refused.
        """
        if isinstance(source, (str, os.PathLike)) and Path(source).is_file() and Path(source).suffix == ".npy":
            return self._gallery_file(Path(source))
        if isinstance(source, (str, os.PathLike)) and not Path(source).is_file() and discover(source).kind != "flat":
            raise UserError(f"{source} holds left/ and right/: a gallery is a flat folder of images")
        items = gallery_items(source)
        names, images, vectors, skipped = [], [], [], {}
        for chunk in tqdm(self._encode(items, strict), desc="gallery", unit="chunk", leave=False,
                          total=-(-len(items) // GALLERY_CHUNK), disable=len(items) <= GALLERY_CHUNK):
            names += chunk[0]
            images += chunk[1]
            vectors.append(chunk[2])
            skipped.update(chunk[3])
        if not names:
            raise UserError("the gallery has no readable image")
        return Gallery(names, images, np.concatenate(vectors), skipped)

    def _encode(self, items: Sequence[tuple[str, ImageLike]],
                strict: bool = False) -> Iterator[tuple[list, list, np.ndarray, dict]]:
        """(names, images, raw vectors, skipped) for `items` ((name, image) pairs), GALLERY_CHUNK at a time.

        An item that is not an image file (a FIFO, a folder, a broken link) is skipped, never opened,
        as an unreadable image is; with `strict`, either is a `UserError` instead.
        """
        # Decoded images are large (about 1 MB each at 288 px), so only a chunk is held at a time.
        for start in range(0, len(items), GALLERY_CHUNK):
            names, images, decoded, skipped = [], [], [], {}
            for name, item in items[start:start + GALLERY_CHUNK]:
                try:
                    problem = entry_problem(item)
                    if problem:
                        raise BadImage(problem)
                    decoded.append(item if isinstance(item, Image.Image) else load_image(item))
                except BadImage as err:
                    if strict:
                        raise UserError(f"gallery image {name}: {err} (--strict: fix or remove it, or drop "
                                        f"--strict to skip it)") from None
                    skipped[name] = str(err)
                    continue
                names.append(name)
                images.append(None if isinstance(item, Image.Image) else str(item))
            raw = self.raw(decoded) if decoded else np.zeros((0, self.encoder.dim), np.float32)
            yield names, images, raw, skipped

    def _gallery_file(self, path: Path) -> Gallery:
        if self.onnx:
            raise UserError(f"{path}: an ONNX export encodes images, not extracted features; give the gallery's "
                            f"images (a folder or an image list)")
        from featuresExtractor.manifest import check_output, read_manifest, transform_choice
        from featuresExtractor.processor import CONCATENATION

        try:
            rec = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as err:  # truncated, pickled or not a .npy at all
            raise UserError(f"cannot read gallery file {path}: {first_line(err)}") from None
        if not isinstance(rec, np.ndarray) or rec.dtype.names is None or "feature" not in rec.dtype.names:
            raise UserError(f"{path} is not a gallery features file (a flat folder extracted by extract.py)")
        mine, theirs = self.encoder.manifest, read_manifest(path)
        check_output(theirs, path.parent, path.name)  # the vectors extract.py wrote, not ones edited since
        if transform_choice(mine) != transform_choice(theirs):
            raise UserError(f"{path} was extracted with --transform {transform_choice(theirs)} but this run's features "
                            f"with --transform {transform_choice(mine)}; extract the gallery with --transform "
                            f"{transform_choice(mine)}")
        same = ("model", "arch", "weights", "taps", "precision")
        diff = [k for k in same if mine["config"].get(k) != theirs["config"].get(k)]
        if diff:
            raise UserError(f"{path} was extracted with another model (differs in {', '.join(diff)}); extract the "
                            f"gallery with the run's settings")
        proc = self.encoder.processor
        if path.name != CONCATENATION or theirs["processor"]["normalize"] != proc.normalize or not proc.concatenates:
            raise UserError(f"use the gallery's concatenated features.npy extracted with: -p adapt --normalize "
                            f"{proc.normalize} (this run projects them with its own PCA)")
        rows = rec[~rec["augmented"]]
        want = self.encoder.concatenation_dim
        got = rows["feature"].shape[1] if rows["feature"].ndim == 2 else None
        if got != want:
            raise UserError(f"{path} holds {got}-d vectors but this run's extraction concatenates {want}-d ones; "
                            f"extract the gallery with the run's model and taps")
        if not np.isfinite(rows["feature"]).all():
            raise UserError(f"{path} holds NaN or inf values; extract the gallery again")
        vectors = self.encoder.from_concatenation(rows["feature"])
        root = Path(theirs["dataset"]["path"])
        names = [str(n) for n in rows["name"]]
        images = [str(root / n) if (root / n).is_file() else None for n in names]
        return Gallery(names, images, vectors.astype(np.float32), {})

    def search(self, query: ImageLike | Sequence[ImageLike],
               gallery: str | os.PathLike | Sequence[ImageLike] | Gallery | VectorIndex,
               k: int = 5) -> list[Match] | list[Hits]:
        """The k gallery items most similar to `query`, best first (ties: gallery order).

        `gallery` is a `Gallery`, an index (`retrieval.backend.VectorIndex`: faiss or Milvus, see
        `load_index`), an index folder, or
        anything `gallery()` takes. One query (a path or PIL image) returns its `Match` list
        and raises `UserError` when unreadable; a list of queries returns one `Hits` per query,
        an unreadable one with its `error` set and no matches, the others answered.

        Example:
            >>> index = sim.load_index("gallery_index")                        # doctest: +SKIP
            >>> [h.matches[0].name for h in sim.search(["a.jpg", "b.jpg"], index, k=3)]   # doctest: +SKIP
            ['a.jpg', 'cloud.jpg']
        """
        single = isinstance(query, (str, os.PathLike, Image.Image))
        queries = [query] if single else list(query)
        if isinstance(gallery, (str, os.PathLike)) and Path(gallery).is_dir() and \
                (Path(gallery) / index_folder.MANIFEST_FILE).is_file():
            gallery = self.load_index(gallery)
        if not isinstance(gallery, (Gallery, VectorIndex)):
            gallery = self.gallery(gallery)
        n = len(gallery) if isinstance(gallery, VectorIndex) else len(gallery.names)
        if not 1 <= k <= n:
            raise UserError(f"k={k} but the gallery has {n} item(s); use 1 <= k <= {n}")
        labels = [str(q) if not isinstance(q, Image.Image) else f"query{i}" for i, q in enumerate(queries)]
        raw, good, errors = [], [], {}
        for names, _, vectors, skipped in self._encode(list(enumerate(queries))):
            good += names
            raw.append(vectors)
            errors.update(skipped)
        if single and errors:
            raise UserError(f"cannot read image {labels[0]}: {errors[0]}")
        matches: dict[int, list[Match]] = {}
        if good:
            q = self.adapt(np.concatenate(raw))
            if isinstance(gallery, VectorIndex):
                scores, ids = gallery.search(faiss_index.normalise(np.asarray(q)), k)
                names, images = gallery.names, gallery.images
                for row, i in enumerate(good):
                    matches[i] = [Match(names[j], float(s), images[j])
                                  for s, j in zip(scores[row], ids[row]) if j >= 0]
            else:
                adapted = self.adapt(gallery.vectors)
                for row, i in enumerate(good):
                    scores = cosines(q[row:row + 1], adapted)
                    order = np.argsort(-scores, kind="stable")[:k].tolist()
                    matches[i] = [Match(gallery.names[j], float(scores[j]), gallery.images[j]) for j in order]
        if single:
            return matches[0]
        return [Hits(labels[i], None if isinstance(q, Image.Image) else str(q), matches.get(i, []), errors.get(i))
                for i, q in enumerate(queries)]

    # -- persistent index (folder format: retrieval.index_folder) -------------------------------------------

    def identity(self) -> dict:
        """What an index built with this run depends on: checkpoint sha256, backbone, PCA, output dim."""
        if self.onnx:
            return self.encoder.identity()
        import hashlib

        import torch

        model = self.encoder.manifest["model"]
        weights = {k: v for k, v in model["weights"].items() if k != "path"}  # the file may move
        pca = hashlib.sha256()
        for stem in sorted(self.encoder.pcas):
            p = self.encoder.pcas[stem]
            pca.update(stem.encode() + np.ascontiguousarray(p.components_).tobytes() + np.ascontiguousarray(p.mean_).tobytes())
        proc = self.encoder.processor
        with torch.inference_mode():
            out_dim = int(self.model(torch.zeros(1, self.encoder.dim, device=self.device)).shape[-1])
        return {"checkpoint_sha256": self.checkpoint_sha256,
                "backbone": {"name": model["name"], "arch": model["arch"], "pretrained": model["pretrained"],
                             "weights": weights, "taps": list(self.encoder.backbone.spec.taps),
                             "precision": self.encoder.extractor.precision},
                "pca": {"processor": proc.name, "n_components": proc.n_components, "normalize": proc.normalize,
                        "output": self.encoder.output, "sha256": pca.hexdigest() if self.encoder.pcas else None},
                "in_dim": self.encoder.dim, "out_dim": out_dim}

    def _index_vectors(self, raw: np.ndarray) -> np.ndarray:
        """Adapted, L2-normalised rows, ADAPT_BATCH at a time."""
        out = [np.asarray(self.adapt(raw[s:s + ADAPT_BATCH])) for s in range(0, len(raw), ADAPT_BATCH)]
        return faiss_index.normalise(np.concatenate(out) if out else np.zeros((0, 1), np.float32))

    def _index_gallery(self, source, cache_dir: Path, base: VectorIndex | None = None, progress: bool = True,
                       strict: bool = False, flag: str = "-o", shown: str | None = None):
        """(vectors, names, images, skipped, cache) of a gallery, minus the items `base` holds (`VectorIndex.unknown`).

        Images are encoded resumably through an `EncodeCache` (returned, to be removed once written;
        `flag` and `shown` name the output when a folder in the cache's place is not the command's).
        Raises `UserError` when the gallery has images but none is readable.
        """
        if isinstance(source, (str, os.PathLike)) and Path(source).is_file() and Path(source).suffix == ".npy":
            g = self._gallery_file(Path(source))
            keep = base.unknown(list(zip(g.names, g.images))) if base is not None else list(range(len(g.names)))
            return (self._index_vectors(g.vectors[keep]), [g.names[i] for i in keep], [g.images[i] for i in keep], {}, None)
        items = gallery_items(source)
        if base is not None:
            files = [(i, (nm, str(im))) for i, (nm, im) in enumerate(items) if not isinstance(im, Image.Image)]
            new = {files[j][0] for j in base.unknown([f for _, f in files])}
            items = [it for i, it in enumerate(items) if isinstance(it[1], Image.Image) or i in new]
        if any(isinstance(im, Image.Image) for _, im in items):
            cache = None  # in-memory images cannot be recognised on a later run
        else:
            cache = EncodeCache(cache_dir, {"identity": self.identity(), "items": items}, flag, shown)
        try:
            vectors, names, images, skipped = self._encode_resumably(items, cache, progress, strict)
            if skipped and not names:
                name, reason = next(iter(skipped.items()))
                raise UserError(f"no readable image in {source} ({len(skipped)} unreadable, e.g. {name}: {reason}); "
                                f"check the gallery")
            return vectors, names, images, skipped, cache
        except UserError:
            if cache:
                cache.remove()  # refused work is not resumed: nothing is left beside the index
            raise

    def _encode_resumably(self, items, cache: EncodeCache | None, progress: bool, strict: bool):
        """(vectors, names, images, skipped) of gallery `items`, INDEX_CHUNK at a time, kept in `cache`."""
        vectors, names, images, skipped = [], [], [], {}
        bar = tqdm(total=len(items), desc="encode", unit="img", disable=not progress)
        for c, start in enumerate(range(0, len(items), INDEX_CHUNK)):
            chunk = items[start:start + INDEX_CHUNK]
            done = cache.load(c) if cache else None
            if done is None:
                parts = list(self._encode(chunk, strict))
                raw = np.concatenate([p[2] for p in parts])
                done = (self._index_vectors(raw), [n for p in parts for n in p[0]], [i for p in parts for i in p[1]],
                        {k: v for p in parts for k, v in p[3].items()})
                if cache:
                    cache.save(c, *done)
            if done[1]:  # a chunk of unreadable images only has no vectors
                vectors.append(done[0].reshape(len(done[1]), -1))
            names += done[1]
            images += done[2]
            skipped.update(done[3])
            bar.update(len(chunk))
        bar.close()
        nonempty = [v for v in vectors if len(v)]
        return (np.concatenate(nonempty) if nonempty else np.zeros((0, 1), np.float32)), names, images, skipped

    def build_index(self, gallery: str | os.PathLike | Sequence[ImageLike], out_dir: str | os.PathLike,
                    params: IndexParams = IndexParams(), overwrite: bool = False, progress: bool = True,
                    strict: bool = False, milvus: MilvusTarget | None = None) -> tuple[VectorIndex, dict[str, str]]:
        """Encode, adapt and index a gallery into `out_dir`; returns (index, skipped images -> reason).

        `gallery` is an image folder, an image list file, a features file of the run's backbone
        (extract.py's flat `features.npy`), or a list of images. Encoding resumes from
        `OUT_DIR.partial/` after an interruption. `out_dir` must be missing, empty, or (with
        `overwrite`) an index folder (`retrieval.index_folder.check_target`). With `strict`, an
        unreadable gallery image is refused instead of skipped. With `milvus`, the vectors go to
        that Milvus collection (`retrieval.milvus_index.create`: checked, or made, before any
        encoding) and `out_dir` keeps the manifest.

        Example:
            >>> index, skipped = sim.build_index("photos/", "photos_index", IndexParams("hnsw"))   # doctest: +SKIP
        """
        index_folder.check_target(out_dir, overwrite)  # before a lock file is made beside it
        with index_folder.locked(out_dir, "-o") as real:
            index_folder.check_target(out_dir, overwrite)  # again: another writer may have finished meanwhile
            if milvus is None:
                index, _, skipped = self._write_index(real, out_dir, None, gallery, params, progress, strict, overwrite)
            else:
                index, skipped = self._build_milvus(real, out_dir, gallery, params, milvus, progress, strict, overwrite)
        return index, skipped

    def _build_milvus(self, real: Path, out_dir, gallery, params: IndexParams, target: MilvusTarget, progress: bool,
                      strict: bool, overwrite: bool) -> tuple[VectorIndex, dict[str, str]]:
        """`build_index` into a Milvus collection: made (or resumed) first, filled, then the manifest written."""
        from . import milvus_index

        identity = self.identity()
        index, resumed = milvus_index.create(target, params, int(identity["out_dim"]), identity, overwrite)
        cache = None
        try:
            vectors, names, images, skipped, cache = self._index_gallery(gallery, real, index if resumed else None,
                                                                         progress, strict, "-o", str(out_dir))
            if names:
                index.add(vectors, names, images, progress=progress)
            if not len(index):
                raise UserError("the gallery has no readable image: nothing to index")
            index_folder.write(index, out_dir, overwrite=overwrite, flag="-o")
        except UserError:
            if cache:
                cache.remove()
            if not resumed:
                milvus_index.drop(index)  # nothing is left of a refused build
            raise
        if cache:
            cache.remove()
        return index, skipped

    def _write_index(self, real: Path, out_dir, base: VectorIndex | None, gallery, params: IndexParams | None,
                     progress: bool, strict: bool, overwrite: bool) -> tuple[VectorIndex, int, dict[str, str]]:
        """Encode `gallery` (minus what `base` holds), build a faiss index (or extend `base`) and write it.

        Returns (index, how many added, skipped). The encoding cache goes once written, or refused.
        """
        cache_at = real if base is None else real.parent / f"{real.name}.add"
        flag = "-o" if base is None else "index folder"
        vectors, names, images, skipped, cache = self._index_gallery(gallery, cache_at, base, progress, strict, flag,
                                                                     str(out_dir))
        try:
            if base is None:
                index = faiss_index.build(vectors, names, images, params, self.identity(), progress=progress)
            else:
                index = base
                if names:
                    index.add(vectors, names, images, progress=progress)
            # a Milvus index holds its items already; its folder (the manifest) does not change on an add
            if base is None or (names and index.backend == "faiss"):
                index_folder.write(index, out_dir, overwrite=overwrite, flag=flag)
        except UserError:
            if cache:
                cache.remove()
            raise
        if cache:
            cache.remove()
        return index, len(names), skipped

    def load_index(self, index_dir: str | os.PathLike, ef_search: int | None = None,
                   nprobe: int | None = None) -> VectorIndex:
        """Read an index folder (faiss or Milvus), refusing one built with another run, backbone or PCA."""
        index = index_folder.read(index_dir)
        index_folder.check_identity(index, self.identity())
        index.set_search(ef_search=ef_search, nprobe=nprobe)
        return index

    def add_to_index(self, index_dir: str | os.PathLike, more: str | os.PathLike | Sequence[ImageLike],
                     progress: bool = True, strict: bool = False) -> tuple[VectorIndex, int, dict[str, str]]:
        """Append the images of `more` not yet in the index; returns (index, how many added, skipped).

        An image already there is recognised by its real path (faiss), so the same gallery reached
        through a link or `..` is not added twice; by its content (Milvus), so a rerun after a kill
        adds nothing twice.
        """
        flag = "index folder"
        index_folder.check_target(index_dir, True, flag, existing=True)  # before a lock file is made beside it
        with index_folder.locked(index_dir, flag) as real:
            index_folder.check_target(index_dir, True, flag, existing=True)
            return self._write_index(real, index_dir, self.load_index(index_dir), more, None, progress, strict, True)
