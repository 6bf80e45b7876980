"""Ctrl-C on a torchrun job of train.py and of extract.py: every rank unwinds, none aborts, nothing half-written.

The terminal sends SIGINT to the whole foreground process group (the launcher and its ranks); here
the group is the one `torchrun` leads in its own session. torchrun's launcher then sends its ranks a
second signal, which must not cut their clean-up short.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from adaptation.planted import planted_array
from conftest import ROOT, free_port, make_pairs


def _launch(script: str, args: list, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(ROOT / script), *map(str, args)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            cwd=cwd, env=env)


def _interrupt_when(proc: subprocess.Popen, ready, timeout: float = 120) -> tuple[int, str, str]:
    """Wait until `ready()` holds, send SIGINT to the job's process group as a terminal would, collect the output."""
    try:
        deadline = time.monotonic() + timeout
        while not ready():
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the job never got going"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=90)
        return proc.returncode, out, err
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()


def _no_rank_died_of_a_signal(err: str, prog: str) -> None:
    # torchrun reports each failed rank as "exitcode : N"; a rank killed by a signal reads -N (SIGABRT: -6).
    codes = [int(c) for c in re.findall(r"exitcode\s*:\s*(-?\d+)", err)]
    assert all(c >= 0 for c in codes), err[-3000:]
    assert "SIGABRT" not in err and "terminate called" not in err, err[-3000:]
    # No rank printed a traceback (torchrun's launcher prints its own for the signal it got).
    assert f'{prog}", line' not in err and "adaptation/" not in err and "featuresExtractor/" not in err, err[-3000:]
    assert err.count(f"{prog}: interrupted") == 1, err[-3000:]


def test_ctrl_c_on_torchrun_train_leaves_no_run(tmp_path):
    np.save(tmp_path / "features.npy", planted_array(200, 16, signal_dim=4, nuisance=2.0, seed=0))
    runs = tmp_path / "runs"
    proc = _launch("train.py", ["-d", tmp_path / "features.npy", "-s", runs, "-e", "100000", "--batch-size", "16",
                                "--no-images", "--cpu", "--seed", "0"], tmp_path)
    code, _, err = _interrupt_when(proc, lambda: (runs / "run1" / "config.json").exists())
    assert code != 0
    _no_rank_died_of_a_signal(err, "train.py")
    assert not runs.exists() or not any(runs.iterdir())  # the run that was being written is gone


def test_ctrl_c_on_torchrun_extract_keeps_finished_batches_and_resumes(tmp_path):
    make_pairs(tmp_path / "tll", 24, seed=1)
    out = tmp_path / "out"
    flags = ["-b", "2", "--model", "tiny_rn", "--pretrained", "none", "--workers", "0", "--no-progress",
             "-p", "adapt-pca", "4"]
    argv = ["-d", tmp_path / "tll", "-s", out, *flags]
    partial = out / "tiny_rn" / ".partial"
    code, _, err = _interrupt_when(_launch("extract.py", argv, tmp_path),
                                   lambda: len(list(partial.glob("chunk_*.npz"))) >= 2)
    assert code != 0
    _no_rank_died_of_a_signal(err, "extract.py")
    assert not (out / "tiny_rn" / "manifest.json").exists()  # nothing looks complete
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    again = subprocess.run([sys.executable, str(ROOT / "extract.py"), *map(str, argv)], capture_output=True,
                           text=True, cwd=tmp_path, env=env, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert re.search(r"^kept (\d+)/\1 items \(resumed after [1-9]\d*\)$", again.stdout, re.M), again.stdout
    assert (out / "tiny_rn" / "manifest.json").is_file()
