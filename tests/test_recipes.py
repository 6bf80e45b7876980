"""The guides' two recipes run end to end, as written, on a tiny backbone.

"Your pairs, then search" (guides/your_pairs.md) and "Deploy without torch" (guides/deploy.md): every
command of the recipe is taken from the guide itself, in order, and run through its script's `main` (the
server, and every command of the torch-free recipe, as a process). Only what a tiny
fixture cannot be is changed: the backbone (`tiny_rn`, random init), the PCA's size (the fixture has
fewer images than 256), the epochs, and the placeholders (images, folders, a free port). The deploy
recipe runs in a fresh venv holding `requirements-deploy.txt` alone: no torch.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from conftest import ROOT, free_port

PAIRS = 40
TINY = ["--model", "tiny_rn", "--pretrained", "none", "--workers", "0"]


def recipe(guide: str) -> list[list[str]]:
    """The commands of a guide's fenced blocks, in order: `python SCRIPT.py ...` lines, as argv after the script."""
    text = (ROOT / "guides" / guide).read_text()
    blocks = re.findall(r"```sh\n(.*?)```", text, flags=re.S)
    return [line.split() for block in blocks for line in block.splitlines()
            if re.match(r"python \w+\.py ", line)]


def _substitute(argv: list[str], names: dict[str, str]) -> list[str]:
    out = []
    for word in argv:
        word = names.get(word, word)
        word = word.replace("features_pca256", "features_pca8").replace("/clip_rn50x4/", "/tiny_rn/")
        out.append(word)
    if out[1] == "extract.py":
        out = [w if w != "256" else "8" for w in out] + TINY + ["--no-progress"]
    if out[1] == "train.py":
        out[out.index("-e") + 1] = "3"
        out += ["--cpu", "--seed", "0", "--no-images"]
    return out


def _run(argv: list[str], cwd: Path, python: str = sys.executable, env: dict | None = None) -> str:
    done = subprocess.run([python, *argv[1:]], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env=env or dict(os.environ, PYTHONPATH=str(ROOT)))
    assert done.returncode == 0, f"{' '.join(argv)}\n{done.stderr[-2000:]}"
    return done.stdout


def _run_here(argv: list[str], cwd: Path) -> None:
    """`python SCRIPT.py ARGS` run through the script's own `main` in this process (as `run_cli` runs it from
    the command line), in `cwd`: the same code path without a torch import per command."""
    from toolkit.cli import run_cli

    script = importlib.import_module(Path(argv[1]).stem)
    before = Path.cwd()
    os.chdir(cwd)
    try:
        code = run_cli(script.main, argv[2:])
    finally:
        os.chdir(before)
    assert code == 0, " ".join(argv)


def _absolute(argv: list[str]) -> list[str]:
    return [argv[0], str(ROOT / argv[1]), *argv[2:]]


class Server:
    """`similarity.py ... serve` as a process on a free loopback port, ended by pid whatever happens."""

    def __init__(self, argv: list[str], cwd: Path, python: str, env: dict):
        self.port = free_port()
        argv = [w for w in argv]
        if "--port" in argv:
            argv[argv.index("--port") + 1] = str(self.port)
        else:
            argv += ["--port", str(self.port)]
        self.proc = subprocess.Popen([python, *argv[1:]], cwd=cwd, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def ready(self, limit: float = 120) -> dict:
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.proc.stdout.read()
            try:
                with urllib.request.urlopen(self.url("/readyz"), timeout=5) as r:
                    return json.load(r)
            except OSError:
                time.sleep(0.5)
        raise AssertionError("the server was not ready in time")

    def search(self, image: Path, k: int = 3) -> dict:
        boundary = uuid.uuid4().hex
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{image.name}\"\r\n"
                f"Content-Type: image/jpeg\r\n\r\n").encode() + image.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
        req = urllib.request.Request(self.url(f"/v1/search?k={k}"), data=body, method="POST",
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        with urllib.request.urlopen(req, timeout=60) as r:
            return json.load(r)

    def stop(self) -> int:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                return self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture(scope="module")
def your_pairs(tmp_path_factory):
    """The whole "your pairs, then search" recipe run in a fresh folder; yields the folder and the names."""
    from synthetic.drawn_images import make_pairs

    work = tmp_path_factory.mktemp("recipe")
    names = make_pairs(work / "PAIRS", n_pairs=PAIRS, seed=0)
    (work / "MORE").mkdir()
    more = work / "MORE" / "extra.jpg"
    more.write_bytes((work / "PAIRS" / "right" / names[-1]).read_bytes())
    places = {"PAIRS": "PAIRS", "GALLERY": "PAIRS/right", "MORE_IMAGES": "MORE",
              "A.jpg": f"PAIRS/left/{names[0]}", "B.jpg": f"PAIRS/right/{names[0]}",
              "QUERY.jpg": f"PAIRS/left/{names[1]}", "Q1.jpg": f"PAIRS/left/{names[2]}", "QUERY_DIR": "PAIRS/left"}
    commands = [_substitute(c, places) for c in recipe("your_pairs.md")]
    served = None
    for argv in commands:
        if "serve" in argv:
            served = argv
            continue
        _run_here(argv, work)
    return work, names, served


def test_your_pairs_recipe_runs_and_serves(your_pairs):
    work, names, served = your_pairs
    assert (work / "runs" / "summary.json").is_file() and (work / "gallery_index" / "manifest.json").is_file()
    hits = json.loads((work / "hits.json").read_text())
    assert hits, "search wrote no results"
    assert served is not None, "the recipe has no serve command"
    server = Server(_absolute(served), work, sys.executable, dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        ready = server.ready()
        assert ready["index"]["size"] == PAIRS + 1
        found = server.search(work / "PAIRS" / "right" / names[3])
        assert found["results"][0]["name"].endswith(names[3])
    finally:
        assert server.stop() == 0


@pytest.fixture(scope="module")
def torch_free_python(tmp_path_factory):
    """A fresh venv with requirements-deploy.txt alone (pip's cache makes a second install quick)."""
    venv = tmp_path_factory.mktemp("deploy") / "venv"
    # without pip of its own (ensurepip costs seconds): this venv's pip installs into it (pip --python)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = str(venv / "bin" / "python")
    pip = subprocess.run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--disable-pip-version-check",
                          "-r", str(ROOT / "requirements-deploy.txt")], capture_output=True, text=True, timeout=480)
    if pip.returncode != 0:
        pytest.fail(f"the torch-free install failed: {pip.stderr[-1500:]}")
    probe = subprocess.run([python, "-c", "import importlib.util as u; print(u.find_spec('torch'))"],
                           capture_output=True, text=True, check=True)
    assert probe.stdout.strip() == "None", "requirements-deploy.txt brought torch in"
    return python


def test_deploy_recipe_runs_without_torch(your_pairs, torch_free_python):
    work, names, _ = your_pairs
    places = {"RUNS/run1": "runs/run1", "A.jpg": f"PAIRS/left/{names[0]}", "B.jpg": f"PAIRS/right/{names[0]}",
              "QUERY.jpg": f"PAIRS/left/{names[1]}", "GALLERY": "PAIRS/right", "INDEX_DIR": "onnx_index"}
    commands = [_substitute(c, places) for c in recipe("deploy.md")]
    export = [c for c in commands if "export" in c]
    assert export, "the deploy guide shows no export"
    _run_here(export[0], work)  # the export needs torch: the project's venv
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", str(work)), "PYTHONPATH": str(ROOT)}
    served = None
    for argv in commands:
        if "export" in argv:
            continue
        if "serve" in argv:
            served = argv
            continue
        _run(_absolute(argv), work, torch_free_python, env)
    assert served is not None, "the deploy guide shows no serve command"
    (work / "key.txt").write_text("a-key-only-this-test-knows\n")
    server = Server(_absolute(served), work, torch_free_python, env)
    try:
        ready = server.ready()
        assert ready["index"]["size"] == PAIRS
        found = server.search(work / "PAIRS" / "right" / names[4])
        assert found["results"][0]["name"].endswith(names[4])
    finally:
        assert server.stop() == 0
