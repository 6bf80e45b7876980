"""Export a trained adaptation to ONNX: the whole image-to-embedding path of a run as one graph.

`export_run(sim, out_dir, ExportConfig())` takes a `VisualSimilarity` loaded with `from_run`
and writes the folder `retrieval.deploy` owns (encoder.onnx, preprocess.json, manifest.json):

- `EmbeddingGraph` is the run's path as one torch module, built from the modules
  `VisualSimilarity` itself runs: the backbone's taps (`featuresExtractor.taps.Taps`), pooling
  (`featuresExtractor.pooling.global_avg_pool`), the processor's per-part normalisation,
  concatenation and PCA (`featuresExtractor.processor.Processor.project`), the adaptation model, and an L2
  normalisation (`l2_normalize`). It runs in fp32; `torch.onnx.export` (the torch.export-based
  exporter, which needs onnxscript) turns it into encoder.onnx.
- `describe_transform` reads the backbone's own eval transform (open_clip's and timm's
  `Compose`, torchvision's `ImageClassification`) into a `deploy.Preprocess`. The paper's
  transform (`--transform paper`: a tensor squeeze without antialiasing) has no such description.
- The manifest records the opset the graph really has, read from it: torch's exporter writes no
  opset below its own (18 here) and, above the highest it converts to, leaves the graph at its
  own opset with operators of later ones, which is refused in one line.
- The export then checks itself: the graph, run by onnxruntime on images preprocessed by
  `Preprocess` (no torch), against `VisualSimilarity.embed` on the same images (`probe_images`, or
  `check_images`), at batch 1 and at the whole set when the batch is dynamic. The minimum
  cosine must reach `MIN_COSINE`; otherwise nothing is written.

Example:
    >>> from retrieval.visual_similarity import VisualSimilarity
    >>> sim = VisualSimilarity.from_run("runs/run1", device="cpu")                 # doctest: +SKIP
    >>> export_run(sim, "run1_onnx", ExportConfig(dynamic_batch=True))["check"]    # doctest: +SKIP
    {'images': 8, 'source': 'drawn', 'min_cosine': 0.99999994, 'batches': [1, 8]}
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from featuresExtractor.onnx_graph import DEFAULT_OPSET, write_graph
from featuresExtractor.pooling import global_avg_pool, l2_normalize
from featuresExtractor.taps import Taps
from featuresExtractor.transforms import BadImage, load_image
from toolkit.utils import UserError

from . import deploy
from .deploy import EXTRA, OnnxEncoder, Preprocess

__all__ = ["ExportConfig", "EmbeddingGraph", "describe_transform", "export_run", "MIN_COSINE", "DEFAULT_OPSET"]

MIN_COSINE = 0.9999
"""The export is refused when the graph and the torch path agree less than this on any check image."""
CHECK_DRAWN = 8  # check images drawn by `probe_images` when none are given
PROBE_SIZES = ((200, 250), (250, 200), (224, 224), (131, 97))  # (width, height)
CHECK_LIMIT = 64  # at most this many images of --check-images are used


@dataclass(frozen=True)
class ExportConfig:
    """How to export.

    Attributes:
        opset: the ONNX opset.
        dynamic_batch: a graph taking any batch size (else a fixed batch of 1).
        check_images: a folder (or image list file) of images for the check; None: `probe_images`.
        overwrite: replace an existing export folder (never one holding other files).
    """

    opset: int = DEFAULT_OPSET
    dynamic_batch: bool = False
    check_images: str | None = None
    overwrite: bool = False


class EmbeddingGraph(nn.Module):
    """Preprocessed images (N, 3, H, W) float32 -> the run's adapted, L2-normalised embeddings (N, D).

    The same steps as `VisualSimilarity.embed` (`Encoder.encode` then the model), in fp32, as one module.
    """

    def __init__(self, encoder, model: nn.Module):
        super().__init__()
        self.visual, self.model = encoder.backbone.visual, model
        self.taps = tuple(encoder.backbone.spec.taps)
        self.processor, self.pcas, self.output = encoder.processor, encoder.pcas, encoder.output
        self.embedding = encoder.extractor.info.embedding

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with Taps(self.visual, self.taps, reduce=global_avg_pool) as taps:
            pooled = taps(images)
        vectors = self.processor.project(pooled, self.embedding, self.pcas)[self.output]
        return l2_normalize(self.model(vectors))


def _interpolation(mode) -> str:
    name = getattr(mode, "value", mode)
    if name not in deploy.INTERPOLATIONS:
        raise UserError(f"the backbone's transform resizes with {name!r} interpolation, which preprocess.json cannot "
                        f"describe (known: {', '.join(deploy.INTERPOLATIONS)})")
    return name


def _pair(size) -> tuple[int, int]:
    size = [int(s) for s in ([size] if isinstance(size, int) else size)]
    return (size[0], size[0]) if len(size) == 1 else (size[0], size[1])


# Steps that only turn an RGB PIL image into a [0, 1] float tensor (what Preprocess does after the crop).
_TO_TENSOR = ("ToTensor", "MaybeToTensor", "_convert_to_rgb")


def describe_transform(transform) -> Preprocess:
    """A backbone's eval transform (PIL image -> tensor) as a `Preprocess`; a `UserError` for a step it cannot describe.

    Reads torchvision `Resize` (no max_size), `CenterCrop`, `Normalize` and the to-tensor steps of
    open_clip / timm `Compose`s, and torchvision's `ImageClassification`.
    """
    from torchvision import transforms as T
    from torchvision.transforms._presets import ImageClassification

    if isinstance(transform, ImageClassification):
        size = transform.resize_size
        return Preprocess(size[0] if len(size) == 1 else tuple(size), _interpolation(transform.interpolation),
                          _pair(transform.crop_size), tuple(map(float, transform.mean)), tuple(map(float, transform.std)))
    found: dict = {}
    for step in getattr(transform, "transforms", [transform]):
        name = getattr(step, "__name__", type(step).__name__)
        if isinstance(step, T.Resize) and step.max_size is None and "resize" not in found:
            size = step.size
            found["resize"] = size if isinstance(size, int) else (size[0] if len(size) == 1 else tuple(size))
            found["interpolation"] = _interpolation(step.interpolation)
        elif isinstance(step, T.CenterCrop) and "crop" not in found:
            found["crop"] = _pair(step.size)
        elif isinstance(step, T.Normalize) and "mean" not in found:
            found["mean"], found["std"] = (tuple(map(float, v.tolist() if hasattr(v, "tolist") else v))
                                           for v in (step.mean, step.std))
        elif name in _TO_TENSOR or (name == "MaybeConvertMode" and getattr(step, "mode", None) == "RGB"):
            continue
        else:
            raise UserError(f"the backbone's transform has a step preprocess.json cannot describe: {step!r}; the "
                            f"export supports Resize, CenterCrop, ToTensor and Normalize")
    missing = [k for k in ("resize", "crop", "mean") if k not in found]
    if missing:
        raise UserError(f"the backbone's transform has no {' / '.join(missing)} step; preprocess.json needs them")
    return Preprocess(found["resize"], found["interpolation"], found["crop"], found["mean"], found["std"])


def _packages() -> dict[str, str]:
    """The export's packages and their versions; a `UserError` naming the extra when one is missing."""
    versions = {"torch": torch.__version__}
    for name in ("onnx", "onnxscript", "onnxruntime"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            raise UserError(f"{name} is not installed: {EXTRA}") from None
    return versions


def graph_opset(path: Path) -> int:
    """The ONNX opset (default domain) a saved graph declares."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def _check_opset(wanted: int, real: int) -> None:
    """Refuse a graph left below the opset asked for (its conversion upward failed; seen: an opset-23 operator
    in a graph that says opset 18, which onnxruntime refuses)."""
    if real < wanted:
        raise UserError(f"torch {torch.__version__.split('+')[0]} cannot export at opset {wanted}: its exporter could "
                        f"not convert the graph to it (it is left at opset {real}); choose a lower --opset (the "
                        f"default {DEFAULT_OPSET} is the one it writes natively)")


def _preprocess(sim) -> Preprocess:
    """`describe_transform` of the run's transform; a refusal naming `--transform paper` when the run used it."""
    try:
        return describe_transform(sim.encoder.extractor.transform)
    except UserError:
        if getattr(sim.encoder.backbone, "transform_choice", "library") != "paper":
            raise
        data = sim.checkpoint.get("config", {}).get("data", "its features file")
        raise UserError(f"the run was trained on features extracted with --transform paper ({data}): the paper's "
                        f"224 x 224 squeeze of the tensor, without antialiasing or crop, which an export's "
                        f"preprocess.json (Pillow) cannot reproduce; to export, extract the images again with "
                        f"--transform library (the default) and train on those features") from None


def check_images(source: str | None) -> tuple[list, str]:
    """(images, source label) for the check: `probe_images`, or up to `CHECK_LIMIT` images of a folder or list."""
    if source is None:
        return probe_images(CHECK_DRAWN), "drawn"
    from .visual_similarity import gallery_items

    images = []
    for name, path in gallery_items(source)[:CHECK_LIMIT]:
        try:
            images.append(load_image(path))
        except BadImage as err:
            raise UserError(f"--check-images: cannot read {name}: {err}") from None
    return images, str(source)


def probe_images(n: int, seed: int = 0) -> list[Image.Image]:
    """`n` RGB images drawn from a seeded generator, the same on every machine: the export's own check images.

    Each is a coarse random colour field (a few blocks, resized bilinearly) plus fine pixel noise, so both
    smooth regions and edges reach the backbone; sizes cycle through `PROBE_SIZES` (portrait, landscape,
    square, odd) so the check covers the resize and the centre crop of `Preprocess`, not only the graph.
    """
    rng = np.random.default_rng(seed)
    images = []
    for i in range(n):
        width, height = PROBE_SIZES[i % len(PROBE_SIZES)]
        coarse = Image.fromarray(rng.integers(0, 256, (5, 4, 3), dtype=np.uint8), "RGB")
        smooth = np.asarray(coarse.resize((width, height), Image.BILINEAR), dtype=np.int16)
        fine = rng.integers(-24, 25, (height, width, 3), dtype=np.int16)
        images.append(Image.fromarray(np.clip(smooth + fine, 0, 255).astype(np.uint8), "RGB"))
    return images


def agreement(sim, encoder: OnnxEncoder, images: Sequence[Image.Image], batches: Sequence[int]) -> float:
    """The minimum cosine between the torch path (`sim.embed`) and the graph (`encoder`) over `images`,
    the graph run at each batch size in `batches`."""
    want = l2_normalize(sim.embed(images).numpy())
    x = encoder.preprocess.batch(images)
    worst = 1.0
    for b in batches:
        got = np.concatenate([encoder.session.run(None, {"images": x[s:s + b]})[0] for s in range(0, len(x), b)])
        worst = min(worst, float(np.min(np.sum(l2_normalize(got) * want, axis=1))))
    return worst


def export_run(sim, out_dir: str | os.PathLike, config: ExportConfig = ExportConfig()) -> dict:
    """Export a run loaded by `VisualSimilarity.from_run` into `out_dir`; returns the manifest written.

    Raises `UserError` (nothing written) when a package is missing, the backbone or its transform
    cannot be exported, the check fails, or `out_dir` cannot be written or holds other files.
    """
    out_dir = Path(out_dir)
    if sim.onnx or str(sim.device) != "cpu":
        raise UserError("export a run loaded on the CPU: VisualSimilarity.from_run(RUN, device='cpu')")
    deploy.check_target(out_dir, config.overwrite)
    versions = _packages()
    images, source = check_images(config.check_images)  # bad check images are refused before the slow export
    preprocess = _preprocess(sim)
    graph = EmbeddingGraph(sim.encoder, sim.model).cpu().float().eval()
    identity = sim.identity()
    arch = identity["backbone"]["arch"]
    batch = None if config.dynamic_batch else 1
    manifest = {"identity": identity, "embedding_dim": identity["out_dim"], "batch": batch, "opset": config.opset,
                "threshold": sim.checkpoint.get("threshold"), "versions": versions, "input": "images",
                "output": "embedding"}
    with deploy.staged(out_dir, config.overwrite) as tmp:
        write_graph(graph, tmp / deploy.ENCODER_FILE, (3, *preprocess.crop), config.opset, config.dynamic_batch, arch)
        manifest["opset"] = graph_opset(tmp / deploy.ENCODER_FILE)  # what the graph has, not what was asked
        _check_opset(config.opset, manifest["opset"])
        deploy.write_meta(tmp, preprocess, manifest)
        try:
            encoder = OnnxEncoder.load(tmp)
        except deploy.GraphLoadError as err:  # the graph is gone with the staging folder: no path, no "export again"
            raise UserError(f"onnxruntime cannot load the graph torch exported at opset {manifest['opset']} "
                            f"({err.reason}); choose another --opset (the default is {DEFAULT_OPSET}); nothing was "
                            f"written") from None
        batches = [1, len(images)] if config.dynamic_batch else [1]
        cosine = agreement(sim, encoder, images, batches)
        manifest["check"] = {"images": len(images), "source": source, "min_cosine": cosine, "batches": batches,
                             "required": MIN_COSINE}
        if not cosine >= MIN_COSINE:  # NaN fails too
            raise UserError(f"the export disagrees with the run's torch path: minimum cosine {cosine:.6f} < "
                            f"{MIN_COSINE} on {len(images)} {source} image(s) (extraction precision "
                            f"{identity['backbone']['precision']}; the graph is fp32); nothing was written")
        deploy.write_meta(tmp, preprocess, manifest)
    return deploy.read_manifest(out_dir)
