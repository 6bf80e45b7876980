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
import math
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from toolkit.folders import FolderFormat, describe_entries, replacing_entries
from toolkit.utils import UserError, read_json, write_json

from .objectives import COLLAPSE_RATIO, is_collapsed

__all__ = ["SUMMARY", "AVERAGE", "ASIDE", "run_dir", "is_run_entry", "check_save_to", "replacing", "summarise",
           "average_curves", "write_summary", "collapse_verdict", "read_summary"]

SUMMARY = "summary.json"
AVERAGE = "avg"
ASIDE = ".replaced"
"""Where earlier runs wait while an overwriting run is written."""
_ENTRY = re.compile(r"^(run\d+|avg|summary\.json)$")


def run_dir(save_to: str | Path, run: int) -> Path:
    """The folder of run number `run` (from 1)."""
    return Path(save_to) / f"run{run}"


def is_run_entry(name: str) -> bool:
    """Whether a name in the runs folder is one train.py writes (and may replace)."""
    return bool(_ENTRY.match(name))


def check_save_to(save_to: Path, overwrite: bool) -> list[Path]:
    """What `overwrite` will replace; refuse a non-empty folder without it. Deletes nothing itself.

    Other files beside the runs are kept (notes, say); a folder holding none of train.py's entries
    (an extraction, an index, anything else) is not a runs folder and is refused even with `overwrite`.

    Raises:
        UserError: `save_to` is a file, a non-empty folder and `overwrite` is False, or not a runs folder.
    """
    if save_to.exists() and not save_to.is_dir():
        raise UserError(f"save_to {save_to} exists and is not a folder")
    entries = sorted(save_to.iterdir()) if save_to.is_dir() else []
    if entries and not overwrite:
        raise UserError(f"save_to {save_to} already exists and is not empty; choose another folder or pass overwrite")
    ours = [e for e in entries if is_run_entry(e.name) or e.name == ASIDE]
    if entries and not ours:
        # Not a runs folder (an extraction, an index, something else): overwrite replaces runs only.
        raise UserError(f"save_to {save_to} is not a runs folder (it holds "
                        f"{describe_entries(save_to, [e.name for e in entries])}); overwrite replaces only the runs "
                        f"train.py wrote, and this folder is left alone: choose another folder")
    return [e for e in ours if e.name != ASIDE]


RUNS_FOLDER = FolderFormat("a runs folder", ("run[0-9]*", "avg", "summary.json"), lambda folder: True)
"""The runs folder as `toolkit.folders` sees it: the entries train.py writes (other files may live beside them)."""


def replacing(save_to: Path, old: Sequence[Path]) -> contextlib.AbstractContextManager[None]:
    """Run the block with `old` (earlier runs being replaced) set aside (`toolkit.folders.replacing_entries`).

    They are deleted once the block has succeeded; if it fails or is interrupted, what
    it wrote is removed and they are put back.

    Raises:
        UserError: runs set aside by an earlier interrupted replacement are still there.
    """
    aside = save_to / ASIDE
    return replacing_entries(save_to, old, RUNS_FOLDER, ASIDE,
                             f"{aside} holds runs set aside by an interrupted --overwrite; move them back into "
                             f"{save_to} or delete {aside}, then re-run")


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
