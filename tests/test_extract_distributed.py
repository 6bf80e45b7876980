"""extract.py under torchrun: 2 gloo ranks on the CPU give the one-process bytes, resume after a rank dies.

Each torchrun run starts two Python processes that import torch and build the tiny model: about
half a minute on 2 shared cores, so these tests keep to 7 pairs and bound every run to 300 s.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import extract
from conftest import ROOT, make_pairs, run_bounded, spawn_ranks
from featuresExtractor.pipeline import ExtractConfig, extract as run_extract, run_shard, start_store
from featuresExtractor.store import ChunkStore
from toolkit.distributed import Ranks
from toolkit.utils import UserError
from toolkit.cli import run_cli

# --engine torch: the bytes are compared with runs of the package's ExtractConfig, whose engine is torch (auto
# would take folded on AVX2 kernels, equal only within rounding).
FLAGS = ["-b", "4", "--data-aug", "-p", "adapt-pca", "4", "--model", "tiny_rn", "--pretrained", "none",
         "--workers", "0", "--no-progress", "--engine", "torch"]
FILES = ["features.npy", "features_pca4.npy"]


def torchrun(script: str, n: int, argv: list[str], **env) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n), script, *argv]
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    return run_bounded(cmd, 300, cwd=ROOT, env=full_env)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """7 pairs and their one-process extraction (in this process)."""
    root = tmp_path_factory.mktemp("dist")
    make_pairs(root / "tll", 7, seed=3)
    assert run_cli(extract.main, ["-d", str(root / "tll"), "-s", str(root / "ref"), *FLAGS]) == 0
    return root


def _same_as_reference(root: Path, out: Path) -> None:
    for name in FILES:
        assert (out / "tiny_rn" / name).read_bytes() == (root / "ref" / "tiny_rn" / name).read_bytes(), name
    with np.load(out / "tiny_rn" / "pca4.npz") as a, np.load(root / "ref" / "tiny_rn" / "pca4.npz") as b:
        for key in b.files:
            assert a[key].tobytes() == b[key].tobytes(), key


def test_two_gloo_ranks_write_the_one_process_bytes(reference):
    out = reference / "two"
    proc = torchrun("extract.py", 2, ["-d", str(reference / "tll"), "-s", str(out), *FLAGS])
    assert proc.returncode == 0, proc.stderr[-3000:]
    _same_as_reference(reference, out)
    manifest = json.loads((out / "tiny_rn" / "manifest.json").read_text())
    assert manifest["distributed"]["world_size"] == 2 and manifest["distributed"]["backend"] == "gloo"
    assert manifest["distributed"]["shards"] == [[0, 4], [4, 7]]  # the one rule: the first ranks take one more
    # Only rank 0 prints the summary.
    assert proc.stdout.count("kept 7/7 items on 2 ranks") == 1
    assert proc.stderr.count("RANDOMLY INITIALISED") == 1
    assert not (out / "tiny_rn" / ".partial").exists()


def test_a_killed_rank_resumes_with_the_same_command(reference):
    out = reference / "killed"
    argv = ["-d", str(reference / "tll"), "-s", str(out), *FLAGS]
    died = torchrun(str(ROOT / "tests" / "helpers" / "extract_rank_dies.py"), 2, argv, DIE_RANK="1")
    assert died.returncode != 0
    model = out / "tiny_rn"
    assert not (model / "manifest.json").exists()  # nothing looks complete
    done = ChunkStore(model / ".partial").done()
    # Rank 1's shard is items 4..6 (the first 7 % 2 ranks take one more): it wrote one chunk (item 4) and
    # died; how far rank 0 got in items 0..3 before torchrun stopped it depends on timing.
    assert 4 in done and not {5, 6} <= done
    # A damaged chunk is discarded by rank 0 before the other rank reads the store, and re-extracted.
    first = ChunkStore(model / ".partial").chunks()[0]
    first.write_bytes(first.read_bytes()[:50])
    done = ChunkStore(model / ".partial").done(discard=False)
    again = torchrun("extract.py", 2, argv)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("was damaged") == 1 and first.name in again.stderr
    assert f"(resumed after {len(done)}) on 2 ranks" in again.stdout
    _same_as_reference(reference, out)
    manifest = json.loads((model / "manifest.json").read_text())
    for name in FILES:  # the merge records what it wrote: "already done" checks it
        entry = manifest["outputs"][name]
        assert entry["bytes"] == (model / name).stat().st_size and len(entry["sha256"]) == 64


def test_resume_with_another_world_size(reference, tiny_backbone):
    """Chunks of rank 1 of 2 (the other shard never ran) are finished by a one-process run."""
    out = reference / "regrouped"
    cfg = ExtractConfig(dataset=str(reference / "tll"), save_to=str(out), processor=("adapt-pca", "4"),
                        data_aug=True, batch_size=4, workers=0, progress=False)
    from featuresExtractor.dataset import discover
    from featuresExtractor.extractor import FeatureExtractor
    from featuresExtractor.manifest import fingerprint
    from featuresExtractor.processor import parse_processor

    layout = discover(cfg.dataset)
    fx = FeatureExtractor(tiny_backbone, "fp32", True)
    proc = parse_processor(cfg.processor)
    model = out / "tiny_rn"
    start_store(model, fingerprint(tiny_backbone, proc, layout, cfg.data_aug, cfg.precision))
    assert run_shard(cfg, fx, proc, layout, model, Ranks(rank=1, world_size=2)) == 0
    assert ChunkStore(model / ".partial").done() == {4, 5, 6}
    report = run_extract(cfg, tiny_backbone)
    assert report.resumed_items == 3 and report.n_kept == 7
    _same_as_reference(reference, out)


def test_more_ranks_than_items_one_line_on_rank_0(tmp_path):
    make_pairs(tmp_path / "one", 1)
    proc = torchrun("extract.py", 2, ["-d", str(tmp_path / "one"), "-s", str(tmp_path / "out"), *FLAGS])
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("extract.py: error:")]
    assert lines == ["extract.py: error: 2 ranks for 1 item(s): every rank needs at least one; "
                     "use --nproc_per_node 1 or fewer"]
    # The workers exit 2 without a traceback (torchrun's launcher then reports the failed workers itself).
    assert "exitcode  : 2" in proc.stderr and "featuresExtractor/" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_a_locked_output_folder_stops_every_rank_with_one_line(reference, tmp_path):
    # Rank 0 takes the folder lock in its prepare step; its refusal reaches rank 1, which exits quietly.
    from toolkit.lock import folder_lock

    out = tmp_path / "out"
    with folder_lock(out / "tiny_rn", "-s"):
        proc = torchrun("extract.py", 2, ["-d", str(reference / "tll"), "-s", str(out), *FLAGS])
        assert not any((out / "tiny_rn").iterdir())  # nothing written into the folder another run holds
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("extract.py: error:")]
    assert len(lines) == 1 and f"is being written by process {os.getpid()}" in lines[0], proc.stderr[-3000:]
    # The workers exit 2 without a traceback (torchrun's launcher then reports the failed workers itself;
    # under load it may stop rank 1 before rank 1's own exit 2, so only rank 0's exit code is certain).
    assert "exitcode  : 2" in proc.stderr and "featuresExtractor/" not in proc.stderr


def test_shards_cover_the_items_once_and_refuse_empty_ones():
    for n in (2, 7, 10):
        for k in (1, 2, 3):
            if n < k:
                continue
            shards = [list(Ranks(rank=r, world_size=k).shard(n)) for r in range(k)]
            assert sum(shards, []) == list(range(n)) and all(shards)
            assert Ranks(world_size=k).layout(n) == [[s[0], s[-1] + 1] for s in shards]
    with pytest.raises(UserError, match="3 ranks for 2 item"):
        Ranks(world_size=3).check_items(2)


def _collectives(rank: int, store: str, results: str) -> None:
    """Rank body for the spawn test: what agree/all_succeed raise where."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    ranks = Ranks(rank=rank, world_size=2, backend="gloo")
    seen = {}

    def failing_on(bad_rank, message):
        def fn():
            if rank == bad_rank:
                raise UserError(message)
            return rank * 10
        return fn

    for label, call in [("agree_ok", lambda: ranks.agree(lambda: ("verdict", rank))),
                        ("agree_error", lambda: ranks.agree(failing_on(0, "folder is busy"))),
                        ("all_ok", lambda: ranks.all_succeed(failing_on(-1, ""))),
                        ("all_error", lambda: ranks.all_succeed(failing_on(1, "unreadable image")))]:
        try:
            seen[label] = ["ok", call()]
        except UserError as err:
            seen[label] = ["error", str(err), getattr(err, "quiet", False)]
    Ranks.leave()
    Path(results, f"{rank}.json").write_text(json.dumps(seen))


def test_errors_reach_every_rank_and_rank_0_alone_prints(tmp_path):
    spawn_ranks(_collectives, (str(tmp_path / "store"), str(tmp_path)), 2)
    r0, r1 = (json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1))
    assert r0["agree_ok"] == r1["agree_ok"] == ["ok", ["verdict", 0]]  # rank 0's answer, everywhere
    assert r0["agree_error"] == ["error", "folder is busy", False]
    assert r1["agree_error"] == ["error", "folder is busy", True]
    assert r0["all_ok"] == r1["all_ok"] == ["ok", [0, 10]]
    assert r0["all_error"] == ["error", "rank 1: unreadable image", False]  # rank 0 prints rank 1's error
    assert r1["all_error"] == ["error", "rank 1: unreadable image", True]
