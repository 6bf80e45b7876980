"""Whole processes of this toolkit against the paper's own code (VieVie31/visual-similarity), side by side.

The paper's code is not part of this repository (licence, provenance): pass a checkout of
https://github.com/VieVie31/visual-similarity with `--paper-code DIR`. Nothing in it is edited.

Two cases, each a fresh process per run, timed from interpreter start to exit (wall clock, with
the CPU seconds and peak RSS of the process and its workers). Ours and the paper's alternate
(ours, paper, ours, paper, ...) so that load from other processes hits both alike; the table gives
each pair's ratio paper / ours and the medians. An untimed `import torch, open_clip, sklearn`
process runs first so that neither side pays for a cold page cache.

**extract**: `--pairs` generated look-alike pairs (200x250 JPEGs, `synthetic.drawn_images`),
with flipped copies (4 x pairs images), CLIP RN50x4 with random weights (nothing can be
downloaded), fp32 on the CPU, batch 16, `adapt-pca 8`:

    ours:  python extract.py -d DATA -s OUT -b 16 --data-aug --processor adapt-pca 8 --pretrained none --precision fp32
    paper: python run_extract.py PAPER clip_rn50x4 -d DATA -s OUT -b 16 --data-aug --processor adapt-pca 8

Ours runs with XDG_CACHE_HOME in a fresh folder this script makes, so its first run finds an empty
cache (an engine cache builds there) and later runs find it filled: the first run is reported
apart from the later ones. `--pretrained none` draws the same weights every time (seed 0), so a
cache keyed by the weights can hit. What that folder holds after the runs (files, MiB) is reported.

The paper's extract.py runs every model of its `models_dict` (37 extractors, most downloaded through
torch.hub). `run_extract.py`, written by this script, imports the paper's `featuresExtractor`, keeps
`clip_rn50x4` alone in that dict, then runs the paper's extract.py as `__main__` with the arguments
above. Importing the paper's models.py still builds its four CLIP models' transforms (`clip.load`
of RN50x4, RN50, RN101 and ViT-B/32) and `load_clip_model` builds RN50x4 twice more: that is the
paper's own start-up and is timed.

**train**: 6,016 planted 256-d pairs with one flipped copy each (`synthetic.planted`, the data of
bench/train.py), in the paper's pickled-dict layout (`pairs_file.to_paper_dict`), the only layout the
paper's train.py reads; ours reads it with --allow-pickle. The paper's README command without --gpu:

    ours:  python train.py -d EMBDS.NPY --model original -s RUNS -e 10 -r 1 -t 15 --test-split 0.25 -k 1 3 5 --precision fp32 --allow-pickle
    paper: python PAPER/train.py -d EMBDS.NPY --model original -s RUNS -e 10 -r 1 -t 15 --test-split 0.25 -k 1 3 5

**Stand-ins** (written into a temporary folder put first on the paper's PYTHONPATH; their
source is in SHIMS below): `clip` always, since OpenAI's `clip.load` downloads the weights: its
`load(name)` returns open_clip's architecture of that name with random weights and its eval
transform, and `clip.model.build_model` is open_clip's port of OpenAI's. The real `clip.load` also
reads a checkpoint from disk (about 400 MB for RN50x4) that the stand-in does not, so the paper's
times are, if anything, a little low. `skimage` (its `io.imread`, Pillow decoding as scikit-image's
imageio plugin does for JPEG) and `facenet_pytorch` (imported by the paper's models.py for a model
not run here) only where the environment lacks them; the JSON says which were used. Everything else
is the paper's code doing its own work.

Usage (from the repository root, the venv active):

    python bench/paper_code.py --paper-code ../visual-similarity --runs 3
    python bench/paper_code.py --paper-code ../visual-similarity --what extract --pairs 4 --runs 1

Prints a table and writes bench/results/paper_code-TIMESTAMP.json (machine facts with the CPU
model, ISA flags and load average, every run, the commands and the sha256 of the paper's files).
Targets (issue 29, a quiet AVX2-only machine): the warm extraction at least 1.3x the paper's code,
training at least 2x.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Sequence

import benchlib  # bench/ is the script's folder, so it is on sys.path; the packages come from the install

import numpy as np

from featuresExtractor.pairs_file import to_paper_dict
from synthetic.drawn_images import make_pairs
from synthetic.planted import planted_pairs
from toolkit.cli import run_cli
from toolkit.utils import UserError

ROOT = benchlib.ROOT
MODEL = "clip_rn50x4"
PCA_DIM = 8
PAPER_FILES = ("extract.py", "train.py", "dataset.py", "utils.py", "adaptation.py",
               "featuresExtractor/__init__.py", "featuresExtractor/featureExtractor.py",
               "featuresExtractor/processor.py", "featuresExtractor/models.py", "featuresExtractor/utils.py",
               "featuresExtractor/transforms.py")
"""The paper's files these two commands import (its tree with the featuresExtractor/ package its README names)."""
TRAIN_PAIRS, TRAIN_DIM = 6016, 256
TRAIN_PLANTED = {"signal_dim": 64, "noise": 1.0, "nuisance": 2.0, "seed": 0}  # bench/train.py's defaults
WARM_UP = "import torch, torchvision, open_clip, sklearn, timm"

SHIMS = {
    "clip/__init__.py": '''"""Stand-in for OpenAI's `clip` package (bench/paper_code.py): random weights, no download.

`load(name)` returns what `clip.load(name)` returns: the whole CLIP model in fp32 and eval mode
on `device`, and its eval transform (resize, centre crop, to tensor, normalise). It is open_clip's
model of the same architecture with random weights (seed 0), since the real one downloads them.
"""
import open_clip
import torch

from . import model

_OPEN_CLIP_NAMES = {"RN50": "RN50", "RN101": "RN101", "RN50x4": "RN50x4", "ViT-B/32": "ViT-B-32"}


def load(name, device="cuda" if torch.cuda.is_available() else "cpu", jit=False, download_root=None):
    torch.manual_seed(0)
    clip_model, _, preprocess = open_clip.create_model_and_transforms(
        _OPEN_CLIP_NAMES[name], pretrained=None, force_quick_gelu=True)  # OpenAI's models use QuickGELU
    return clip_model.to(device).eval(), preprocess
''',
    "clip/model.py": '''"""Stand-in for `clip.model`: `build_model(state_dict)` is open_clip's port of OpenAI's."""
from open_clip.model import build_model_from_openai_state_dict


def build_model(state_dict):
    return build_model_from_openai_state_dict(state_dict)
''',
    "skimage/__init__.py": '''"""Stand-in for scikit-image (bench/paper_code.py), used only where it is not installed."""
''',
    "skimage/io.py": '''"""`imread` as scikit-image's default (imageio) plugin reads a JPEG: Pillow decodes it to an array."""
import numpy as np
from PIL import Image


def imread(fname, as_gray=False, plugin=None, **plugin_args):
    with Image.open(fname) as img:
        return np.array(img)
''',
    "facenet_pytorch/__init__.py": '''"""Stand-in for facenet_pytorch, which the paper's models.py imports for a model not run here."""


class InceptionResnetV1:
    def __init__(self, *args, **kwargs):
        raise RuntimeError("facenet_pytorch is not installed: bench/paper_code.py stands in for its import only")
''',
    "run_extract.py": '''"""Run the paper's extract.py on one model of its models_dict: run_extract.py PAPER_DIR MODEL ARGS...

The paper's extract.py extracts with every model its models_dict holds (37, most downloaded). This
keeps MODEL alone in that dict (the same dict object extract.py imports), then runs the paper's
extract.py unchanged as __main__ with ARGS.
"""
import runpy
import sys
from pathlib import Path

paper, model = Path(sys.argv[1]), sys.argv[2]
sys.path.insert(0, str(paper))
import featuresExtractor  # noqa: E402  the paper's package, not ours: its folder is first on the path

kept = featuresExtractor.models_dict[model]
featuresExtractor.models_dict.clear()
featuresExtractor.models_dict[model] = kept
sys.argv = [str(paper / "extract.py"), *sys.argv[3:]]
runpy.run_path(str(paper / "extract.py"), run_name="__main__")
''',
}
"""Files written into the folder first on the paper's PYTHONPATH. `skimage` and `facenet_pytorch` only
where they cannot be imported; `clip` always (the real one downloads its weights)."""
OPTIONAL_SHIMS = {"skimage": ("skimage/__init__.py", "skimage/io.py"),
                  "facenet_pytorch": ("facenet_pytorch/__init__.py",)}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/paper_code.py", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--paper-code", required=True, metavar="DIR",
                   help="a checkout of github.com/VieVie31/visual-similarity (used as it is, never edited)")
    p.add_argument("--what", choices=("extract", "train", "both"), default="both", help="which case to time")
    p.add_argument("--runs", type=int, default=3, help="paired runs (ours then the paper's) per case")
    p.add_argument("--pairs", type=int, default=40, help="extract: generated pairs (4 images each with flips)")
    p.add_argument("--epochs", type=int, default=10, help="train: epochs (-e)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds after which one process is killed")
    p.add_argument("--work-dir", default=None,
                   help="keep the data and logs in a new subfolder of this folder (default: a temporary folder, "
                        "removed unless a run fails)")
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> Path:
    """The paper's checkout as a resolved path; UserError for bad values."""
    if args.runs < 1 or args.epochs < 1:
        raise UserError(f"--runs and --epochs must be at least 1 (got {args.runs} and {args.epochs})")
    if args.pairs < 2:
        raise UserError(f"--pairs must be at least 2: adapt-pca {PCA_DIM} needs {PCA_DIM} vectors (got {args.pairs})")
    paper = Path(args.paper_code).expanduser().resolve()
    if not paper.is_dir():
        raise UserError(f"--paper-code {args.paper_code}: no such folder; give a checkout of "
                        "github.com/VieVie31/visual-similarity")
    missing = [f for f in PAPER_FILES if not (paper / f).is_file()]
    if missing:
        raise UserError(f"--paper-code {args.paper_code} lacks {', '.join(missing)}: is it a checkout of "
                        "github.com/VieVie31/visual-similarity with its featuresExtractor/ package?")
    return paper


def write_shims(folder: Path) -> list[str]:
    """Write the stand-ins into `folder`; return the names of the modules stood in for."""
    skipped = {path for name, paths in OPTIONAL_SHIMS.items() if importlib.util.find_spec(name) for path in paths}
    for rel, text in SHIMS.items():
        if rel not in skipped:
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            (folder / rel).write_text(text)
    return ["clip"] + [name for name, paths in OPTIONAL_SHIMS.items() if paths[0] not in skipped]


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)  # the child leads its own session: this ends it and its workers
    except ProcessLookupError:
        pass


def timed(cmd: Sequence[str], env: dict, cwd: Path, log: Path, timeout: float) -> dict:
    """Run `cmd` to its end; its wall seconds, CPU seconds and peak RSS (with its workers) and exit status."""
    stopped = threading.Event()

    def stop(pid: int) -> None:
        stopped.set()
        _kill_group(pid)

    with open(log, "wb") as out:
        start = time.perf_counter()
        proc = subprocess.Popen([str(c) for c in cmd], env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        timer = threading.Timer(timeout, stop, (proc.pid,))
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:  # Ctrl-C: end the child's group, reap it, and pass the interrupt on
            _kill_group(proc.pid)
            os.waitpid(proc.pid, 0)
            proc.returncode = -signal.SIGKILL
            raise
        finally:
            timer.cancel()
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss_mib": usage.ru_maxrss / 1024,
            "rc": proc.returncode, "timed_out": stopped.is_set()}


def _last_line(log: Path) -> str:
    lines = [ln.strip() for ln in log.read_text(errors="replace").replace("\r", "\n").splitlines() if ln.strip()]
    return lines[-1] if lines else "(no output)"


def run_one(label: str, cmd: Sequence[str], env: dict, work: Path, log: Path, output: Path,
            timeout: float) -> dict:
    """One timed process that must exit 0 and leave `output`; UserError (naming its log) otherwise."""
    result = timed(cmd, env, work, log, timeout)
    if result["timed_out"]:
        raise UserError(f"{label} ran past --timeout {timeout:.0f} s and was stopped; its log: {log}")
    if result["rc"] != 0:
        raise UserError(f"{label} failed (exit {result['rc']}): {_last_line(log)}; its log: {log}")
    if not output.is_file():
        raise UserError(f"{label} exited 0 but wrote no {output.relative_to(work)}: {_last_line(log)}; its log: {log}")
    return result


def environments(work: Path, shim: Path) -> tuple[dict, dict]:
    """(ours, paper's) process environments: each its own fresh cache folder (XDG_CACHE_HOME) under
    `work`; the paper's path starts with the stand-ins, ours with this repository."""
    base = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    caches = [Path(tempfile.mkdtemp(prefix=f"cache-{side}-", dir=work)) for side in ("ours", "paper")]
    ours = {**base, "PYTHONPATH": str(ROOT), "XDG_CACHE_HOME": str(caches[0])}
    paper = {**base, "PYTHONPATH": str(shim), "XDG_CACHE_HOME": str(caches[1])}
    return ours, paper


def paired_runs(case: str, runs: int, make_ours: Callable[[Path], tuple[list, Path]],
                make_paper: Callable[[Path], tuple[list, Path]], envs: tuple[dict, dict], work: Path,
                timeout: float) -> list[dict]:
    """`runs` pairs, ours then the paper's; each maker takes a fresh output folder and gives (argv, file)."""
    rows = []
    for r in range(1, runs + 1):
        row = {"case": case, "run": r}
        for side, make, env in (("ours", make_ours, envs[0]), ("paper", make_paper, envs[1])):
            out = work / f"{case}-{side}-{r}"
            cmd, output = make(out)
            print(f"... {case} run {r}/{runs}: {side}", file=sys.stderr, flush=True)
            result = run_one(f"{side} {case} run {r}", cmd, env, work, work / f"{case}-{side}-{r}.log", output, timeout)
            row.update({f"{side}_{k}": v for k, v in result.items()})
            row["cmd_" + side] = [str(c) for c in cmd]
            shutil.rmtree(out, ignore_errors=True)
        row["ratio"] = row["paper_wall_s"] / row["ours_wall_s"]
        row["load1"] = os.getloadavg()[0]
        rows.append(row)
    return rows


def extract_case(args: argparse.Namespace, paper: Path, shim: Path, work: Path, envs: tuple[dict, dict]) -> list[dict]:
    """The extraction case: generated pairs, both extractors, paired runs."""
    data = work / "pairs"
    make_pairs(data, n_pairs=args.pairs, seed=0, size=(200, 250), fmt="jpg")

    def recipe(out: Path) -> list:
        # The README's order: the paper's --processor action reads -s when it is parsed, so -s comes first.
        return ["-d", data, "-s", out, "-b", "16", "--data-aug", "--processor", "adapt-pca", str(PCA_DIM)]

    def ours(out: Path) -> tuple[list, Path]:
        return ([sys.executable, ROOT / "extract.py", *recipe(out), "--pretrained", "none", "--precision", "fp32"],
                out / MODEL / f"features_pca{PCA_DIM}.npy")

    def theirs(out: Path) -> tuple[list, Path]:
        return ([sys.executable, shim / "run_extract.py", paper, MODEL, *recipe(out)],
                out / "AdaptationProcessorPCA" / MODEL / f"{MODEL}.npy")

    rows = paired_runs("extract", args.runs, ours, theirs, envs, work, args.timeout)
    cache = [f for f in Path(envs[0]["XDG_CACHE_HOME"]).rglob("*") if f.is_file()]
    for row in rows:
        row["images"] = 4 * args.pairs
        row["ours_cache"] = "cold" if row["run"] == 1 else "warm"  # XDG_CACHE_HOME was empty before run 1
    rows[0]["ours_cache_after"] = {"files": len(cache), "mib": sum(f.stat().st_size for f in cache) / 2**20}
    return rows


def train_case(args: argparse.Namespace, paper: Path, work: Path, envs: tuple[dict, dict]) -> list[dict]:
    """The training case: one planted features file in the paper's layout, both train.py, paired runs."""
    features = work / "embds.npy"
    np.save(features, to_paper_dict(planted_pairs(TRAIN_PAIRS, TRAIN_DIM, **TRAIN_PLANTED)), allow_pickle=True)

    def recipe(out: Path) -> list:  # the README's command, without --gpu
        return ["-d", features, "--model", "original", "-s", out, "-e", str(args.epochs), "-r", "1", "-t", "15",
                "--test-split", "0.25", "-k", "1", "3", "5"]

    def ours(out: Path) -> tuple[list, Path]:
        return ([sys.executable, ROOT / "train.py", *recipe(out), "--precision", "fp32", "--allow-pickle"],
                out / "run1" / "model_and_optimizer.pt")

    def theirs(out: Path) -> tuple[list, Path]:
        return [sys.executable, paper / "train.py", *recipe(out)], out / "run1" / "model_and_optimizer.pt"

    return paired_runs("train", args.runs, ours, theirs, envs, work, args.timeout)


def summarise(case: str, rows: list[dict]) -> dict:
    """Medians and ratios of one case; for extract, ours' first (cold cache) run apart from the later ones."""
    ratios = [r["ratio"] for r in rows]
    out = {"case": case, "runs": len(rows), "paper_median_s": benchlib.median(r["paper_wall_s"] for r in rows),
           "ratios": ratios}
    if case == "extract":
        later = rows[1:]
        out.update(ours_first_s=rows[0]["ours_wall_s"], ratio_first=rows[0]["ratio"],
                   ours_cache_after=rows[0]["ours_cache_after"],
                   ours_later_median_s=benchlib.median(r["ours_wall_s"] for r in later) if later else None,
                   ratio_later_median=benchlib.median(r["ratio"] for r in later) if later else None)
    else:
        out.update(ours_median_s=benchlib.median(r["ours_wall_s"] for r in rows), ratio_median=benchlib.median(ratios))
    return out


def provenance(paper: Path, shims: list[str]) -> dict:
    """What was timed: the paper's files (sha256) and git commit, ours, and the stand-ins used."""
    def git(folder: Path) -> str | None:
        if not (folder / ".git").exists():  # not a checkout of its own (a folder inside another repository)
            return None
        done = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else None

    return {"paper_code": str(paper), "paper_commit": git(paper), "ours_commit": git(ROOT), "stand_ins": shims,
            "paper_sha256": {f: hashlib.sha256((paper / f).read_bytes()).hexdigest() for f in PAPER_FILES}}


def report(rows: list[dict], summaries: list[dict], info: dict, args: argparse.Namespace) -> None:
    """Print each run's row, then the medians and ratios of each case."""
    print()
    print(benchlib.table(rows, [
        ("case", "case", "s"), ("run", "run", "d"), ("ours_cache", "our cache", "s"), ("ours_wall_s", "ours s", ".1f"),
        ("paper_wall_s", "paper s", ".1f"), ("ratio", "paper/ours", ".2f"), ("ours_cpu_s", "ours CPU s", ".1f"),
        ("paper_cpu_s", "paper CPU s", ".1f"), ("ours_peak_rss_mib", "ours RSS MiB", ".0f"),
        ("paper_peak_rss_mib", "paper RSS MiB", ".0f"), ("load1", "load", ".2f")]))
    print()
    for s in summaries:
        ratios = ", ".join(f"{r:.2f}" for r in s["ratios"])
        if s["case"] == "extract":
            later = ("no later run (--runs 1)" if s["ours_later_median_s"] is None else
                     f"later runs median {s['ours_later_median_s']:.1f} s, paper/ours median {s['ratio_later_median']:.2f}"
                     " (target >= 1.3 on a quiet AVX2-only CPU)")
            print(f"extract ({4 * args.pairs} images, RN50x4 random, fp32, batch 16, adapt-pca {PCA_DIM}): paper median "
                  f"{s['paper_median_s']:.1f} s; ours first run (cold cache) {s['ours_first_s']:.1f} s, paper/ours "
                  f"{s['ratio_first']:.2f}; {later}; per pair: {ratios}; our cache folder after the runs: "
                  f"{s['ours_cache_after']['files']} files, {s['ours_cache_after']['mib']:.1f} MiB")
        else:
            print(f"train ({TRAIN_PAIRS} pairs x {TRAIN_DIM}-d + flips, -e {args.epochs}, fp32): paper median "
                  f"{s['paper_median_s']:.1f} s, ours median {s['ours_median_s']:.1f} s, paper/ours median "
                  f"{s['ratio_median']:.2f} (target >= 2 on a quiet AVX2-only CPU); per pair: {ratios}")
    print(f"{info['cpu']}, {info['cores']} cores; load avg {os.getloadavg()[0]:.2f} "
          f"(start {info['load_avg_start'][0]:.2f}); whole processes, medians of {args.runs} paired run(s)")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    paper = check_args(args)
    info = benchlib.machine()  # now, so that its load average is the one before the runs
    if args.work_dir:
        Path(args.work_dir).mkdir(parents=True, exist_ok=True)
    # A fresh folder every time, also under --work-dir: the paper's scripts skip work whose output exists.
    work = Path(tempfile.mkdtemp(prefix="bench-paper-code-", dir=args.work_dir)).resolve()
    shim = work / "shim"
    shims = write_shims(shim)
    envs = environments(work, shim)
    ok = False
    try:
        subprocess.run([sys.executable, "-c", WARM_UP], check=True, env=envs[1])  # page cache, for both alike
        rows = []
        if args.what in ("extract", "both"):
            rows += extract_case(args, paper, shim, work, envs)
        if args.what in ("train", "both"):
            rows += train_case(args, paper, work, envs)
        ok = True
    finally:
        if ok and not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
        elif not ok:
            print(f"bench/paper_code.py: kept {work} (logs of the runs)", file=sys.stderr)
    summaries = [summarise(case, [r for r in rows if r["case"] == case])
                 for case in ("extract", "train") if any(r["case"] == case for r in rows)]
    report(rows, summaries, info, args)
    return benchlib.finish("paper_code", args, info, rows=rows, summaries=summaries, **provenance(paper, shims))


if __name__ == "__main__":
    sys.exit(run_cli(main))
