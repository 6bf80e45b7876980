"""One feature-extractor object: a backbone, its transform and taps, and what each tap gives.

`FeatureExtractor(backbone, precision, channels_last)` is built once from a loaded backbone;
it learns each tap's shape from one forward on the meta device, without arithmetic (`FeatureInfo`,
as timm's `FeatureInfo`), and turns images into per-tap features: pooled `(n, C)` vectors, or the raw
tap outputs. Both extract() (`featuresExtractor.pipeline`) and the `Encoder`
(`featuresExtractor.encode`) use it, so the model, hooks, precision, memory format and the
forward in slices are wired in one place.

Example:
    >>> from featuresExtractor.backbones import load_backbone, resolve_spec
    >>> fx = FeatureExtractor(load_backbone(resolve_spec("tiny_rn")))
    >>> [(t.name, t.pooled_dim) for t in fx.info.taps][:2]
    [('layer1', 32), ('layer2', 64)]
    >>> fx.pooled(["a.jpg"])["attnpool"].shape                 # doctest: +SKIP
    (1, 32)
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from toolkit.utils import UserError

from .backbone_base import Backbone
from .engines import ENGINES, OnnxTaps, folded_batch_norms, onnx_taps
from .pooling import global_avg_pool
from .taps import EMBEDDING, TapInfo, Taps, tap_infos
from .transforms import load_image, to_rgb

__all__ = ["CPU_SLICE", "PRECISIONS", "FeatureInfo", "FeatureExtractor", "Forwarder", "embedding_tap"]

CPU_SLICE = 32
"""On the CPU large batches only cost memory, so the forward runs in slices of this many images."""
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
"""Precision name to autocast dtype (None: full fp32, no autocast)."""


def embedding_tap(taps: Sequence[str]) -> str | None:
    """The tap that carries the image embedding (left raw by `normalize="layers"`)."""
    for name in ("attnpool", EMBEDDING):
        if name in taps:
            return name
    return None


@dataclass(frozen=True)
class FeatureInfo:
    """What a backbone's taps give, learnt once from one blank image of the model's input shape."""

    taps: tuple[TapInfo, ...]
    image_shape: tuple[int, ...]

    @classmethod
    def probe(cls, backbone: Backbone, image_shape: Sequence[int]) -> "FeatureInfo":
        """Learn each tap's shape for one `image_shape` image.

        On the meta device (`taps.tap_infos`: the library's own forward, no arithmetic) wherever the
        model runs there; else by one real forward of a blank image.
        """
        try:
            infos = tap_infos(backbone.visual, backbone.spec.taps, image_shape)
        except (RuntimeError, NotImplementedError):  # the model cannot run on the meta device: compute once
            infos = tap_infos(backbone.visual, backbone.spec.taps, image_shape, meta=False)
        return cls(infos, tuple(image_shape))

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.taps]

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Tap name to raw output shape."""
        return {t.name: t.shape for t in self.taps}

    @property
    def dims(self) -> dict[str, int]:
        """Tap name to pooled dimension."""
        return {t.name: t.pooled_dim for t in self.taps}

    @property
    def embedding(self) -> str | None:
        """The tap carrying the image embedding, if any."""
        return embedding_tap(self.names)


class Forwarder:
    """Runs images through installed taps in slices, halving the slice on CUDA out-of-memory."""

    def __init__(self, taps: Taps, device: torch.device, precision: str, slice_size: int, channels_last: bool):
        self.taps, self.device, self.slice = taps, device, max(1, slice_size)
        self.channels_last = channels_last
        self.dtype = PRECISIONS[precision]

    def _run(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = x.to(self.device, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=self.dtype or torch.bfloat16, enabled=self.dtype is not None):
            out = self.taps(x)
        return {k: v.float().cpu() if self.taps.reduce else v.to("cpu", torch.float16) for k, v in out.items()}

    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        results: list[dict[str, torch.Tensor]] = []
        start = 0
        while start < len(images):
            try:
                results.append(self._run(images[start:start + self.slice]))
                start += self.slice
            except torch.OutOfMemoryError:
                if self.slice == 1:
                    raise UserError("out of GPU memory even with one image per batch; use device cpu") from None
                self.slice //= 2
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                tqdm.write(f"out of memory: batch halved to {self.slice} images")
        return {k: torch.cat([r[k] for r in results]) for k in results[0]}


@contextlib.contextmanager
def _engine(module: torch.nn.Module, engine: str, keep: Sequence[str]) -> Iterator[torch.nn.Module]:
    """Run `module` with `engine`'s changes inside the block (folded: batch norms folded into the
    convolutions), and give it back as it was found."""
    if engine != "folded":  # torch; and onnxruntime's raw-tap fallback runs the module as it is
        yield module
        return
    with folded_batch_norms(module, keep):
        yield module


@contextlib.contextmanager
def _memory_format(module: torch.nn.Module, channels_last: bool) -> Iterator[torch.nn.Module]:
    """Run `module` in channels_last inside the block, and give it back as it was found."""
    if not channels_last:
        yield module
        return
    module.to(memory_format=torch.channels_last)
    try:
        yield module
    finally:
        module.to(memory_format=torch.contiguous_format)


class FeatureExtractor:
    """A loaded backbone ready to turn images into per-tap features.

    Args:
        backbone: from `featuresExtractor.backbones.load_backbone`; its device is where the forward runs.
        precision: `fp32`, `bf16` or `fp16` (autocast).
        channels_last: run the visual tower in channels_last memory format.
        engine: `torch` (the module as it is: the pinned bytes), `folded` (batch norms folded into the
            convolutions for the forward, `featuresExtractor.engines.folded_batch_norms`) or `onnxruntime`
            (the pooled-tap graph exported to ONNX and cached, `featuresExtractor.engines.onnx_taps`; fp32 on
            the CPU, pooled features only: raw taps run torch). Both are equal to torch within float rounding
            and faster on the CPU. `featuresExtractor.engines.resolve_engine` picks one for `auto`.

    Attributes:
        info: the `FeatureInfo` of the backbone's taps.
        engine: the engine that runs: `torch` once an onnxruntime graph could not be had (said in one line).
    """

    def __init__(self, backbone: Backbone, precision: str = "fp32", channels_last: bool = True, engine: str = "torch"):
        if precision not in PRECISIONS:
            raise UserError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        if engine not in ENGINES:
            raise UserError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
        if engine == "onnxruntime" and (precision != "fp32" or next(backbone.visual.parameters()).device.type != "cpu"):
            raise UserError(f"engine onnxruntime runs fp32 on the CPU, got {precision} on "
                            f"{next(backbone.visual.parameters()).device}")
        self.backbone, self.precision, self.channels_last, self.engine = backbone, precision, channels_last, engine
        self.device = next(backbone.visual.parameters()).device
        image_shape = tuple(backbone.transform(Image.new("RGB", (64, 64))).shape)
        self.info = FeatureInfo.probe(backbone, image_shape)
        self._onnx: OnnxTaps | None = None

    def _onnx_taps(self) -> OnnxTaps | None:
        """The onnxruntime graph, built (or taken from the cache) on first use; None, and the engine set
        to torch, when none could be had."""
        if self._onnx is None and self.engine == "onnxruntime":
            try:
                self._onnx = onnx_taps(self.backbone, self.info.image_shape)
            except UserError as err:  # a model torch cannot export: the extraction goes on in torch
                tqdm.write(f"engine onnxruntime: {err}; running torch's engine instead")
            if self._onnx is None:
                self.engine = "torch"
        return self._onnx

    @property
    def transform(self):
        """The model's own eval transform (PIL image -> tensor)."""
        return self.backbone.transform

    def slice_size(self, batch_size: int) -> int:
        """Images per forward: the whole batch on CUDA, at most `CPU_SLICE` on the CPU."""
        return batch_size if self.device.type == "cuda" else min(batch_size, CPU_SLICE)

    @contextlib.contextmanager
    def running(self, pooled: bool = True, slice_size: int = CPU_SLICE) -> Iterator[Forwarder]:
        """Install the taps and yield a `Forwarder`: `(n, 3, H, W)` tensor -> tap -> features on the CPU.

        Pooled features are float32 `(n, C)`; raw ones float16 `(n, *shape)`. The hooks are removed
        and the model's memory format restored on leaving the block.
        """
        graph = self._onnx_taps() if pooled else None
        if graph is not None:
            with torch.inference_mode():
                yield Forwarder(graph, self.device, "fp32", slice_size, channels_last=False)
            return
        reduce = global_avg_pool if pooled else None
        visual = self.backbone.visual
        with _engine(visual, self.engine, self.backbone.spec.taps), _memory_format(visual, self.channels_last), \
                torch.inference_mode(), Taps(visual, self.backbone.spec.taps, reduce=reduce) as taps:
            yield Forwarder(taps, self.device, self.precision, slice_size, self.channels_last)

    def preprocess(self, images: Sequence[str | os.PathLike | Image.Image]) -> torch.Tensor:
        """Decode (paths) and transform images into one `(n, 3, H, W)` tensor."""
        return torch.stack([self.transform(to_rgb(im) if isinstance(im, Image.Image) else load_image(im))
                            for im in images])

    def pooled(self, images: Sequence[str | os.PathLike | Image.Image], slice_size: int = CPU_SLICE) -> dict[str, np.ndarray]:
        """Tap -> `(n, C)` float32 pooled vectors for images (paths or PIL images), unflipped.

        Raises `featuresExtractor.transforms.BadImage` for an unreadable image.
        """
        tensors = self.preprocess(images)
        with self.running(pooled=True, slice_size=slice_size) as forward:
            out = forward(tensors)
        return {k: v.numpy() for k, v in out.items()}
