"""The extraction manifest (`MODEL/manifest.json`): its content, how it is written, read and checked.

extract.py writes `manifest.json` last, next to the files it describes, so its presence
means the run is complete. It records what identifies the configuration (`config`, compared
on every re-run), the model, taps, processor, decoding, dataset, counts, skipped items and
each output's size and sha256. Everything that reads a manifest goes through
`read_manifest` (a features file's manifest) or `read_manifest_file` (a manifest path), which
check the structure their readers rely on and raise a one-line `UserError` otherwise.

`swap_in` puts a finished run's staged outputs and manifest in place of the earlier ones:
the old manifest goes first and the new one last, so a folder is never reported done with
files of two runs.

Example:
    >>> m = read_manifest("out/clip_rn50x4/features_pca256.npy")     # doctest: +SKIP
    >>> m["processor"], [t["name"] for t in m["model"]["taps"]]        # doctest: +SKIP
    ({'name': 'adapt-pca', 'n_components': 256, 'normalize': 'layers'}, ['layer1', ..., 'attnpool'])
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
import platform
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

from toolkit.hashing import file_sha256
from toolkit.utils import UserError, read_json, write_json

from .backbone_base import Backbone
from .dataset import Layout
from .extractor import FeatureInfo
from .processor import KINDS, Processor
from .transforms import DECODE, TRANSFORMS

__all__ = ["MANIFEST", "FORMAT", "fingerprint", "build_manifest", "write_manifest", "read_manifest",
           "read_manifest_file", "transform_choice", "file_digest", "damaged_outputs", "check_output", "is_inside",
           "swap_in"]

MANIFEST = "manifest.json"
FORMAT = "featuresExtractor/1"


def _versions() -> dict[str, str]:
    """Versions of Python and of the libraries this run used (a library it never imported is not named)."""
    import PIL

    found = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
             "pillow": PIL.__version__}
    for module, name in (("open_clip", "open_clip"), ("timm", "timm"), ("torchvision", "torchvision"),
                         ("sklearn", "scikit-learn")):
        if module in sys.modules:
            found[name] = getattr(sys.modules[module], "__version__", "unknown")
    return found


def fingerprint(backbone: Backbone, proc: Processor, layout: Layout, data_aug: bool, precision: str) -> dict:
    """The manifest's `config`: what identifies an extraction. Another value is another configuration."""
    # Only what changes the numbers: batch size, workers and device do not.
    weights = {k: v for k, v in backbone.weights.items() if k in ("source", "tag", "sha256", "seed")}
    # Chunks refer to items by position in the sorted name list, so the list itself must not change
    # under a resumed run: its hash is part of the configuration.
    items = {"count": len(layout), "names_sha256": hashlib.sha256("\n".join(layout.names).encode()).hexdigest()}
    if layout.paths is not None:  # a list: where each item's files are is part of what was extracted
        items["paths_sha256"] = hashlib.sha256("\n".join("\t".join(p) for p in layout.paths).encode()).hexdigest()
    config = {"dataset": str(layout.root.resolve()), "items": items, "model": backbone.spec.name,
              "arch": backbone.spec.arch, "weights": weights, "taps": list(backbone.spec.taps), "processor": proc.name,
              "n_components": proc.n_components, "normalize": proc.normalize, "data_aug": data_aug,
              "precision": precision, "exif_orientation": True}
    if backbone.transform_choice != "library":  # absent for the default, so earlier folders keep their configuration
        config["transform"] = backbone.transform_choice
    return config


def transform_choice(manifest: dict) -> str:
    """The `--transform` an extraction used ("library" or "paper")."""
    return manifest["config"].get("transform", "library")


def build_manifest(config: dict, backbone: Backbone, info: FeatureInfo, proc: Processor, layout: Layout,
                   kept: list[int], skipped: dict[int, str], outputs: dict[str, dict], *, data_aug: bool,
                   precision: str, device: str, channels_last: bool, batch_size: int, subset: dict | None = None,
                   engine: str = "torch") -> dict:
    """The manifest of a finished extraction; `config` is its `fingerprint`, `outputs` each file's record,
    `subset` the record of `--subset` (`featuresExtractor.subset.describe_subset`) when one was given."""
    n_flips = 2 if data_aug else 1
    return {
        "format": FORMAT,
        "config": config,
        "random_init": backbone.weights["source"] == "random-init",
        "model": {"name": backbone.spec.name, "arch": backbone.spec.arch, "pretrained": backbone.spec.pretrained,
                  "library": backbone.spec.library, "identifier": backbone.spec.arch,
                  "weights": backbone.weights, "embedding_tap": info.embedding,
                  "taps": [{"name": t.name, "shape": list(t.shape), "pooled_dim": t.pooled_dim} for t in info.taps],
                  "transform": repr(backbone.transform), "transform_choice": backbone.transform_choice},
        "processor": proc.record(),
        "augmentation": {"hflip": data_aug, "applied_to": "preprocessed tensor"},
        "decode": DECODE,
        "precision": precision, "device": device, "channels_last": channels_last, "engine": engine,
        "batch_size": batch_size,
        "dataset": {"path": str(layout.root.resolve()), "kind": layout.kind, "source": layout.source,
                    "sides": list(layout.sides),
                    "ignored_files": list(layout.ignored), **({"subset": subset} if subset else {})},
        "counts": {"items_found": len(layout), "items_kept": len(kept), "items_skipped": len(skipped),
                   "rows_per_file": len(kept) * n_flips,
                   "images_seen": len(layout) * len(layout.sides) * n_flips},
        "skipped": [{"name": layout.names[i], "reason": r} for i, r in sorted(skipped.items())],
        "outputs": outputs,
        "versions": _versions(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def write_manifest(folder: str | os.PathLike, manifest: dict) -> Path:
    """Write `manifest` atomically as `folder/manifest.json`; its path."""
    path = Path(folder) / MANIFEST
    write_json(path, manifest)
    return path


#: What a reader may rely on in a manifest: key -> type, nested for dicts (checked by `read_manifest_file`).
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
                            f"describes and extract again")
        if isinstance(want, dict):
            if not isinstance(obj[key], dict):
                raise UserError(f"{path} is damaged: {where}{key} should be an object, not {type(obj[key]).__name__}")
            _check_shape(obj[key], want, f"{where}{key}.", path)
        elif not isinstance(obj[key], want):
            raise UserError(f"{path} is damaged: {where}{key} has the wrong type ({type(obj[key]).__name__})")


def read_manifest_file(path: str | os.PathLike) -> dict:
    """Read `path` (a manifest.json) and check the structure its readers rely on.

    Raises `UserError`, naming the file, for a damaged file or one of the wrong shape: not an
    object, a missing or mistyped key, an output that is not a plain name inside the folder.
    """
    obj = read_json(path)
    if not isinstance(obj, dict):
        raise UserError(f"{path} is damaged: it holds a JSON {type(obj).__name__}, not an object")
    _check_shape(obj, _MANIFEST_SHAPE, "", path)
    for rel, info in obj["outputs"].items():
        if not isinstance(info, dict) or not is_inside(Path(path).parent, rel):
            raise UserError(f"{path} is damaged: output {rel!r} is not a file inside {Path(path).parent}")
    taps = obj["model"]["taps"]
    if not all(isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("pooled_dim"), int)
               for t in taps):
        raise UserError(f"{path} is damaged: model.taps should list objects with a name and a pooled_dim")
    proc = obj["processor"]
    if proc["name"] not in KINDS:
        raise UserError(f"{path} is damaged: processor.name {proc['name']!r} is not one of {', '.join(KINDS)}")
    if KINDS[proc["name"]].takes_n and not (proc["n_components"] or 0) > 0:
        raise UserError(f"{path} is damaged: processor {proc['name']} needs a positive n_components, not "
                        f"{proc['n_components']!r}")
    weights = obj["model"]["weights"]
    if weights["source"] == "file" and not all(isinstance(weights.get(k), str) for k in ("path", "sha256")):
        raise UserError(f"{path} is damaged: model.weights should record the file's path and sha256")
    if obj["config"].get("transform", "library") not in TRANSFORMS:
        raise UserError(f"{path} is damaged: config.transform {obj['config'].get('transform')!r} is not one of "
                        f"{', '.join(TRANSFORMS)}")
    if obj.get("precision", "fp32") not in ("fp32", "bf16", "fp16"):
        raise UserError(f"{path} is damaged: precision {obj.get('precision')!r} is not fp32, bf16 or fp16")
    for rel, info in obj["outputs"].items():
        if info.get("kind") == "features" and not isinstance(info.get("dim"), int):
            raise UserError(f"{path} is damaged: output {rel!r} has no integer dim")
        if info.get("kind") == "raw" and not (isinstance(info.get("rows"), dict) and isinstance(info.get("shapes"), dict)):
            raise UserError(f"{path} is damaged: output {rel!r} should list its rows and shapes")
    return obj


def read_manifest(features_path: str | os.PathLike) -> dict:
    """The extraction manifest beside a features file, its structure checked; a `UserError` naming it if it
    is missing, damaged or of the wrong shape."""
    path = Path(features_path).parent / MANIFEST
    if not (path.exists() or path.is_symlink()):
        raise UserError(f"no {MANIFEST} beside {features_path}: it was not written by extract.py, or was moved "
                        f"without its manifest")
    return read_manifest_file(path)


def is_inside(folder: Path, rel: str) -> bool:
    """True when `rel` names something strictly inside `folder` (no absolute path, no `..`, no link out)."""
    if not isinstance(rel, str) or not rel or Path(rel).is_absolute() or ".." in Path(rel).parts:
        return False
    base = folder.resolve()
    target = (folder / rel).resolve()
    return target != base and base in target.parents


def file_digest(path: Path) -> dict:
    """Size and sha256 of an output file, as the manifest records them."""
    return {"bytes": path.stat().st_size, "sha256": file_sha256(path)}


def damaged_outputs(out_dir: Path, manifest: dict) -> list[str]:
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


def check_output(manifest: dict, folder: Path, rel: str, sha256: str | None = None) -> None:
    """Refuse (`UserError`) an output about to be used whose bytes are not what extract.py wrote and recorded.

    `sha256`: the file's, when the caller has already hashed it. An output the manifest records no
    sha256 of (an older manifest) is not checked.
    """
    recorded = manifest["outputs"].get(rel, {}).get("sha256")
    if recorded is not None and (sha256 or file_sha256(folder / rel)) != recorded:
        raise UserError(f"{folder / rel} is not the file extract.py wrote (its sha256 differs from the one "
                        f"{folder / MANIFEST} records: edited or replaced since?); restore it, or extract again")


def swap_in(out_dir: Path, staged: Path, raw: Path, outputs: dict, replaced: list[str]) -> None:
    """Put the staged outputs and manifest in place of the earlier ones: renames only, no new disk.

    The old manifest goes first, so an interruption in between leaves a folder without a manifest
    (never reported done) whose .partial still holds every chunk: a re-run resumes and finishes.
    An output name taken by a file that is not one of the earlier outputs (`replaced`), and so was
    not written by extract.py, is refused (a `UserError`) before anything moves, and left alone.
    """
    taken = [rel for rel in outputs if rel not in replaced and os.path.lexists(out_dir / rel)]
    if taken and (out_dir / MANIFEST).exists():
        raise UserError(f"-s {out_dir} holds {', '.join(sorted(taken))}, which extract.py did not write (its manifest "
                        f"does not list them); they are left alone, even with --overwrite: move them away and re-run "
                        f"(the work done is kept and resumes)")
    (out_dir / MANIFEST).unlink(missing_ok=True)
    for rel in set(replaced) - set(outputs):
        if is_inside(out_dir, rel):  # never anything outside the output folder, whatever a manifest says
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
