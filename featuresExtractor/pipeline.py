"""The extraction loop: images -> tapped, pooled features -> processor outputs.

`extract(config, backbone)` is what extract.py runs once it has parsed its
arguments and loaded the backbone. It is resumable: finished batches are kept in
`MODEL/.partial/`, and the final files plus `manifest.json` (written last) appear
only when every image has been seen.

Example:
    >>> from featuresExtractor.backbones import load_backbone, resolve_spec
    >>> cfg = ExtractConfig(dataset="TLL", save_to="out", processor=("adapt-pca", "256"), data_aug=True)
    >>> report = extract(cfg, load_backbone(resolve_spec(cfg.model)))   # doctest: +SKIP
    >>> report.outputs                                                  # doctest: +SKIP
    ['out/clip_rn50x4/features.npy', 'out/clip_rn50x4/features_pca256.npy', ...]
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import platform
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .dataset import ImageItems, Layout, discover
from .backbones import EMBEDDING, Backbone
from .pca import save_pca
from .pooling import global_avg_pool
from .processor import Processor, check_components, parse_processor, process
from .pairs_file import make_records
from .store import ChunkStore
from .taps import Taps
from .transforms import hflip
from toolkit.utils import UserError, default_workers, read_json, save_npy, write_json

__all__ = ["ExtractConfig", "Report", "extract", "embedding_tap", "probe_taps", "Forwarder", "memory_format"]

MANIFEST = "manifest.json"
FORMAT = "featuresExtractor/1"
#: On the CPU large batches only cost memory, so the forward runs in slices of this many images.
CPU_SLICE = 32


@dataclass(frozen=True)
class ExtractConfig:
    """Everything extract.py was asked to do, as plain values."""

    dataset: str
    save_to: str
    processor: tuple[str, ...] = ("adapt-pca", "256")
    normalize: str | None = None
    data_aug: bool = False
    precision: str = "fp32"
    batch_size: int = 2048
    workers: int = field(default_factory=default_workers)
    device: str = "cpu"
    channels_last: bool = True
    strict: bool = False
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        # Checked on construction, so extract.py refuses bad values before it loads a model.
        if self.batch_size < 1:
            raise UserError(f"batch_size must be at least 1 (got {self.batch_size})")
        if self.workers < 0:
            raise UserError(f"workers must be 0 or more (got {self.workers})")
        parse_processor(self.processor, self.normalize)


@dataclass
class Report:
    """What a run did: output folder and files, counts, skipped items."""

    out_dir: Path
    already_done: bool = False
    outputs: list[str] = field(default_factory=list)
    n_items: int = 0
    n_kept: int = 0
    skipped: dict[str, str] = field(default_factory=dict)  # item name -> reason
    resumed_items: int = 0


def embedding_tap(taps: Sequence[str]) -> str | None:
    """The tap that carries the image embedding (left raw by `--normalize layers`)."""
    for name in ("attnpool", EMBEDDING):
        if name in taps:
            return name
    return None


def probe_taps(backbone: Backbone, image_shape: Sequence[int]) -> tuple[dict[str, tuple[int, ...]], dict[str, int]]:
    """Run one blank image to learn each tap's raw output shape and pooled dimension."""
    device = next(backbone.visual.parameters()).device
    with Taps(backbone.visual, backbone.spec.taps) as taps, torch.inference_mode():
        out = taps(torch.zeros(1, *image_shape, device=device))
    return ({name: tuple(t.shape[1:]) for name, t in out.items()},
            {name: int(global_avg_pool(t).shape[1]) for name, t in out.items()})


@contextlib.contextmanager
def memory_format(module: torch.nn.Module, channels_last: bool):
    """Run `module` in channels_last inside the block, and give it back as it was found."""
    if not channels_last:
        yield module
        return
    module.to(memory_format=torch.channels_last)
    try:
        yield module
    finally:
        module.to(memory_format=torch.contiguous_format)


class Forwarder:
    """Runs images through the taps in slices, halving the slice on CUDA out-of-memory."""

    def __init__(self, taps: Taps, device: torch.device, precision: str, slice_size: int, channels_last: bool):
        self.taps, self.device, self.slice = taps, device, max(1, slice_size)
        self.channels_last = channels_last
        self.dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]

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


def _versions() -> dict[str, str]:
    import open_clip
    import PIL
    import sklearn

    return {"python": platform.python_version(), "torch": torch.__version__, "open_clip": open_clip.__version__,
            "numpy": np.__version__, "scikit-learn": sklearn.__version__, "pillow": PIL.__version__}


def _fingerprint(cfg: ExtractConfig, backbone: Backbone, proc: Processor, layout: Layout) -> dict:
    # Only what changes the numbers: batch size, workers and device do not.
    weights = {k: v for k, v in backbone.weights.items() if k in ("source", "tag", "sha256", "seed")}
    # Chunks refer to items by position in the sorted name list, so the list itself must not change
    # under a resumed run: its hash is part of the configuration.
    items = hashlib.sha256("\n".join(layout.names).encode()).hexdigest()
    return {"dataset": str(layout.root.resolve()), "items": {"count": len(layout), "names_sha256": items}, "model": backbone.spec.name, "arch": backbone.spec.arch,
            "weights": weights, "taps": list(backbone.spec.taps), "processor": proc.name,
            "n_components": proc.n_components, "normalize": proc.normalize, "data_aug": cfg.data_aug,
            "precision": cfg.precision}


def _check_disk(out_dir: Path, n_items: int, per_item_values: int) -> int:
    need = n_items * per_item_values * 2  # float16
    probe = out_dir
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    print(f"save: raw tap outputs will take {need / 2**30:.2f} GiB; {free / 2**30:.2f} GiB free", file=sys.stderr)
    if need > free:
        raise UserError(f"not enough disk for processor save: need {need / 2**30:.2f} GiB, {free / 2**30:.2f} GiB free "
                        f"under {probe}; free some space or pick another -s")
    return need


def _remove(target: Path) -> None:
    if target.is_dir():
        shutil.rmtree(target)
    elif target.exists():
        target.unlink()


def _prepare_out_dir(out_dir: Path, fingerprint: dict, overwrite: bool) -> tuple[bool, list[str]]:
    """(already done, outputs of an earlier configuration that --overwrite will replace).

    Those outputs stay in place until the new results are written, so a run that fails
    or is interrupted leaves the earlier results as they were.
    """
    manifest = out_dir / MANIFEST
    replaced: list[str] = []
    if manifest.is_file():
        old = read_json(manifest)
        if old.get("config") == fingerprint and not overwrite:
            return True, []
        if not overwrite:
            changed = sorted(k for k in fingerprint if old.get("config", {}).get(k) != fingerprint[k])
            raise UserError(f"{out_dir} already holds features from another configuration (differs in: "
                            f"{', '.join(changed)}); pass --overwrite to replace them or choose another -s")
        replaced = list(old.get("outputs", {}))
    store = ChunkStore(out_dir / ".partial")
    previous = store.config()
    if previous is not None and previous != fingerprint:
        if not overwrite:
            raise UserError(f"{out_dir} holds an interrupted run with another configuration; re-run that command "
                            f"to finish it, or pass --overwrite to discard it")
        store.remove()
    return False, replaced


def extract(cfg: ExtractConfig, backbone: Backbone) -> Report:
    """Extract features for `cfg.dataset` with `backbone` and write them under `cfg.save_to/MODEL/`.

    Returns a `Report`. Raises `UserError` for bad input, before anything is written
    (with `strict`, also for an unreadable image, removing what this run wrote).
    """
    proc = parse_processor(cfg.processor, cfg.normalize)
    layout = discover(cfg.dataset)
    blocking = next((p for p in (Path(cfg.save_to), *Path(cfg.save_to).parents) if p.exists()), None)
    if blocking is not None and not blocking.is_dir():
        raise UserError(f"-s {cfg.save_to}: {blocking} is a file, not a folder; choose another -s")
    n_flips = 2 if cfg.data_aug else 1
    image_shape = tuple(backbone.transform(Image.new("RGB", (64, 64))).shape)
    shapes, dims = probe_taps(backbone, image_shape)
    check_components(proc, len(layout) * len(layout.sides) * n_flips, dims)

    out_dir = Path(cfg.save_to) / backbone.spec.name
    fingerprint = _fingerprint(cfg, backbone, proc, layout)
    report = Report(out_dir=out_dir, n_items=len(layout))
    done_before, replaced = _prepare_out_dir(out_dir, fingerprint, cfg.overwrite)
    if done_before:
        report.already_done = True
        return report
    if not proc.pooled and "raw" in replaced:
        # -p save writes raw/ file by file while it runs, so old raw outputs cannot wait.
        _remove(out_dir / "raw")
        replaced.remove("raw")

    store = ChunkStore(out_dir / ".partial")
    done = store.done()
    todo = [i for i in range(len(layout)) if i not in done]
    report.resumed_items = len(done)
    if not proc.pooled:
        values = sum(int(np.prod(s)) for s in shapes.values()) * len(layout.sides) * n_flips
        _check_disk(out_dir, len(todo), values)

    device = next(backbone.visual.parameters()).device
    fresh = not store.folder.exists()
    written: list[Path] = []
    images_per_item = len(layout.sides) * n_flips
    slice_size = cfg.batch_size if device.type == "cuda" else min(cfg.batch_size, CPU_SLICE)
    items_per_batch = max(1, min(slice_size // images_per_item, 256)) if device.type != "cuda" \
        else max(1, cfg.batch_size // images_per_item)
    loader = DataLoader(ImageItems(layout, backbone.transform, todo, image_shape), batch_size=items_per_batch,
                        num_workers=cfg.workers, pin_memory=device.type == "cuda",
                        persistent_workers=False)
    bar = tqdm(total=len(layout) * images_per_item, initial=len(done) * images_per_item, unit="img",
               desc=f"extract {backbone.spec.name}", disable=not cfg.progress, dynamic_ncols=True)
    reduce = global_avg_pool if proc.pooled else None
    try:
        with memory_format(backbone.visual, cfg.channels_last), torch.inference_mode(), \
                Taps(backbone.visual, backbone.spec.taps, reduce=reduce) as taps:
            forward = Forwarder(taps, device, cfg.precision, slice_size, cfg.channels_last)
            for batch in loader:
                indices = batch["index"].tolist()
                skipped = [(i, e) for i, e in zip(indices, batch["error"]) if e]
                if skipped and cfg.strict:
                    i, e = skipped[0]
                    raise UserError(f"unreadable image in item {layout.names[i]!r}: {e} (strict; drop strict "
                                    f"to skip such pairs and list them in the manifest)")
                if not written and not store.folder.exists():
                    store.start(fingerprint)
                x = batch["images"]  # (B, sides, 3, H, W)
                if cfg.data_aug:
                    x = torch.stack([x, hflip(x)], dim=2)
                else:
                    x = x.unsqueeze(2)
                feats = forward(x.flatten(0, 2))
                feats = {k: v.reshape(len(indices), len(layout.sides), n_flips, *v.shape[1:]) for k, v in feats.items()}
                if proc.pooled:
                    written.append(store.write(indices, {k: v.numpy() for k, v in feats.items()}, skipped))
                else:
                    bad = {i for i, _ in skipped}
                    for row, i in enumerate(indices):
                        if i not in bad:
                            for tap, v in feats.items():
                                save_npy(out_dir / "raw" / tap / f"{i:06d}.npy", v[row].numpy())
                    written.append(store.write(indices, {}, skipped))
                bar.update(len(indices) * images_per_item)
    except UserError:
        for path in written:
            path.unlink(missing_ok=True)
        if fresh:
            store.remove()
            shutil.rmtree(out_dir / "raw", ignore_errors=True)
            if out_dir.is_dir() and not any(out_dir.iterdir()):
                out_dir.rmdir()
        raise
    finally:
        bar.close()

    if not store.folder.exists():  # nothing left to do and no chunks: an empty resume
        store.start(fingerprint)
    kept, pooled, skipped = store.load()
    kept_list = kept.tolist() if len(kept) else []
    if not proc.pooled:
        kept_list = sorted(set(range(len(layout))) - set(skipped))
    report.n_kept = len(kept_list)
    report.skipped = {layout.names[i]: r for i, r in sorted(skipped.items())}
    if not kept_list:
        store.remove()
        raise UserError(f"every item of {layout.root} was unreadable; nothing to save")
    names = [layout.names[i] for i in kept_list]

    outputs: dict[str, dict] = {}
    # From here the folder holds a mix until the new manifest is written: drop the old one first.
    (out_dir / MANIFEST).unlink(missing_ok=True)
    if proc.pooled:
        check_components(proc, len(kept_list) * len(layout.sides) * n_flips, dims)
        result = process(proc, pooled, embedding_tap(backbone.spec.taps))
        for file, vectors in result.vectors.items():
            save_npy(out_dir / file, make_records(names, vectors, layout.sides))
            outputs[file] = {"kind": "features", "rows": len(names) * n_flips, "dim": int(vectors.shape[-1]),
                             "fields": ["name", "augmented", *layout.sides],
                             "parts": {k: list(v) for k, v in result.parts.get(file, {}).items()}}
        for stem, pca in result.pcas.items():
            for path in save_pca(out_dir / stem, pca):
                rel = str(path.relative_to(out_dir))
                outputs[rel] = {"kind": "pca", "n_components": proc.n_components, "in_dim": int(pca.n_features_in_),
                                "explained_variance": float(np.sum(pca.explained_variance_ratio_)),
                                "pickle": path.suffix == ".pkl"}
    else:
        outputs["raw"] = {"kind": "raw", "dtype": "float16", "layout": "raw/{tap}/{row:06d}.npy",
                          "axes": ["side", "flip", "..."], "shapes": {k: list(v) for k, v in shapes.items()},
                          "rows": {f"{i:06d}": layout.names[i] for i in kept_list}}

    manifest = {
        "format": FORMAT,
        "config": fingerprint,
        "random_init": backbone.weights["source"] == "random-init",
        "model": {"name": backbone.spec.name, "arch": backbone.spec.arch, "pretrained": backbone.spec.pretrained,
                  "weights": backbone.weights, "embedding_tap": embedding_tap(backbone.spec.taps),
                  "taps": [{"name": k, "shape": list(v), "pooled_dim": dims[k]} for k, v in shapes.items()],
                  "transform": repr(backbone.transform)},
        "processor": {"name": proc.name, "n_components": proc.n_components, "normalize": proc.normalize},
        "augmentation": {"hflip": cfg.data_aug, "applied_to": "preprocessed tensor"},
        "precision": cfg.precision, "device": str(device), "channels_last": cfg.channels_last,
        "batch_size": cfg.batch_size,
        "dataset": {"path": str(layout.root.resolve()), "kind": layout.kind, "sides": list(layout.sides),
                    "ignored_files": list(layout.ignored)},
        "counts": {"items_found": len(layout), "items_kept": len(kept_list), "items_skipped": len(skipped),
                   "rows_per_file": len(kept_list) * n_flips,
                   "images_seen": len(layout) * len(layout.sides) * n_flips},
        "skipped": [{"name": layout.names[i], "reason": r} for i, r in sorted(skipped.items())],
        "outputs": outputs,
        "versions": _versions(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    write_json(out_dir / MANIFEST, manifest)
    for rel in set(replaced) - set(outputs):
        _remove(out_dir / rel)
    store.remove()
    report.outputs = [str(out_dir / rel) for rel in outputs] + [str(out_dir / MANIFEST)]
    return report
