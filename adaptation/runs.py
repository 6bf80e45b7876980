"""The runs folder train.py writes (`--save-to RUNS`); this module owns its layout.

    RUNS/
      run1/ ... runN/     one folder per run: config.json, metrics.json, the checkpoint
                          (`adaptation.checkpoint`) and its TensorBoard events
      avg/                the mean curves over runs (TensorBoard), only when there are several
      summary.json        {"config": ..., "final": {figure: {"mean", "std", "values"}}}, plus
                          "collapse" for the positive-pair objectives (see `collapse_verdict`)

Only these entries belong to train.py: replacing earlier runs touches nothing else in the
folder. `replacing` sets the earlier entries aside while the new runs are written and puts
them back if that fails, so a failed or interrupted run loses nothing.

Example:
    >>> summarise([{"Test/top 1": 0.5}, {"Test/top 1": 0.7}])["Test/top 1"]["mean"]
    0.6
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from toolkit.folders import FolderFormat, check_shared_folder, replacing_entries
from toolkit.utils import UserError, read_json, write_json

from .checkpoint import BEST_CHECKPOINT, CHECKPOINT
from .objectives import COLLAPSE_RATIO, is_collapsed

__all__ = ["SUMMARY", "AVERAGE", "ASIDE", "run_dir", "RUNS_FOLDER", "check_save_to", "replacing", "summarise",
           "average_curves", "write_summary", "collapse_verdict", "read_summary"]

SUMMARY = "summary.json"
AVERAGE = "avg"
ASIDE = ".replaced"
"""Where earlier runs wait while an overwriting run is written."""
def run_dir(save_to: str | Path, run: int) -> Path:
    """The folder of run number `run` (from 1)."""
    return Path(save_to) / f"run{run}"


def _own_run(path: Path) -> bool:
    """`runN/` as train.py writes it: a real folder whose config.json says it is run N, holding only a run's files."""
    if path.is_symlink() or not path.is_dir() or not _RUN.match(path.name):
        return False
    try:
        config = json.loads((path / "config.json").read_text())
        entries = os.listdir(path)
    except (OSError, ValueError):
        return False
    return (isinstance(config, dict) and config.get("run") == int(path.name[3:]) and "seed" in config
            and all(any(fnmatch.fnmatchcase(e, p) for p in _RUN_FILES) for e in entries))


def _own_entry(path: Path) -> bool:
    """Whether an entry of the runs folder bearing one of train.py's names is one train.py wrote.

    A run: `_own_run`. summary.json: a JSON object with the summary's `config` and `final`. avg/: a
    folder of TensorBoard event files only, beside at least one run train.py wrote.
    """
    if path.name == SUMMARY:
        try:
            summary = json.loads(path.read_text()) if path.is_file() and not path.is_symlink() else None
        except (OSError, ValueError):
            return False
        return isinstance(summary, dict) and isinstance(summary.get("config"), dict) and isinstance(summary.get("final"), dict)
    if path.name == AVERAGE:
        if path.is_symlink() or not path.is_dir():
            return False
        return (all(fnmatch.fnmatchcase(e, _EVENTS) for e in os.listdir(path))
                and any(_own_run(p) for p in path.parent.iterdir() if _RUN.match(p.name)))
    return _own_run(path)


_RUN = re.compile(r"^run\d+$")
_EVENTS = "events.out.tfevents.*"
_RUN_FILES = ("config.json", "metrics.json", CHECKPOINT, BEST_CHECKPOINT, _EVENTS, ".*.tmp*")
"""What a run folder holds: its files, TensorBoard's events and atomic writes' temporary names."""

RUNS_FOLDER = FolderFormat("a runs folder", ("run[0-9]*", AVERAGE, SUMMARY), lambda folder: True, own=_own_entry)
"""The runs folder as `toolkit.folders` sees it: the entries train.py writes, and how each is told to be its
own (other files may live beside them, and are kept)."""


def check_save_to(save_to: Path, overwrite: bool) -> list[Path]:
    """What `overwrite` will replace (`toolkit.folders.check_shared_folder`); refuse a runs folder without it.

    Other files beside the runs are kept (notes, say). Refused even with `overwrite`: a folder
    holding none of train.py's entries (an extraction, an index, anything else), and an entry
    named like one of train.py's that train.py did not write (a user's `run2024/` or `summary.json`).

    Raises:
        UserError: `save_to` is a file or a folder train.py may not write, or holds runs and `overwrite` is False.
    """
    aside = save_to / ASIDE
    if aside.exists():
        raise UserError(_interrupted(save_to))
    return check_shared_folder(save_to, RUNS_FOLDER, overwrite=overwrite, flag="save_to",
                               not_empty=f"save_to {save_to} already exists and is not empty; choose another folder "
                                         f"or pass overwrite")


def _interrupted(save_to: Path) -> str:
    aside = save_to / ASIDE
    return (f"{aside} holds runs set aside by an interrupted --overwrite; move them back into {save_to} or delete "
            f"{aside}, then re-run")


def replacing(save_to: Path, old: Sequence[Path]) -> contextlib.AbstractContextManager[None]:
    """Run the block with `old` (earlier runs being replaced) set aside (`toolkit.folders.replacing_entries`).

    They are deleted once the block has succeeded; if it fails or is interrupted, what
    it wrote is removed and they are put back.

    Raises:
        UserError: runs set aside by an earlier interrupted replacement are still there.
    """
    return replacing_entries(save_to, old, RUNS_FOLDER, ASIDE, _interrupted(save_to))


def summarise(finals: Sequence[dict[str, float]]) -> dict[str, dict]:
    """Mean and std over runs of each final figure; std is the sample std (ddof=1), 0 for one run."""
    summary: dict[str, dict] = {}
    for name in finals[0]:
        values = [f[name] for f in finals]
        std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
        summary[name] = {"mean": float(np.mean(values)), "std": std, "values": values}
    return summary


def average_curves(histories: Sequence[Sequence[dict[str, float]]]) -> list[dict[str, float]]:
    """Per epoch, the mean over runs of each figure (rows keep their `epoch`)."""
    curves = []
    for epoch_rows in zip(*histories):
        row = {name: float(np.mean([r[name] for r in epoch_rows])) for name in epoch_rows[0] if name != "epoch"}
        curves.append({"epoch": epoch_rows[0]["epoch"], **row})
    return curves


def write_summary(save_to: Path, config: dict[str, Any], summary: dict[str, dict],
                  best_val: dict[str, Any] | None = None, collapse: dict[str, Any] | None = None) -> None:
    """Atomically write `RUNS/summary.json`: `config`, `final` (the last epochs) and, with a
    validation split, `best_val` (each run's best validation epoch under `epochs`, and the figures there);
    `collapse` (from `collapse_verdict`, simsiam and byol runs) is added when given."""
    report: dict[str, Any] = {"config": config, "final": summary}
    if best_val is not None:
        report["best_val"] = best_val
    if collapse is not None:
        report["collapse"] = collapse
    write_json(Path(save_to) / SUMMARY, report)


def collapse_verdict(stds: Sequence[float], dim: int) -> dict[str, Any]:
    """The summary's collapse record from each run's final `Train/output std` of `dim`-d outputs.

    Returns:
        `{"output_std": [...], "healthy": 1/sqrt(dim), "threshold": ..., "collapsed": [bool per run],
        "verdict": "collapsed in k of n runs" or "no run collapsed"}`.
    """
    collapsed = [is_collapsed(s, dim) for s in stds]
    k = sum(collapsed)
    return {
        "output_std": [float(s) for s in stds],
        "healthy": 1.0 / math.sqrt(dim),
        "threshold": COLLAPSE_RATIO / math.sqrt(dim),
        "collapsed": collapsed,
        "verdict": f"collapsed in {k} of {len(stds)} runs" if k else "no run collapsed",
    }


def read_summary(save_to: str | Path) -> dict[str, Any]:
    """Read `RUNS/summary.json` (a damaged one is a `UserError` naming it)."""
    return read_json(Path(save_to) / SUMMARY)
