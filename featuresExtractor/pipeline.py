"""The extraction loop: images -> tapped, pooled features -> processor outputs.

`extract(config, backbone)` is what extract.py runs once it has parsed its
arguments and loaded the backbone. It is resumable: finished batches are kept in
`MODEL/.partial/`, and the final files plus `manifest.json` (written last) appear
only when every image has been seen. The manifest is written and read (`read_manifest`) here.

Example:
    >>> from featuresExtractor.backbones import load_backbone, resolve_spec
    >>> cfg = ExtractConfig(dataset="TLL", save_to="out", processor=("adapt-pca", "256"), data_aug=True)
    >>> report = extract(cfg, load_backbone(resolve_spec("clip_rn50x4")))   # doctest: +SKIP
    >>> report.outputs                                                  # doctest: +SKIP
    ['out/clip_rn50x4/features.npy', 'out/clip_rn50x4/features_pca256.npy', ...]
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
import platform
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .dataset import ImageItems, Layout, discover
from .distributed import Ranks
from .backbones import Backbone
from .extractor import FeatureExtractor
from .merge import write_outputs
from .processor import Processor, check_components, parse_processor
from .store import ChunkStore
from .transforms import hflip
from toolkit.utils import UserError, default_workers, read_json, save_npy, write_json

__all__ = ["ExtractConfig", "Report", "extract", "MANIFEST", "read_manifest"]

MANIFEST = "manifest.json"
FORMAT = "featuresExtractor/1"


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
    items = {"count": len(layout), "names_sha256": hashlib.sha256("\n".join(layout.names).encode()).hexdigest()}
    if layout.paths is not None:  # a list: where each item's files are is part of what was extracted
        items["paths_sha256"] = hashlib.sha256("\n".join("\t".join(p) for p in layout.paths).encode()).hexdigest()
    return {"dataset": str(layout.root.resolve()), "items": items, "model": backbone.spec.name, "arch": backbone.spec.arch,
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


def _out_dir(cfg: ExtractConfig, fx: FeatureExtractor, proc: Processor, layout: Layout, n_flips: int) -> Path:
    """Check what can be checked before anything is written; the model's output folder."""
    blocking = next((p for p in (Path(cfg.save_to), *Path(cfg.save_to).parents) if p.exists()), None)
    if blocking is not None and not blocking.is_dir():
        raise UserError(f"-s {cfg.save_to}: {blocking} is a file, not a folder; choose another -s")
    check_components(proc, len(layout) * len(layout.sides) * n_flips, fx.info.dims)
    return Path(cfg.save_to) / fx.backbone.spec.name


def _loader(cfg: ExtractConfig, fx: FeatureExtractor, layout: Layout, todo: list[int], images_per_item: int) -> DataLoader:
    """Batches of items, sized so that one batch is one forward on CUDA and a few slices on the CPU."""
    if fx.device.type == "cuda":
        items_per_batch = max(1, cfg.batch_size // images_per_item)
    else:
        items_per_batch = max(1, min(fx.slice_size(cfg.batch_size) // images_per_item, 256))
    return DataLoader(ImageItems(layout, fx.transform, todo, fx.info.image_shape), batch_size=items_per_batch,
                      num_workers=cfg.workers, pin_memory=fx.device.type == "cuda", persistent_workers=False)


def _store_batch(batch: dict, forward, cfg: ExtractConfig, layout: Layout, store: ChunkStore, pooled: bool,
                 out_dir: Path) -> Path:
    """Forward one batch (with flipped copies) and write its chunk; raw outputs go to `raw/` as they come."""
    indices = batch["index"].tolist()
    skipped = [(i, e) for i, e in zip(indices, batch["error"]) if e]
    x = batch["images"]  # (B, sides, 3, H, W)
    x = torch.stack([x, hflip(x)], dim=2) if cfg.data_aug else x.unsqueeze(2)
    feats = forward(x.flatten(0, 2))
    feats = {k: v.reshape(len(indices), len(layout.sides), x.shape[2], *v.shape[1:]) for k, v in feats.items()}
    if pooled:
        return store.write(indices, {k: v.numpy() for k, v in feats.items()}, skipped)
    bad = {i for i, _ in skipped}
    for row, i in enumerate(indices):
        if i not in bad:
            for tap, v in feats.items():
                save_npy(out_dir / "raw" / tap / f"{i:06d}.npy", v[row].numpy())
    return store.write(indices, {}, skipped)


def _check_strict(batch: dict, layout: Layout) -> None:
    for i, e in zip(batch["index"].tolist(), batch["error"]):
        if e:
            raise UserError(f"unreadable image in item {layout.names[i]!r}: {e} (strict; drop strict "
                            f"to skip such pairs and list them in the manifest)")


def _run_batches(cfg: ExtractConfig, fx: FeatureExtractor, proc: Processor, layout: Layout, out_dir: Path,
                 ranks: Ranks) -> int:
    """Forward every item of this rank's shard not yet in the chunk store into it; returns how many were there.

    On a `UserError` (`strict`), the chunks this rank wrote are removed again.
    """
    store = ChunkStore(out_dir / ".partial")
    shard = ranks.shard(len(layout))
    done = store.done()
    todo = [i for i in shard if i not in done]
    images_per_item = len(layout.sides) * (2 if cfg.data_aug else 1)
    written: list[Path] = []
    bar = tqdm(total=len(shard) * images_per_item, initial=(len(shard) - len(todo)) * images_per_item, unit="img",
               desc=" ".join(filter(None, [f"extract {fx.backbone.spec.name}", ranks.label])),
               disable=not cfg.progress, dynamic_ncols=True, position=ranks.rank)
    try:
        with fx.running(pooled=proc.pooled, slice_size=fx.slice_size(cfg.batch_size)) as forward:
            for batch in _loader(cfg, fx, layout, todo, images_per_item):
                if cfg.strict:
                    _check_strict(batch, layout)
                written.append(_store_batch(batch, forward, cfg, layout, store, proc.pooled, out_dir))
                bar.update(len(batch["index"]) * images_per_item)
    except UserError:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    finally:
        bar.close()
    return len(shard) - len(todo)


def _start_store(out_dir: Path, fingerprint: dict) -> bool:
    """Create the chunk store before any rank writes into it; whether it is new."""
    store = ChunkStore(out_dir / ".partial")
    if store.folder.exists():
        return False
    store.start(fingerprint)
    return True


def _drop_fresh_store(out_dir: Path) -> None:
    """After a failed first run: remove what it created, so nothing looks like a run to resume."""
    ChunkStore(out_dir / ".partial").remove()
    shutil.rmtree(out_dir / "raw", ignore_errors=True)
    if out_dir.is_dir() and not any(out_dir.iterdir()):
        out_dir.rmdir()


def _manifest(cfg: ExtractConfig, fx: FeatureExtractor, proc: Processor, layout: Layout, fingerprint: dict,
              kept: list[int], skipped: dict[int, str], outputs: dict[str, dict]) -> dict:
    """The manifest.json of a finished extraction (written last: its presence means done)."""
    backbone, n_flips = fx.backbone, 2 if cfg.data_aug else 1
    return {
        "format": FORMAT,
        "config": fingerprint,
        "random_init": backbone.weights["source"] == "random-init",
        "model": {"name": backbone.spec.name, "arch": backbone.spec.arch, "pretrained": backbone.spec.pretrained,
                  "library": backbone.spec.library, "identifier": backbone.spec.arch,
                  "weights": backbone.weights, "embedding_tap": fx.info.embedding,
                  "taps": [{"name": t.name, "shape": list(t.shape), "pooled_dim": t.pooled_dim} for t in fx.info.taps],
                  "transform": repr(backbone.transform)},
        "processor": {"name": proc.name, "n_components": proc.n_components, "normalize": proc.normalize},
        "augmentation": {"hflip": cfg.data_aug, "applied_to": "preprocessed tensor"},
        "precision": cfg.precision, "device": str(fx.device), "channels_last": cfg.channels_last,
        "batch_size": cfg.batch_size,
        "dataset": {"path": str(layout.root.resolve()), "kind": layout.kind, "source": layout.source,
                    "sides": list(layout.sides),
                    "ignored_files": list(layout.ignored)},
        "counts": {"items_found": len(layout), "items_kept": len(kept), "items_skipped": len(skipped),
                   "rows_per_file": len(kept) * n_flips,
                   "images_seen": len(layout) * len(layout.sides) * n_flips},
        "skipped": [{"name": layout.names[i], "reason": r} for i, r in sorted(skipped.items())],
        "outputs": outputs,
        "versions": _versions(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _finish(cfg: ExtractConfig, fx: FeatureExtractor, proc: Processor, layout: Layout, out_dir: Path,
            fingerprint: dict, replaced: list[str], report: Report, ranks: Ranks) -> None:
    """Turn the chunk store into the output files and the manifest; remove what they replace."""
    store = ChunkStore(out_dir / ".partial")
    if not store.folder.exists():  # nothing left to do and no chunks: an empty resume
        store.start(fingerprint)
    rows = store.rows()
    kept_list, skipped = rows.kept.tolist(), rows.skipped
    if not proc.pooled:
        kept_list = sorted(set(range(len(layout))) - set(skipped))
    report.n_kept = len(kept_list)
    report.skipped = {layout.names[i]: r for i, r in sorted(skipped.items())}
    if not kept_list:
        store.remove()
        raise UserError(f"every item of {layout.root} was unreadable; nothing to save")
    n_flips = 2 if cfg.data_aug else 1
    # From here the folder holds a mix until the new manifest is written: drop the old one first.
    (out_dir / MANIFEST).unlink(missing_ok=True)
    if proc.pooled:
        check_components(proc, len(kept_list) * len(layout.sides) * n_flips, fx.info.dims)
        outputs = write_outputs(proc, rows, [layout.names[i] for i in kept_list], layout.sides, n_flips,
                                fx.info.embedding, fx.info.dims, out_dir)
    else:
        outputs = {"raw": {"kind": "raw", "dtype": "float16", "layout": "raw/{tap}/{row:06d}.npy",
                           "axes": ["side", "flip", "..."], "shapes": {k: list(v) for k, v in fx.info.shapes.items()},
                           "rows": {f"{i:06d}": layout.names[i] for i in kept_list}}}
    manifest = _manifest(cfg, fx, proc, layout, fingerprint, kept_list, skipped, outputs)
    manifest["distributed"] = {"world_size": ranks.world_size, "backend": ranks.backend,
                               "shards": ranks.layout(len(layout)), "shard_rule": "contiguous ranges of the sorted items"}
    write_json(out_dir / MANIFEST, manifest)
    for rel in set(replaced) - set(outputs):
        _remove(out_dir / rel)
    store.remove()
    report.outputs = [str(out_dir / rel) for rel in outputs] + [str(out_dir / MANIFEST)]


def extract(cfg: ExtractConfig, backbone: Backbone, ranks: Ranks = Ranks()) -> Report:
    """Extract features for `cfg.dataset` with `backbone` and write them under `cfg.save_to/MODEL/`.

    Steps: check the input and prepare the output folder, run the batches into the chunk store
    (`MODEL/.partial/`, so an interrupted run resumes), write the outputs, write the manifest.

    Under torchrun, pass `ranks` (`featuresExtractor.distributed.init`): each rank extracts its
    shard of the sorted items into the chunk store, and rank 0 alone writes the outputs and the
    manifest once every rank is done; the other ranks return a `Report` without outputs.

    Returns a `Report`. Raises `UserError` for bad input, before anything is written
    (with `strict`, also for an unreadable image, removing what this run wrote).
    """
    proc = parse_processor(cfg.processor, cfg.normalize)
    layout = discover(cfg.dataset)
    ranks.check_items(len(layout))
    fx = FeatureExtractor(backbone, cfg.precision, cfg.channels_last)
    out_dir = _out_dir(cfg, fx, proc, layout, 2 if cfg.data_aug else 1)
    fingerprint = _fingerprint(cfg, backbone, proc, layout)
    report = Report(out_dir=out_dir, n_items=len(layout))

    def prepare() -> tuple[bool, list[str], bool]:
        done_before, replaced = _prepare_out_dir(out_dir, fingerprint, cfg.overwrite)
        if done_before:
            return True, [], False
        if not proc.pooled and "raw" in replaced:
            # processor save writes raw/ file by file while it runs, so old raw outputs cannot wait.
            _remove(out_dir / "raw")
            replaced.remove("raw")
        if not proc.pooled:
            left = len(layout) - len(ChunkStore(out_dir / ".partial").done())
            _check_disk(out_dir, left, sum(int(np.prod(s)) for s in fx.info.shapes.values())
                        * len(layout.sides) * (2 if cfg.data_aug else 1))
        return False, replaced, _start_store(out_dir, fingerprint)

    # Rank 0 alone looks at and prepares the output folder; the others wait for its verdict.
    done_before, replaced, fresh = ranks.agree(prepare)
    if done_before:
        report.already_done = True
        return report
    try:
        report.resumed_items = sum(ranks.all_succeed(lambda: _run_batches(cfg, fx, proc, layout, out_dir, ranks)))
    except UserError:
        if fresh and ranks.rank == 0:
            _drop_fresh_store(out_dir)
        raise
    if ranks.rank == 0:
        _finish(cfg, fx, proc, layout, out_dir, fingerprint, replaced, report, ranks)
    return report


def read_manifest(features_path: str | os.PathLike) -> dict:
    """The extraction manifest beside a features file, or a `UserError` saying it is missing."""
    path = Path(features_path).parent / MANIFEST
    if not path.is_file():
        raise UserError(f"no {MANIFEST} beside {features_path}: it was not written by extract.py, or was moved "
                        f"without its manifest")
    return read_json(path)
