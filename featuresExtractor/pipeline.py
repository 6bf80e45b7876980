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

import contextlib
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
from toolkit.distributed import Ranks
from .backbones import Backbone, file_sha256
from .extractor import FeatureExtractor
from .merge import write_outputs
from .processor import PROCESSORS, Processor, check_components, parse_processor
from toolkit.lock import folder_lock
from .store import ChunkStore
from .transforms import DECODE, hflip
from toolkit.utils import UserError, default_workers, read_json, save_npy, write_json

__all__ = ["ExtractConfig", "Report", "extract", "MANIFEST", "read_manifest", "file_digest"]

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
            "precision": cfg.precision, "exif_orientation": True}


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


#: What a reader may rely on in a manifest: key -> type, nested for dicts (checked by `_checked_manifest`).
_MANIFEST_SHAPE = {
    "config": dict, "outputs": dict,
    "processor": {"name": str, "n_components": (int, type(None)), "normalize": (str, type(None))},
    "model": {"name": str, "pretrained": (str, type(None)), "weights": {"source": str}, "taps": list},
    "dataset": {"path": str, "kind": str},
}


def _check_shape(obj, shape, where: str, path) -> None:
    for key, want in shape.items():
        if key not in obj:
            raise UserError(f"{path} is not an extract.py manifest: {where}{key} is missing; delete the folder it "
                            f"describes (or pass --overwrite) and extract again")
        if isinstance(want, dict):
            if not isinstance(obj[key], dict):
                raise UserError(f"{path} is damaged: {where}{key} should be an object, not {type(obj[key]).__name__}")
            _check_shape(obj[key], want, f"{where}{key}.", path)
        elif not isinstance(obj[key], want):
            raise UserError(f"{path} is damaged: {where}{key} has the wrong type ({type(obj[key]).__name__})")


def _checked_manifest(path: Path) -> dict:
    """Read `path` (a manifest.json) and check the structure its readers rely on.

    Raises `UserError`, naming the file, for a damaged file or one of the wrong shape: not an
    object, a missing or mistyped key, an output that is not a plain name inside the folder.
    """
    obj = read_json(path)
    if not isinstance(obj, dict):
        raise UserError(f"{path} is damaged: it holds a JSON {type(obj).__name__}, not an object")
    _check_shape(obj, _MANIFEST_SHAPE, "", path)
    for rel, info in obj["outputs"].items():
        if not isinstance(info, dict) or not _inside(Path(path).parent, rel):
            raise UserError(f"{path} is damaged: output {rel!r} is not a file inside {Path(path).parent}")
    taps = obj["model"]["taps"]
    if not all(isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("pooled_dim"), int)
               for t in taps):
        raise UserError(f"{path} is damaged: model.taps should list objects with a name and a pooled_dim")
    proc = obj["processor"]
    if proc["name"] not in PROCESSORS:
        raise UserError(f"{path} is damaged: processor.name {proc['name']!r} is not one of {', '.join(PROCESSORS)}")
    if PROCESSORS[proc["name"]][0] and not (proc["n_components"] or 0) > 0:
        raise UserError(f"{path} is damaged: processor {proc['name']} needs a positive n_components, not "
                        f"{proc['n_components']!r}")
    weights = obj["model"]["weights"]
    if weights["source"] == "file" and not all(isinstance(weights.get(k), str) for k in ("path", "sha256")):
        raise UserError(f"{path} is damaged: model.weights should record the file's path and sha256")
    if obj.get("precision", "fp32") not in ("fp32", "bf16", "fp16"):
        raise UserError(f"{path} is damaged: precision {obj.get('precision')!r} is not fp32, bf16 or fp16")
    for rel, info in obj["outputs"].items():
        if info.get("kind") == "features" and not isinstance(info.get("dim"), int):
            raise UserError(f"{path} is damaged: output {rel!r} has no integer dim")
        if info.get("kind") == "raw" and not (isinstance(info.get("rows"), dict) and isinstance(info.get("shapes"), dict)):
            raise UserError(f"{path} is damaged: output {rel!r} should list its rows and shapes")
    return obj


def _inside(folder: Path, rel: str) -> bool:
    """True when `rel` names something strictly inside `folder` (no absolute path, no `..`, no link out)."""
    if not isinstance(rel, str) or not rel or Path(rel).is_absolute() or ".." in Path(rel).parts:
        return False
    base = folder.resolve()
    target = (folder / rel).resolve()
    return target != base and base in target.parents


def file_digest(path: Path) -> dict:
    """Size and sha256 of an output file, as the manifest records them."""
    return {"bytes": path.stat().st_size, "sha256": file_sha256(path)}


def _damaged_outputs(out_dir: Path, manifest: dict) -> list[str]:
    """Outputs the manifest lists that are missing or differ from what it recorded."""
    bad = []
    for rel, info in manifest["outputs"].items():
        target = out_dir / rel
        if info.get("kind") == "raw":
            rows, taps = info["rows"], info["shapes"]
            if not all((target / tap / f"{row}.npy").is_file() for tap in taps for row in rows):
                bad.append(f"{rel} (missing row files)")
        elif not target.is_file():
            bad.append(f"{rel} (missing)")
        elif "bytes" in info and target.stat().st_size != info["bytes"]:
            bad.append(f"{rel} (size changed)")
        elif "sha256" in info and file_digest(target)["sha256"] != info["sha256"]:
            bad.append(f"{rel} (contents changed)")
    return bad


def _swap_in(out_dir: Path, staged: Path, raw: Path, outputs: dict, replaced: list[str]) -> None:
    """Put the staged outputs and manifest in place of the earlier ones: renames only, no new disk.

    The old manifest goes first, so an interruption in between leaves a folder without a manifest
    (never reported done) whose .partial still holds every chunk: a re-run resumes and finishes.
    """
    (out_dir / MANIFEST).unlink(missing_ok=True)
    for rel in set(replaced) - set(outputs):
        if _inside(out_dir, rel):  # never anything outside the output folder, whatever a manifest says
            _remove(out_dir / rel)
    for rel in outputs:
        source, target = (raw if rel == "raw" else staged / rel), out_dir / rel
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(source, target)
    os.replace(staged / MANIFEST, out_dir / MANIFEST)


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
    if manifest.is_file() or manifest.is_symlink():
        old = _checked_manifest(manifest)
        if old["config"] == fingerprint and not overwrite:
            damaged = _damaged_outputs(out_dir, old)
            if not damaged:
                return True, []
            # Not done after all: say so, and rebuild them (the old files stay until the new ones are whole).
            print(f"{out_dir}: the manifest's outputs are not intact ({'; '.join(damaged[:3])}); "
                  f"extracting again", file=sys.stderr)
            return False, list(old["outputs"])
        if not overwrite:
            changed = sorted(k for k in fingerprint if old["config"].get(k) != fingerprint[k])
            raise UserError(f"{out_dir} already holds features from another configuration (differs in: "
                            f"{', '.join(changed)}); pass --overwrite to replace them or choose another -s")
        replaced = list(old["outputs"])
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


def _run_batches(cfg: ExtractConfig, fx: FeatureExtractor, proc: Processor, layout: Layout, out_dir: Path,
                 ranks: Ranks) -> int:
    """Forward every item of this rank's shard not yet in the chunk store into it; returns how many were there.

    On a `UserError` (`strict`), the chunks this rank wrote are removed again.
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
    ChunkStore(out_dir / ".partial").remove()  # raw outputs are written inside it, so they go too
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
        "decode": DECODE,
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
    # The new files are written into .partial/staged first: the earlier results stay whole until
    # every new file is (a full disk or a late check leaves them as they were).
    staged = store.folder / "staged"
    shutil.rmtree(staged, ignore_errors=True)
    if proc.pooled:
        check_components(proc, len(kept_list) * len(layout.sides) * n_flips, fx.info.dims)
        outputs = write_outputs(proc, rows, [layout.names[i] for i in kept_list], layout.sides, n_flips,
                                fx.info.embedding, fx.info.dims, staged)
        for rel, info in outputs.items():
            info.update(file_digest(staged / rel))
    else:
        outputs = {"raw": {"kind": "raw", "dtype": "float16", "layout": "raw/{tap}/{row:06d}.npy",
                           "axes": ["side", "flip", "..."], "shapes": {k: list(v) for k, v in fx.info.shapes.items()},
                           "rows": {f"{i:06d}": layout.names[i] for i in kept_list}}}
    manifest = _manifest(cfg, fx, proc, layout, fingerprint, kept_list, skipped, outputs)
    manifest["distributed"] = {"world_size": ranks.world_size, "backend": ranks.backend,
                               "shards": ranks.layout(len(layout)), "shard_rule": "contiguous ranges of the sorted items"}
    write_json(staged / MANIFEST, manifest)
    _swap_in(out_dir, staged, store.folder / "raw", outputs, replaced)
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
    layout = discover(cfg.dataset)
    ranks.check_items(len(layout))
    fx = FeatureExtractor(backbone, cfg.precision, cfg.channels_last)
    out_dir = _out_dir(cfg, fx, proc, layout, 2 if cfg.data_aug else 1)
    fingerprint = _fingerprint(cfg, backbone, proc, layout)
    report = Report(out_dir=out_dir, n_items=len(layout))

    def prepare() -> tuple[bool, list[str], bool]:
        held.enter_context(folder_lock(out_dir, "-s"))
        done_before, replaced = _prepare_out_dir(out_dir, fingerprint, cfg.overwrite)
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
        return False, replaced, _start_store(out_dir, fingerprint)

    # Rank 0 alone looks at, locks and prepares the output folder; the others wait for its verdict.
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
    """The extraction manifest beside a features file, its structure checked; a `UserError` naming it if it
    is missing, damaged or of the wrong shape."""
    path = Path(features_path).parent / MANIFEST
    if not (path.exists() or path.is_symlink()):
        raise UserError(f"no {MANIFEST} beside {features_path}: it was not written by extract.py, or was moved "
                        f"without its manifest")
    return _checked_manifest(path)
