"""Shared fixtures: tiny random-init backbones and synthetic images drawn here."""

from __future__ import annotations

import contextlib
import functools
import os
import random
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Never touch the network from the tests: a missing weight must fail at once.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
CACHE_HOME: list[str] = []  # the test session's XDG_CACHE_HOME (pytest_configure)


def pytest_configure(config):
    # Engine graphs (featuresExtractor.graph_cache) go to the user's cache folder: the tests, and the
    # scripts they start, use a folder of their own, never the real one, removed when the session ends.
    CACHE_HOME.append(tempfile.mkdtemp(prefix="tests-cache-"))
    os.environ["XDG_CACHE_HOME"] = CACHE_HOME[0]


def pytest_unconfigure(config):
    for folder in CACHE_HOME:
        shutil.rmtree(folder, ignore_errors=True)


TINY = ["--model", "tiny_rn", "--pretrained", "none", "--workers", "0", "--no-progress"]
"""extract.py's flags for the tiny random-init backbone (see `tiny_backbone`), read in this process, no bar."""


def script_cli(script):
    """`cli(argv, capsys)` for one script's tests: `run_script` bound to `script`."""
    return functools.partial(run_script, script)


def run_script(script, argv, capsys) -> tuple[int, str, str]:
    """Run a script's `main` in this process as its command line would (`run_cli`): (exit code, stdout, stderr)."""
    from toolkit.cli import run_cli

    code = run_cli(script.main, [str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def refused_in_one_line(script, argv, capsys, output: Path) -> str:
    """Run a script on bad input and check the refusal: exit 2, one error line, no traceback and `output` not
    created; argparse's own errors (its SystemExit) count the same. Returns stderr, for the message's checks."""
    try:
        code, _, err = run_script(script, argv, capsys)
    except SystemExit as exc:
        code, err = exc.code, capsys.readouterr().err
    assert code == 2, err
    assert len([line for line in err.splitlines() if "error" in line]) == 1 and "Traceback" not in err, err
    assert not output.exists()
    return err


TORCH_BLOCKER = '''import sys
class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "open_clip", "torchvision", "timm"):
            raise ImportError(name + " is made unimportable by this test")
sys.meta_path.insert(0, Blocker())
'''


def torch_free_env(folder: Path, **extra: str) -> dict[str, str]:
    """An environment whose Python processes cannot import torch, open_clip, torchvision or timm (a
    sitecustomize.py written into `folder` refuses them) and import this repository; `extra` added."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(TORCH_BLOCKER)
    return dict(os.environ, PYTHONPATH=f"{folder}{os.pathsep}{ROOT}", **extra)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for a process group's rendezvous)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def planted_features(path: Path, n_pairs: int, dim: int = 16, signal_dim: int = 4) -> Path:
    """Save a features file of `n_pairs` planted pairs (with flipped copies) at `path`; returns `path`."""
    import numpy as np

    from synthetic.planted import planted_array

    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, planted_array(n_pairs, dim, signal_dim=signal_dim, nuisance=2.0, seed=0))
    return path


def run_bounded(cmd, timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """`subprocess.run(cmd, capture_output=True, text=True)` that ends every process it started.

    The command runs in its own session, and on a time-out the whole process group is killed:
    `subprocess.run` alone kills only the direct child, which would leave torchrun's ranks running.
    """
    proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, **kwargs)
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    finally:
        # A rank that outlived its launcher (the launcher exited first) is ended too.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def spawn_ranks(fn, args, nprocs: int, timeout: float = 120):
    """Start `nprocs` processes of `fn(rank, *args)` and wait for them, killing them all past `timeout`.

    A rank that raises makes `join` end the others and re-raise here.
    """
    import pytest
    import torch.multiprocessing as mp

    ctx = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("ranks did not finish in time")
    return ctx


def draw_image(path: Path, seed: int, size=(80, 96), mode: str = "RGB") -> Path:
    """A small image with a few seeded shapes, saved in a format fit for `mode`."""
    from PIL import Image, ImageDraw

    r = random.Random(seed)
    img = Image.new("RGB", size, tuple(r.randrange(256) for _ in range(3)))
    d = ImageDraw.Draw(img)
    for _ in range(4):
        x0, y0 = r.randrange(size[0] - 20), r.randrange(size[1] - 20)
        box = (x0, y0, x0 + r.randrange(8, 40), y0 + r.randrange(8, 40))
        colour = tuple(r.randrange(256) for _ in range(3))
        (d.ellipse if r.random() < 0.5 else d.rectangle)(box, fill=colour)
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode != "RGB":
        img = img.convert(mode)
    img.save(path)
    return path


def make_pairs(root: Path, n: int, seed: int = 0, ext: str = ".png") -> list[str]:
    """A TLL-style folder: left/NAME and right/NAME for n pairs."""
    names = [f"pair{i:03d}{ext}" for i in range(n)]
    for i, name in enumerate(names):
        draw_image(root / "left" / name, seed * 1000 + 2 * i)
        draw_image(root / "right" / name, seed * 1000 + 2 * i + 1)
    return names


@pytest.fixture(scope="session")
def tiny_backbone():
    """open_clip's ModifiedResNet at layers [1,1,1,1], width 8, 64 px, random weights (seeded)."""
    import torch

    from featuresExtractor.backbones import load_backbone, resolve_spec

    torch.manual_seed(0)
    return load_backbone(resolve_spec("tiny_rn"))


@pytest.fixture
def pairs_dir(tmp_path) -> Path:
    root = tmp_path / "tll"
    make_pairs(root, 5)
    return root
