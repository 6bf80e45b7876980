"""Data-parallel training on 2 gloo ranks (CPU) gives one process's weights; rank 0 alone writes; failures stop all."""

import contextlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import free_port, planted_features, run_bounded, spawn_ranks
from adaptation.models import build_model
from synthetic.planted import planted_pairs
from adaptation.split import split_data, split_indices
from adaptation.training import TrainConfig, epoch_batches, make_optimizer, train
from toolkit.cli import run_cli
from toolkit.distributed import Ranks, shard_bounds

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2


EXACT, BF16_TOL = (1e-5, 1e-5), (1e-2, 5e-3)
"""Tolerances (weights, figures) of 2 ranks against 1 process. In bf16, the ranks' cosines are blocks of the one
process's product, whose bf16 rounding can differ (measured: 5.4e-4 on a loss of 2.34 and 5.9e-3 on a weight, after
3 Adam steps of lr 1e-2 that moved the weights by more than 1e-3 each)."""


def _data():
    # 41 pairs: 31 train (an odd count, so the full batch splits 16/15) and 10 test.
    pairs = planted_pairs(41, 8, signal_dim=4, nuisance=2.0, seed=0)
    return split_data(pairs, *split_indices(len(pairs), 0.25, seed=0))


def _fit(cfg, dist=Ranks()):
    torch.manual_seed(0)
    model = build_model("original", 8, out_dim=64)
    history = train(model, _data(), cfg, make_optimizer(model, cfg), dist=dist)
    return model, history


def _rank_worker(rank, port, cfg, out_dir):
    import torch.distributed as tdist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    tdist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        model, history = _fit(cfg, Ranks(rank, WORLD, rank, WORLD))
        torch.save({"state": model.state_dict(), "history": history}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        Ranks.leave()


def _spawn(fn, args, timeout=120):
    return spawn_ranks(fn, args, WORLD, timeout)


@pytest.mark.parametrize("batch_size,epochs,temperature,precision,tol",
                         [(None, 3, 15.0, "fp32", EXACT), (12, 1, 15.0, "fp32", EXACT), (30, 2, 15.0, "fp32", EXACT),
                          (12, 1, 45.0, "fp32", EXACT), (12, 1, 15.0, "bf16", BF16_TOL)],
                         ids=["full-batch", "B12", "B30", "B12-plain-loss", "B12-bf16"])
def test_two_ranks_give_one_process_weights(tmp_path, batch_size, epochs, temperature, precision, tol):
    # B = 12 of 31 pairs: batches of 12, 12 and 7 (shares 4/3), so 1 epoch is 3 steps, as 3 full-batch epochs are.
    # B = 30: a last batch of 1 pair, of which rank 1 holds nothing (4 steps).
    # -t 45 is above the fused row-block loss's range: the ranks take the plain definition there.
    # bf16: the ranks' products are blocks of the one process's, whose bf16 rounding may differ in the last bit.
    cfg = TrainConfig(epochs=epochs, temperature=temperature, lr=1e-2, topk=(1, 3), batch_size=batch_size, seed=5,
                      precision=precision)
    assert len(epoch_batches([31, 31], batch_size, 5, 1)) * epochs >= 3
    torch.set_num_threads(1)
    single, single_history = _fit(cfg)
    _spawn(_rank_worker, (free_port(), cfg, str(tmp_path)))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    torch.manual_seed(0)
    start = build_model("original", 8, out_dim=64).state_dict()
    for name, value in single.state_dict().items():
        assert (value - start[name]).abs().max().item() > 1e-3  # the steps did move the weights
    for r in ranks:
        for name, value in single.state_dict().items():
            assert (r["state"][name] - value).abs().max().item() <= tol[0], name
        for mine, theirs in zip(single_history, r["history"]):
            assert mine.keys() == theirs.keys()
            for k in mine:
                assert theirs[k] == pytest.approx(mine[k], abs=tol[1]), k


def test_shares_cover_the_batch_in_order():
    for n in (1, 2, 7, 12, 31):
        bounds = [shard_bounds(n, r, 3) for r in range(3)]
        assert bounds[0][0] == 0 and bounds[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
        assert max(b - a for a, b in bounds) - min(b - a for a, b in bounds) <= 1


def _fit_positive(name, cfg, dist=Ranks()):
    from adaptation.objectives import build_objective
    from adaptation.positive_training import train_positive

    torch.manual_seed(0)
    objective = build_objective(name, build_model("original", 8, out_dim=64), ema=0.9)
    history = train_positive(objective, _data(), cfg, make_optimizer(objective, cfg), dist=dist)
    return objective, history


def _positive_worker(rank, port, name, cfg, out_dir):
    import torch.distributed as tdist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    tdist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        objective, history = _fit_positive(name, cfg, Ranks(rank, WORLD, rank, WORLD))
        torch.save({"state": objective.state_dict(), "history": history}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        Ranks.leave()


@pytest.mark.parametrize("name", ["simsiam", "byol"])
def test_positive_objectives_on_two_ranks_give_one_process_weights(tmp_path, name):
    # B = 12 of 31 training pairs: batches of 12, 12 and 7 (shares 6/6 and 4/3), 3 steps; the flipped copies' set
    # is absent here, so each step is one batch. The predictor's BatchNorm sees the global batch on every rank.
    cfg = TrainConfig(epochs=1, temperature=15.0, lr=1e-2, topk=(1, 3), batch_size=12, seed=5)
    assert len(epoch_batches([31], 12, 5, 1)) == 3
    torch.set_num_threads(1)
    single, single_history = _fit_positive(name, cfg)
    _spawn(_positive_worker, (free_port(), name, cfg, str(tmp_path)))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    torch.manual_seed(0)
    from adaptation.objectives import build_objective

    start = build_objective(name, build_model("original", 8, out_dim=64), ema=0.9).state_dict()
    for key, value in single.state_dict().items():
        if value.is_floating_point() and "running_var" not in key and "target" not in key:
            assert (value - start[key]).abs().max().item() > 1e-4, key  # the steps did move the weights
    for r in ranks:
        assert r["state"].keys() == single.state_dict().keys()
        for key, value in single.state_dict().items():
            assert (r["state"][key].double() - value.double()).abs().max().item() <= 1e-5, key
        for mine, theirs in zip(single_history, r["history"], strict=True):
            assert mine.keys() == theirs.keys()
            for k in mine:
                assert theirs[k] == pytest.approx(mine[k], abs=1e-5), k
    # Every rank holds the same bytes: the online weights, the predictor and (byol) the EMA target.
    for key in single.state_dict():
        assert torch.equal(ranks[0]["state"][key], ranks[1]["state"][key]), key
    if name == "byol":
        assert any(k.startswith("target.") for k in single.state_dict())


# --- train.py under torchrun -------------------------------------------------------------------------

def _torchrun(args, nproc=WORLD, timeout=180):
    # --cpu: these are gloo tests; where CUDA is available train.py would take it (one GPU per rank).
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(free_port()), "train.py", "--cpu", *map(str, args)]
    return run_bounded(cmd, timeout, cwd=ROOT, env=env)


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    return planted_features(tmp_path_factory.mktemp("dist") / "features.npy", 60)


def test_torchrun_rank0_writes_and_matches_one_process(features, tmp_path):
    common = ["-d", features, "-e", "2", "-t", "15", "--seed", "3", "--batch-size", "16", "--no-images", "-k", "1", "3"]
    proc = _torchrun(["-s", tmp_path / "two", *common])
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "train.py", "--cpu", "-s", tmp_path / "one", *map(str, common)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120, env=env)
    assert one.returncode == 0, one.stderr
    assert {p.name for p in (tmp_path / "two").iterdir()} == {"run1", "summary.json"}
    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    single = json.loads((tmp_path / "one" / "summary.json").read_text())
    assert two["config"]["world_size"] == 2 and single["config"]["world_size"] == 1
    assert two["config"]["batch_size"] == 16
    config = json.loads((tmp_path / "two" / "run1" / "config.json").read_text())
    assert config["batch_size"] == 16 and config["world_size"] == 2
    for name, fig in single["final"].items():
        assert two["final"][name]["mean"] == pytest.approx(fig["mean"], abs=1e-4), name


@pytest.mark.parametrize("args,nproc,expected", [
    (["--batch-size", "15"], 2, "use --batch-size 16"),
    (["--batch-size", "1.5"], 2, "must be a whole number"),
    (["--test-split", "0.97"], 3, "3 ranks but only 2 training pairs"),
    # Found during training: every rank gets the same figures, so every rank stops at the same epoch.
    (["-t", "1e39", "--seed", "0"], 2, "the training loss is"),
])
def test_bad_input_under_torchrun_one_line_exit_2(features, tmp_path, args, nproc, expected):
    proc = _torchrun(["-d", features, "-s", tmp_path / "r", "-e", "1", "--no-images", *args], nproc=nproc)
    # The ranks print no traceback; torchrun itself reports failed workers with one of its own (ChildFailedError).
    assert proc.stderr.count("Traceback") <= 1
    if "Traceback" in proc.stderr:
        assert "ChildFailedError" in proc.stderr.split("Traceback", 1)[1]
    ours = [line for line in proc.stderr.splitlines() if line.startswith("train.py: error")]
    assert len(ours) == 1 and expected in ours[0], proc.stderr
    # Ranks exited 2 (or were stopped by torchrun once one had), none 1 (which would be a crash).
    codes = re.findall(r"exitcode\s*:\s*(-?\d+)", proc.stderr)
    assert codes and set(codes) <= {"2", "-15"} and "2" in codes, proc.stderr
    assert proc.returncode != 0
    assert not (tmp_path / "r").exists()


def _as_torchrun_rank(rank: int, port: int, log_dir) -> None:
    """This spawned process as torchrun's rank `rank` of WORLD (toolkit.distributed refuses others), one thread,
    its stderr in LOG_DIR/rank{rank}.log."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), OMP_NUM_THREADS="1",
                      TORCHELASTIC_RUN_ID="spawned")
    torch.set_num_threads(1)
    sys.stderr = open(Path(log_dir) / f"rank{rank}.log", "w", buffering=1)


def _failing_worker(rank, port, features, save_to, log_dir):
    import train as train_script
    import adaptation.training as training

    _as_torchrun_rank(rank, port, log_dir)
    if rank == 1:
        real = training.evaluate
        calls = []

        def broken(*a, **k):
            calls.append(1)
            if len(calls) == 2:
                raise RuntimeError("injected failure")
            return real(*a, **k)

        training.evaluate = broken
    argv = ["-d", features, "-s", save_to, "-e", "5", "--no-images", "-k", "1", "--batch-size", "16", "--cpu"]
    rc = run_cli(train_script.main, argv, "train.py")
    (Path(log_dir) / f"rank{rank}.rc").write_text(str(rc))


def test_a_failing_rank_stops_all_and_leaves_no_run(features, tmp_path):
    save_to = tmp_path / "runs"
    _spawn(_failing_worker, (free_port(), str(features), str(save_to), str(tmp_path)), timeout=120)
    rcs = [int((tmp_path / f"rank{r}.rc").read_text()) for r in range(WORLD)]
    logs = [(tmp_path / f"rank{r}.log").read_text() for r in range(WORLD)]
    assert rcs[1] == 1 and rcs[0] != 0
    failed = [line for log in logs for line in log.splitlines() if "failed" in line]
    assert failed == ["train.py: rank 1 of 2 failed: RuntimeError: injected failure"]
    assert not any("Traceback" in log for log in logs)
    assert not save_to.exists() or not any(save_to.iterdir())


def _refused_worker(rank, port, features, save_to, log_dir):
    import train as train_script

    _as_torchrun_rank(rank, port, log_dir)
    argv = ["-d", features, "-s", save_to, "-e", "1", "--no-images", "--cpu"]
    rc = run_cli(train_script.main, argv, "train.py")
    (Path(log_dir) / f"rank{rank}.rc").write_text(str(rc))


@pytest.mark.parametrize("case", ["locked", "not writable"])
def test_rank0_alone_checks_and_locks_the_output_folder(features, tmp_path, case):
    # Rank 0 alone checks -s and takes its lock (were rank 1 to lock it too, the 2-rank run above would
    # refuse itself); when rank 0 refuses, every rank exits 2 and one line says why.
    from toolkit.lock import folder_lock

    logs_dir = tmp_path / "logs"
    logs_dir.mkdir()
    if case == "locked":
        save_to, expected = tmp_path / "runs", f"is being written by process {os.getpid()}"
        held = folder_lock(save_to, "-s")
    else:
        (tmp_path / "afile").write_text("x")
        save_to, expected = tmp_path / "afile" / "runs", "is a file, not a folder"
        held = contextlib.nullcontext()
    with held:
        _spawn(_refused_worker, (free_port(), str(features), str(save_to), str(logs_dir)), timeout=120)
        if case == "locked":
            assert not any(save_to.iterdir())  # nothing written into the folder another run holds
    rcs = [int((logs_dir / f"rank{r}.rc").read_text()) for r in range(WORLD)]
    logs = [(logs_dir / f"rank{r}.log").read_text() for r in range(WORLD)]
    assert rcs == [2, 2], logs
    lines = [line for log in logs for line in log.splitlines()]
    assert len(lines) == 1 and lines[0].startswith("train.py: error: -s ") and expected in lines[0], logs
    assert not any("Traceback" in log for log in logs)
