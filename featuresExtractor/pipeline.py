"""The extraction loop: images -> tapped, pooled features -> processor outputs.

`extract(config, backbone)` is what extract.py runs once it has parsed its
arguments and loaded the backbone. It is resumable: finished batches are kept in
`MODEL/.partial/`, and the final files plus `manifest.json` (written last) appear
only when every image has been seen. The manifest's content and format are
`featuresExtractor.manifest`'s.

Example:
    >>> from featuresExtractor.backbones import load_backbone, resolve_spec
    >>> cfg = ExtractConfig(dataset="TLL", save_to="out", processor=("adapt-pca", "256"), data_aug=True)
    >>> report = extract(cfg, load_backbone(resolve_spec("clip_rn50x4")))   # doctest: +SKIP
    >>> report.outputs                                                  # doctest: +SKIP
    ['out/clip_rn50x4/features.npy', 'out/clip_rn50x4/features_pca256.npy', ...]
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from toolkit.folders import describe_entries, manifest_format
from toolkit.lock import folder_lock
from toolkit.utils import StopAfterBatch, UserError, default_workers, first_line, save_npy

from .backbone_base import Backbone
from .dataset import ImageItems, Layout, discover
from toolkit.distributed import Ranks
from .extractor import FeatureExtractor
from .manifest import (FORMAT, MANIFEST, build_manifest, damaged_outputs, file_digest, fingerprint, read_manifest_file,
                       swap_in, write_manifest)
from .merge import write_outputs
from .processor import Processor, parse_processor
from .store import ChunkStore
from .subset import describe_subset, match_subset, read_subset
from .transforms import hflip

STOPPING_LINE = "extract.py: stopping after the current batch (finished batches are kept); Ctrl-C again to stop at once"
"""Said on stderr as soon as Ctrl-C, SIGTERM or SIGHUP arrives during the extraction loop."""

__all__ = ["STOPPING_LINE", "ExtractConfig", "Report", "extract", "dataset_items", "run_shard", "start_store"]


@dataclass(frozen=True)
class ExtractConfig:
    """Everything extract.py was asked to do, as plain values."""

    dataset: str
    save_to: str
    processor: tuple[str, ...] = ("adapt-pca", "256")
    normalize: str | None = None
    data_aug: bool = False
    precision: str = "fp32"
    engine: str = "torch"  # featuresExtractor.engines: torch, folded or onnxruntime (equal within rounding)
    batch_size: int = 2048
    workers: int = field(default_factory=default_workers)
    device: str = "cpu"
    channels_last: bool = True
    strict: bool = False
    overwrite: bool = False
    progress: bool = True
    subset: str | None = None  # a subset file (featuresExtractor.subset): only the items it names

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


def dataset_items(dataset: str, subset: str | None = None) -> tuple[Layout, list[str]]:
    """(the items to extract, the subset's names the dataset lacks): every item, or those a subset file names.

    Raises `UserError` for a bad dataset or subset file, and when the subset keeps no item.
    """
    layout = discover(dataset)
    if subset is None:
        return layout, []
    wanted = read_subset(subset)
    kept, missing = match_subset(layout.names, wanted)
    if not kept:
        raise UserError(f"none of the {len(wanted)} names in subset file {subset} is an item of {dataset} "
                        f"(e.g. {wanted[0]!r}; items are named like {layout.names[0]!r})")
    return layout.select(kept), missing


def _check_disk(out_dir: Path, n_items: int, per_item_values: int) -> int:
    need = n_items * per_item_values * 2  # float16
    probe = out_dir
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    print(f"save: raw tap outputs will take {need / 2**30:.2f} GiB; {free / 2**30:.2f} GiB free", file=sys.stderr)
    if need > free:
        raise UserError(f"not enough disk for -p/--processor save: need {need / 2**30:.2f} GiB, {free / 2**30:.2f} GiB free "
                        f"under {probe}; free some space or pick another -s")
    return need


def _prepare_out_dir(out_dir: Path, config: dict, overwrite: bool) -> tuple[bool, list[str]]:
    """(already done, outputs of an earlier configuration that --overwrite will replace).

    Those outputs stay in place until the new results are written, so a run that fails
    or is interrupted leaves the earlier results as they were. A folder extract.py did not
    write (`_check_own_folder`) is refused, even with --overwrite, and left alone.
    """
    manifest = out_dir / MANIFEST
    replaced: list[str] = []
    store = ChunkStore(out_dir / ".partial")
    _check_own_folder(out_dir, store)
    if manifest.is_file() or manifest.is_symlink():
        old = read_manifest_file(manifest)
        if old["config"] == config and not overwrite:
            damaged = damaged_outputs(out_dir, old)
            if not damaged:
                return True, []
            # Not done after all: say so, and rebuild them (the old files stay until the new ones are whole).
            print(f"{out_dir}: the manifest's outputs are not intact ({'; '.join(damaged[:3])}); "
                  f"extracting again", file=sys.stderr)
            return False, list(old["outputs"])
        if not overwrite:
            changed = sorted(k for k in {*config, *old["config"]} if old["config"].get(k) != config.get(k))
            raise UserError(f"{out_dir} already holds features from another configuration (differs in: "
                            f"{', '.join(changed)}); pass --overwrite to replace them or choose another -s")
        replaced = list(old["outputs"])
    previous = store.config()
    if previous is not None and previous != config:
        if not overwrite:
            raise UserError(f"{out_dir} holds an interrupted run with another configuration; re-run that command "
                            f"to finish it, or pass --overwrite to discard it")
        store.remove()
    return False, replaced


def _check_own_folder(out_dir: Path, store: ChunkStore) -> None:
    """Refuse (one line, even with --overwrite) an output folder extract.py did not write.

    Its manifest.json must be extract.py's (one that cannot be read, or names another format, an
    index's or an export's, is not); its .partial/ must be extract.py's own (`ChunkStore.check_own`);
    a folder holding neither, but other files, is not an extraction folder.
    """
    manifest = out_dir / MANIFEST
    fmt = manifest_format(manifest)
    if (manifest.is_file() or manifest.is_symlink()) and fmt != FORMAT:
        try:
            json.loads(manifest.read_text())
        except (OSError, ValueError) as err:
            raise UserError(f"-s {out_dir}: cannot read {manifest} ({first_line(err)}); it is left alone, even with "
                            f"--overwrite: restore it, or choose another -s") from None
        named = f": it is a {fmt!r} manifest" if fmt else ""
        raise UserError(f"-s {out_dir} is not an extraction folder (its {MANIFEST} is not extract.py's{named}); it is "
                        f"left alone, even with --overwrite: choose another -s")
    store.check_own()
    if out_dir.is_dir() and not (manifest.exists() or manifest.is_symlink() or store.folder.exists()):
        entries = os.listdir(out_dir)
        if entries:  # an unknown folder (a run, an index, a user's files): an extraction never writes over it
            raise UserError(f"-s {out_dir} is not an extraction folder (it holds "
                            f"{describe_entries(out_dir, entries)}); it is left alone, even with --overwrite: "
                            f"move them out or choose another -s")


def _check_save_to(save_to: Path) -> None:
    """Refuse, as -s, a folder another command owns whole (an index, an export): SAVE/MODEL/ would be written into it."""
    fmt = manifest_format(save_to / MANIFEST)
    if fmt == FORMAT:
        raise UserError(f"-s {save_to} is an extraction's own folder (SAVE/MODEL); extract.py writes SAVE/MODEL/ inside "
                        f"-s: give its parent, {save_to.parent}, or another -s")
    if fmt is not None:
        raise UserError(f"-s {save_to} is another command's output folder (its {MANIFEST} is a {fmt!r} manifest); "
                        f"extract.py writes SAVE/MODEL/ inside -s and would put files of its own there: choose "
                        f"another -s")


def _out_dir(cfg: ExtractConfig, fx: FeatureExtractor, proc: Processor, layout: Layout, n_flips: int) -> Path:
    """Check what can be checked before anything is written; the model's output folder."""
    blocking = next((p for p in (Path(cfg.save_to), *Path(cfg.save_to).parents) if p.exists()), None)
    if blocking is not None and not blocking.is_dir():
        raise UserError(f"-s {cfg.save_to}: {blocking} is a file, not a folder; choose another -s")
    proc.check_components(len(layout) * len(layout.sides) * n_flips, fx.info.dims)
    _check_save_to(Path(cfg.save_to))
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
    """Forward one batch (with flipped copies) and write its chunk; raw outputs go to `.partial/raw/` as they come."""
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
                # Into .partial until the run is complete, so earlier raw/ results survive a failure.
                save_npy(store.folder / "raw" / tap / f"{i:06d}.npy", v[row].numpy())
    return store.write(indices, {}, skipped)


def _check_strict(batch: dict, layout: Layout) -> None:
    for i, e in zip(batch["index"].tolist(), batch["error"]):
        if e:
            raise UserError(f"unreadable image in item {layout.names[i]!r}: {e} (strict; drop strict "
                            f"to skip such pairs and list them in the manifest)")


def run_shard(cfg: ExtractConfig, fx: FeatureExtractor, proc: Processor, layout: Layout, out_dir: Path,
              ranks: Ranks) -> int:
    """Forward every item of this rank's shard not yet in the chunk store into it; returns how many were there.

    One rank's part of `extract` (its items under `ranks`), public so that a shard can be run alone (the
    tests resume another world size's shards). On a `UserError` (`strict`), the chunks this rank wrote
    are removed again.
    """
    store = ChunkStore(out_dir / ".partial")
    shard = ranks.shard(len(layout))
    done = store.done(discard=False)  # rank 0 discarded damaged chunks before the barrier
    todo = [i for i in shard if i not in done]
    images_per_item = len(layout.sides) * (2 if cfg.data_aug else 1)
    written: list[Path] = []
    bar = tqdm(total=len(shard) * images_per_item, initial=(len(shard) - len(todo)) * images_per_item, unit="img",
               desc=" ".join(filter(None, [f"extract {fx.backbone.spec.name}", ranks.label])),
               disable=not cfg.progress, dynamic_ncols=True, position=ranks.rank)
    try:
        # A CPU batch runs for seconds in C: a stop is said at once and taken once the batch is stored.
        with fx.running(pooled=proc.pooled, slice_size=fx.slice_size(cfg.batch_size)) as forward, \
                StopAfterBatch(STOPPING_LINE) as stop:
            for batch in _loader(cfg, fx, layout, todo, images_per_item):
                if cfg.strict:
                    _check_strict(batch, layout)
                written.append(_store_batch(batch, forward, cfg, layout, store, proc.pooled, out_dir))
                bar.update(len(batch["index"]) * images_per_item)
                stop.check()
    except UserError:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    finally:
        bar.close()
    return len(shard) - len(todo)


def start_store(out_dir: Path, config: dict) -> bool:
    """Create the chunk store before any rank writes into it; whether it is new."""
    store = ChunkStore(out_dir / ".partial")
    if store.folder.exists():
        return False
    store.start(config)
    return True


def _drop_fresh_store(out_dir: Path) -> None:
    """After a failed first run: remove what it created, so nothing looks like a run to resume."""
    ChunkStore(out_dir / ".partial").remove()  # raw outputs are written inside it, so they go too
    if out_dir.is_dir() and not any(out_dir.iterdir()):
        out_dir.rmdir()


def _finish(cfg: ExtractConfig, fx: FeatureExtractor, proc: Processor, layout: Layout, out_dir: Path,
            config: dict, replaced: list[str], report: Report, ranks: Ranks) -> None:
    """Turn the chunk store into the output files and the manifest; remove what they replace."""
    store = ChunkStore(out_dir / ".partial")
    if not store.folder.exists():  # nothing left to do and no chunks: an empty resume
        store.start(config)
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
    # The new files are written into .partial/staged first: the earlier results stay whole until
    # every new file is (a full disk or a late check leaves them as they were).
    staged = store.folder / "staged"
    shutil.rmtree(staged, ignore_errors=True)
    if proc.pooled:
        proc.check_components(len(kept_list) * len(layout.sides) * n_flips, fx.info.dims)
        outputs = write_outputs(proc, rows, [layout.names[i] for i in kept_list], layout.sides, n_flips,
                                fx.info.embedding, fx.info.dims, staged,
                                pca_device=fx.device if fx.device.type == "cuda" else None)
        for rel, info in outputs.items():
            info.update(file_digest(staged / rel))
    else:
        outputs = {"raw": {"kind": "raw", "dtype": "float16", "layout": "raw/{tap}/{row:06d}.npy",
                           "axes": ["side", "flip", "..."], "shapes": {k: list(v) for k, v in fx.info.shapes.items()},
                           "rows": {f"{i:06d}": layout.names[i] for i in kept_list}}}
    subset = None if cfg.subset is None else {**describe_subset(cfg.subset, read_subset(cfg.subset)),
                                              "items_kept": len(layout)}
    manifest = build_manifest(config, fx.backbone, fx.info, proc, layout, kept_list, skipped, outputs,
                              data_aug=cfg.data_aug, precision=cfg.precision, device=str(fx.device),
                              channels_last=cfg.channels_last, batch_size=cfg.batch_size, subset=subset,
                              engine=fx.engine)
    manifest["distributed"] = {"world_size": ranks.world_size, "backend": ranks.backend,
                               "shards": ranks.layout(len(layout)), "shard_rule": "contiguous ranges of the sorted items"}
    write_manifest(staged, manifest)
    swap_in(out_dir, staged, store.folder / "raw", outputs, replaced)
    store.remove()
    report.outputs = [str(out_dir / rel) for rel in outputs] + [str(out_dir / MANIFEST)]


def extract(cfg: ExtractConfig, backbone: Backbone, ranks: Ranks = Ranks()) -> Report:
    """Extract features for `cfg.dataset` with `backbone` and write them under `cfg.save_to/MODEL/`.

    Steps: check the input and prepare the output folder, run the batches into the chunk store
    (`MODEL/.partial/`, so an interrupted run resumes), write the outputs, write the manifest.

    Under torchrun, pass `ranks` (`toolkit.distributed.Ranks.join`): each rank extracts its
    shard of the sorted items into the chunk store, and rank 0 alone writes the outputs and the
    manifest once every rank is done; the other ranks return a `Report` without outputs.

    Returns a `Report`. Raises `UserError` for bad input, before anything is written
    (with `strict`, also for an unreadable image, removing what this run wrote), and when
    another process is writing into the same folder (an OS lock is held for the whole run).
    Earlier results stay in place until the new ones are complete.
    """
    blocking = next((p for p in (Path(cfg.save_to), *Path(cfg.save_to).parents) if p.exists()), None)
    if blocking is not None and not blocking.is_dir():
        raise UserError(f"-s {cfg.save_to}: {blocking} is a file, not a folder; choose another -s")
    # Rank 0 takes the folder lock in its prepare step and holds it until the merge has ended.
    with contextlib.ExitStack() as held:
        return _extract(cfg, backbone, ranks, held)


def _extract(cfg: ExtractConfig, backbone: Backbone, ranks: Ranks, held: contextlib.ExitStack) -> Report:
    proc = parse_processor(cfg.processor, cfg.normalize)
    layout, _ = dataset_items(cfg.dataset, cfg.subset)  # extract.py says which subset names are missing
    ranks.check_items(len(layout))
    fx = FeatureExtractor(backbone, cfg.precision, cfg.channels_last, cfg.engine)
    out_dir = _out_dir(cfg, fx, proc, layout, 2 if cfg.data_aug else 1)
    config = fingerprint(backbone, proc, layout, cfg.data_aug, cfg.precision)
    report = Report(out_dir=out_dir, n_items=len(layout))

    def prepare() -> tuple[bool, list[str], bool]:
        held.enter_context(folder_lock(out_dir, "-s"))
        done_before, replaced = _prepare_out_dir(out_dir, config, cfg.overwrite)
        if done_before:
            return True, [], False
        store = ChunkStore(out_dir / ".partial")
        # Damaged chunks go before any other rank reads the store (agree() is the barrier).
        left = len(layout) - len(store.done())
        for name, reason in store.discarded:
            print(f"{store.folder / name} was damaged ({reason}); its items are extracted again", file=sys.stderr)
        if not proc.pooled:
            _check_disk(out_dir, left, sum(int(np.prod(s)) for s in fx.info.shapes.values())
                        * len(layout.sides) * (2 if cfg.data_aug else 1))
        return False, replaced, start_store(out_dir, config)

    # Rank 0 alone looks at, locks and prepares the output folder; the others wait for its verdict.
    done_before, replaced, fresh = ranks.agree(prepare)
    if done_before:
        report.already_done = True
        return report
    try:
        report.resumed_items = sum(ranks.all_succeed(lambda: run_shard(cfg, fx, proc, layout, out_dir, ranks)))
    except UserError:
        if fresh and ranks.rank == 0:
            _drop_fresh_store(out_dir)
        raise
    if ranks.rank == 0:
        _finish(cfg, fx, proc, layout, out_dir, config, replaced, report, ranks)
    return report
