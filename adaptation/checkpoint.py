"""The checkpoint file train.py writes in each run folder (`RUN/model_and_optimizer.pt`); this module owns it.

A checkpoint is a `torch.save` of a plain dict (tensors, numbers, strings, lists and dicts only,
so `torch.load(weights_only=True)` reads it without running code):

| key              | value                                                                   |
|------------------|-------------------------------------------------------------------------|
| `format_version` | `FORMAT_VERSION`                                                        |
| `epoch`          | the number of epochs trained                                            |
| `state_dict`     | the adaptation model's weights                                          |
| `optimizer`      | the Adam state, None for `dummy`                                        |
| `config`         | the run's configuration; `config["data"]` is the features file's path  |
| `model_name`     | the `adaptation.models.MODELS` name                                     |
| `in_dim`         | the feature dimension                                                   |
| `model_kwargs`   | the extra `build_model` arguments that rebuild the model                |
| `test_names`     | the held-out pairs' names (the split)                                   |
| `train_names`    | the training pairs' names (with `test_names` and `val_names`, the split) |
| `final_metrics`  | the last epoch's figures                                                |
| `val_names`      | only with a validation split: the validation pairs' names               |
| `threshold`      | only with a validation split: `adaptation.calibration.Threshold.to_dict()` of this model on them |
| `objective`      | only for `simsiam` and `byol` runs: `name`, `predictor_hidden`, `ema`,  |
|                  | `predictor` and `target` (state_dicts; `target` None for simsiam)       |
| `provenance`     | from format 2: `{"features_sha256": hex, "pca_sha256": {file name: hex}}`, the |
|                  | features file trained on and the PCA files beside it that made it; from format 3 |
|                  | also `"manifest_sha256"`: hex, or None without a manifest (`provenance_of`)      |

`model_and_optimizer.pt` holds the last epoch; with a validation split, `best.pt` (`BEST_CHECKPOINT`)
beside it holds the best validation epoch, in the same format.

A run must know every file its scores depend on: the features it was trained on, the extraction
manifest (how images are decoded, transformed, pooled, normalised) and the PCA. `check_provenance`
compares the files there now with the `provenance` recorded, and refuses, in one line naming the
file and the remedy, a features file re-extracted, a manifest edited or a PCA replaced since. A
checkpoint of format 2 or later that lacks an entry it must have is damaged, and refused. Format 1
checkpoints, which predate provenance, have none: they still load, and `check_provenance` returns a
note (not checked) for the caller to print; format 2 ones are checked but for the manifest (a note too).

`state_dict` is always the model similarity uses (for simsiam and byol, the online encoder), so
`load_checkpoint` and similarity.py read every run alike; a contrastive run's checkpoint has no
`objective` key. `load_objective` rebuilds the predictor and target as well, to resume.

Example:
    >>> model, ckpt = load_checkpoint("runs/run1/model_and_optimizer.pt")   # doctest: +SKIP
"""

from __future__ import annotations

import io
import os
import pickle
import struct
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from toolkit.hashing import file_sha256
from featuresExtractor.encode import model_taps
from featuresExtractor.manifest import MANIFEST, check_output, read_manifest
from featuresExtractor.processor import Processor
from toolkit.utils import UserError, atomic_path, first_line

from .calibration import Threshold
from .models import build_model, model_kwargs
from .objectives import BYOL, DEFAULT_EMA, SimSiam, build_objective

__all__ = ["CHECKPOINT", "BEST_CHECKPOINT", "FORMAT_VERSION", "CHECKPOINT_KEYS", "save_checkpoint", "load_checkpoint",
           "load_objective", "provenance_of", "check_provenance"]

CHECKPOINT = "model_and_optimizer.pt"
"""The checkpoint's file name in a run folder."""
BEST_CHECKPOINT = "best.pt"
"""The best validation epoch's checkpoint in a run folder (runs with a validation split)."""
FORMAT_VERSION = 3
"""Written into every checkpoint as `format_version` (2: `provenance` added; 3: the manifest's sha256 in it;
1 and 2 are still read)."""


def _pca_files(manifest: Mapping[str, Any]) -> list[str]:
    """The PCA file names (relative to the features folder) the extraction `manifest` describes fitted."""
    return [f"{stem}.npz" for stem in Processor.from_record(manifest["processor"]).pca_stems(model_taps(manifest))]


def provenance_of(features_path: str | os.PathLike) -> dict[str, Any]:
    """The sha256 of a features file, of the extraction manifest beside it and of the PCA files it names.

    These are every file (besides the checkpoint itself) whose bytes change what the run scores:
    the manifest says how images are decoded, transformed, pooled and normalised, the PCA projects
    them. Each must be what extract.py wrote (the manifest's record; a `UserError` otherwise). Without
    an extract.py manifest (e.g. planted features) there is no PCA, and `manifest_sha256` is that of
    whatever `manifest.json` lies there (None: none).
    Returns `{"features_sha256": hex, "pca_sha256": {name: hex}, "manifest_sha256": hex | None}`.
    """
    features_path = Path(features_path)
    manifest_path = features_path.parent / MANIFEST
    pcas: dict[str, str] = {}
    try:
        manifest = read_manifest(features_path) if manifest_path.is_file() else None
    except UserError:  # not an extract.py manifest (planted features): no PCA, and similarity cannot use the run
        manifest = None
    for name in _pca_files(manifest) if manifest is not None else ():
        if (features_path.parent / name).is_file():
            pcas[name] = file_sha256(features_path.parent / name)
    features_sha = file_sha256(features_path)
    if manifest is not None:  # what is recorded must be what extract.py wrote, not a file edited since
        for name, sha in ((features_path.name, features_sha), *pcas.items()):
            check_output(manifest, features_path.parent, name, sha)
    return {"features_sha256": features_sha, "pca_sha256": pcas,
            "manifest_sha256": file_sha256(manifest_path) if manifest_path.is_file() else None}


def check_provenance(ckpt: Mapping[str, Any], ckpt_path: str | os.PathLike) -> str | None:
    """Refuse (`UserError`, one line) a features file, manifest or PCA other than the ones the checkpoint was trained on.

    The features file is `ckpt["config"]["data"]` (skipped when it is gone: what encodes new images
    is the manifest and the PCA), the manifest and PCA files lie beside it. A checkpoint of format 2
    or later that lacks an entry it must have (its provenance; the sha256 of a PCA its manifest
    names; from format 3, that of the manifest) is damaged. Returns None when everything was
    checked, else a note saying what the checkpoint's format predates and so was not checked
    (format 1: everything; format 2: the manifest).
    """
    version = ckpt.get("format_version", 1)
    recorded = ckpt.get("provenance")
    if recorded is None:
        if version >= 2:
            raise UserError(f"{ckpt_path} is damaged: a format-{version} checkpoint records the sha256 of the "
                            f"features, manifest and PCA it was trained on, and this one has no provenance entry; "
                            f"retrain, or use another run")
        return (f"{ckpt_path} records no sha256 of its features file, manifest and PCA (written before checkpoint "
                f"format 2), so they are not checked; retrain to have them checked")
    features = Path(ckpt["config"]["data"])
    retrain = f"restore it, or retrain: train.py -d {features} ..."
    if features.is_file() and file_sha256(features) != recorded["features_sha256"]:
        raise UserError(f"{features} is not the features file {ckpt_path} was trained on (its sha256 differs: "
                        f"extracted again since?); {retrain}")
    note = _check_manifest_sha(recorded, features.parent / MANIFEST, version, ckpt_path, retrain)
    try:
        needed = _pca_files(read_manifest(features)) if (features.parent / MANIFEST).is_file() else []
    except UserError:  # a damaged manifest: the encoder refuses it next, in its own words
        needed = []
    unrecorded = [name for name in needed if name not in recorded["pca_sha256"]]
    if unrecorded:
        raise UserError(f"{ckpt_path} is damaged: its provenance records no sha256 of {features.parent / unrecorded[0]}, "
                        f"a PCA its features were made with; retrain, or use another run")
    for name, sha in recorded["pca_sha256"].items():
        _require_as_trained(features.parent / name, sha, "PCA", ckpt_path, "extracted again since?", retrain)
    return note


def _require_as_trained(path: Path, sha: str, what: str, ckpt_path, since: str, retrain: str) -> None:
    """Refuse `path`, the `what` the run was trained with, when it is missing or its sha256 is no longer `sha`."""
    if not path.is_file():
        raise UserError(f"{path}, the {what} {ckpt_path} was trained with, is missing; {retrain}")
    if file_sha256(path) != sha:
        raise UserError(f"{path} is not the {what} {ckpt_path} was trained with (its sha256 differs: {since}); {retrain}")


def _check_manifest_sha(recorded: Mapping[str, Any], manifest: Path, version: int, ckpt_path, retrain: str) -> str | None:
    """Refuse an extraction manifest other than the one trained with; a note when the format predates its record."""
    if "manifest_sha256" not in recorded:
        if version >= 3:
            raise UserError(f"{ckpt_path} is damaged: its provenance records no sha256 of the extraction manifest; "
                            f"retrain, or use another run")
        return (f"{ckpt_path} records no sha256 of its extraction manifest {manifest} (written before checkpoint "
                f"format 3), so edits to it are not checked; retrain to have it checked")
    sha = recorded["manifest_sha256"]
    if sha is None:
        if manifest.exists():
            raise UserError(f"{manifest} was not there when {ckpt_path} was trained; these are not the features it "
                            f"was trained on: {retrain}")
    else:
        _require_as_trained(manifest, sha, "extraction manifest", ckpt_path, "edited, or extracted again since?", retrain)
    return None


def save_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None, *,
                    model_name: str, epoch: int, config: Mapping[str, Any], test_names: Sequence[str],
                    final_metrics: Mapping[str, float], train_names: Sequence[str] = (),
                    optimizer_state: Mapping[str, Any] | None = None, val_names: Sequence[str] | None = None,
                    threshold: Mapping[str, Any] | None = None, objective: SimSiam | BYOL | None = None,
                    provenance: Mapping[str, Any] | None = None) -> None:
    """Atomically write a checkpoint of `model` (and `optimizer`) that `load_checkpoint` rebuilds.

    `provenance` (`provenance_of(features file)`) records the features, manifest and PCA trained on,
    for `check_provenance`; without it the checkpoint cannot be used to score (only pairs given in
    memory, with no features file, train without one).
    `optimizer_state` stands in for `optimizer` when the state was kept from an earlier epoch;
    `val_names` and `threshold` are written only when given (runs with a validation split).
    With `objective` (a SimSiam or BYOL around `model`), its predictor and target are kept too.
    """
    checkpoint = {
        "format_version": FORMAT_VERSION,
        "epoch": int(epoch),
        "state_dict": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else optimizer_state,
        "config": dict(config),
        "model_name": model_name,
        "in_dim": int(model.in_dim),
        "model_kwargs": model_kwargs(model),
        "test_names": list(test_names),
        "train_names": list(train_names),
        "final_metrics": dict(final_metrics),
    }
    if val_names is not None:
        checkpoint["val_names"] = list(val_names)
    if threshold is not None:
        checkpoint["threshold"] = dict(threshold)
    if provenance is not None:
        checkpoint["provenance"] = {"features_sha256": provenance["features_sha256"],
                                    "pca_sha256": dict(provenance["pca_sha256"]),
                                    "manifest_sha256": provenance["manifest_sha256"]}
    if objective is not None:
        checkpoint["objective"] = {
            "name": objective.name,
            "predictor_hidden": objective.predictor.hidden,
            "ema": getattr(objective, "ema", None),
            "predictor": objective.predictor.state_dict(),
            "target": objective.target.state_dict() if objective.target is not None else None,
        }
    # Serialised in memory first: torch.save into a real file reports a failed write (full disk, file size
    # limit) as a RuntimeError about zip positions, while a plain write raises the OSError that says why.
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    with atomic_path(path, suffix=".pt") as tmp, open(tmp, "wb") as fh:
        fh.write(buffer.getbuffer())


CHECKPOINT_KEYS = ("epoch", "state_dict", "optimizer", "config", "model_name", "in_dim", "model_kwargs", "test_names")
"""Keys every checkpoint written by train.py holds (see `load_checkpoint`)."""
_CHECKPOINT_TYPES = {"epoch": int, "state_dict": dict, "optimizer": (dict, type(None)), "config": dict,
                     "model_name": str, "in_dim": int, "model_kwargs": dict, "test_names": list}


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a trained model from a train.py checkpoint (`RUN_DIR/model_and_optimizer.pt`).

    The file is read with `torch.load(weights_only=True)`, so loading it never runs code.

    Args:
        path: the checkpoint file.
        device: where to put the model.

    Returns:
        `(model, checkpoint)`: the model in eval mode on `device`, and the checkpoint dict with
        the keys of `CHECKPOINT_KEYS`: `epoch` (int), `state_dict`, `optimizer` (the Adam state,
        None for `dummy`), `config` (plain dict; `config["data"]` is the absolute path of the
        features file it was trained on), `model_name`, `in_dim`, `model_kwargs`, `test_names`
        (list of str), plus `final_metrics` (dict of floats) and `train_names` (the run's training
        pairs: with `test_names`, its split); with a validation split also `val_names` and `threshold`
        (checked with `adaptation.calibration.Threshold.from_dict`).

    Raises:
        UserError: a missing or unreadable file, one that is not a train.py checkpoint, or one whose
        entries (the optional `val_names` and `threshold` included) have the wrong types or values.

    Example:
        >>> model, ckpt = load_checkpoint("runs/run1/model_and_optimizer.pt")   # doctest: +SKIP
        >>> ckpt["config"]["data"]                                             # doctest: +SKIP
        '/data/tll/clip_rn50x4/features_pca256.npy'
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, struct.error, OSError, ValueError) as err:
        # A corrupt zip is a RuntimeError, a non-tensor object refused by weights_only an
        # UnpicklingError, a truncated file EOFError; none of them should show a traceback.
        raise UserError(f"cannot read checkpoint {path}: {first_line(err)}") from None
    _check_structure(path, ckpt)
    _check_weights(path, ckpt)
    model = build_model(ckpt["model_name"], ckpt["in_dim"], **ckpt["model_kwargs"])
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as err:
        raise UserError(f"{path}: weights do not fit model {ckpt['model_name']!r}: {first_line(err)}") from None
    return model.to(device).eval(), ckpt


def _check_weights(path: str, ckpt: dict) -> None:
    """Refuse model arguments that cannot build the model, and weights that are not finite numbers.

    The model is first built on the meta device (shapes only, no memory), so a damaged `out_dim`
    of 10**12 is refused like one of "x", instead of allocating it or raising from deep in torch.
    """
    try:
        with torch.device("meta"):
            shapes = build_model(ckpt["model_name"], ckpt["in_dim"], **ckpt["model_kwargs"]).state_dict()
    except (TypeError, ValueError, RuntimeError) as err:
        raise UserError(f"{path} is damaged: model_kwargs {ckpt['model_kwargs']!r} cannot build model "
                        f"{ckpt['model_name']!r} ({first_line(err)}); retrain, or use another run") from None
    weights = ckpt["state_dict"]
    want = {name: tuple(t.shape) for name, t in shapes.items()}
    got = {name: tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__ for name, t in weights.items()}
    if got != want:  # before the real model is built: its size comes from the (maybe damaged) model_kwargs
        differ = sorted(n for n in set(want) | set(got) if want.get(n) != got.get(n))
        said = "; ".join(f"{n}: the model wants {want.get(n, 'nothing')}, the file holds {got.get(n, 'nothing')}"
                         for n in differ[:3])
        raise UserError(f"{path}: weights do not fit model {ckpt['model_name']!r} with {ckpt['model_kwargs']!r}: "
                        f"{said}")
    for name, tensor in weights.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise UserError(f"{path} is damaged: weight {name} holds NaN or infinite values; retrain, or use "
                            f"another run")


def _check_structure(path: str, ckpt: Any) -> None:
    """Refuse (a `UserError`) a loaded checkpoint that lacks a key or holds one of the wrong type or value."""
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise UserError(f"{path} is not a train.py checkpoint: missing {', '.join(missing)}")
    version = ckpt.get("format_version", FORMAT_VERSION)  # checkpoints from before versioning hold none
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= FORMAT_VERSION:
        raise UserError(f"{path} has checkpoint format {version!r}, which this toolkit cannot read (it reads "
                        f"1 to {FORMAT_VERSION}); use the toolkit version that wrote it, or retrain")
    # The structure, checked here where the format is read, so a damaged file is one line, not a KeyError.
    wrong = [k for k, kind in _CHECKPOINT_TYPES.items() if not isinstance(ckpt[k], kind) or isinstance(ckpt[k], bool)]
    if not wrong and not all(isinstance(n, str) for n in ckpt["test_names"]):
        wrong = ["test_names"]
    if wrong:
        raise UserError(f"{path} is damaged: {', '.join(wrong)} "
                        f"{'has' if len(wrong) == 1 else 'have'} the wrong type; retrain, or use another run")
    if "val_names" in ckpt and not (isinstance(ckpt["val_names"], list)
                                    and all(isinstance(n, str) for n in ckpt["val_names"])):
        raise UserError(f"{path} is damaged: val_names is not a list of names; retrain, or use another run")
    if "provenance" in ckpt and not _is_provenance(ckpt["provenance"]):
        raise UserError(f"{path} is damaged: provenance is not {{\"features_sha256\": hex, \"pca_sha256\": "
                        f"{{file name: hex}}, \"manifest_sha256\": hex or null}}; retrain, or use another run")
    if "threshold" in ckpt:
        try:
            Threshold.from_dict(ckpt["threshold"])
        except ValueError as err:
            raise UserError(f"{path} is damaged: its calibrated threshold is wrong ({err}); retrain with "
                            f"--val-split, or use another run") from None


def _is_provenance(record: Any) -> bool:
    def sha(v: Any) -> bool:
        return isinstance(v, str) and len(v) == 64

    pcas = record.get("pca_sha256") if isinstance(record, dict) else None
    return (isinstance(record, dict) and sha(record.get("features_sha256")) and isinstance(pcas, dict)
            and (record.get("manifest_sha256") is None or sha(record["manifest_sha256"]))
            and all(isinstance(k, str) and k and not k.startswith("/") and ".." not in k.split("/") and sha(v)
                    for k, v in pcas.items()))


def load_objective(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[SimSiam | BYOL, dict[str, Any]]:
    """Rebuild a simsiam or byol run's whole objective (encoder, predictor, target), e.g. to resume it.

    Returns:
        `(objective, checkpoint)`, the objective on `device` in eval mode.

    Raises:
        UserError: what `load_checkpoint` raises, or a checkpoint without an objective (contrastive).
    """
    model, ckpt = load_checkpoint(path, device)
    heads = ckpt.get("objective")
    if not isinstance(heads, dict):
        raise UserError(f"{os.fspath(path)} was trained with the contrastive loss: it has no predictor or target")
    missing = [k for k in ("name", "predictor_hidden", "predictor", "target") if k not in heads]
    if missing:
        raise UserError(f"{os.fspath(path)}: the objective's record lacks {', '.join(missing)}")
    ema = heads.get("ema")
    objective = build_objective(heads["name"], model, ema=DEFAULT_EMA if ema is None else ema,
                                predictor_hidden=heads["predictor_hidden"])
    try:
        objective.predictor.load_state_dict(heads["predictor"])
        if objective.target is not None:
            objective.target.load_state_dict(heads["target"])
    except (RuntimeError, AttributeError) as err:
        raise UserError(f"{os.fspath(path)}: predictor or target weights do not fit: {first_line(err)}") from None
    return objective.to(device).eval(), ckpt
