"""Minibatches, the streamed evaluation against the full-matrix one (ties included), and the memory check."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import train
from adaptation.fused import symmetric_cross_entropy
from adaptation.evaluation import block_rows_for, evaluate_vectors
from adaptation.losses import similarity_matrix
from adaptation.metrics import retrieval_metrics
from adaptation.models import build_model
from synthetic.planted import planted_pairs
from adaptation.split import split_data, split_indices
from adaptation.training import (BatchOutput, TrainConfig, epoch_batches, largest_fitting_batch, make_optimizer,
                                 step_bytes, train as train_loop)
from conftest import planted_features, script_cli
from test_adaptation_training import one_thread  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]


def full_matrix_figures(a, b, t, topk):
    """The evaluation as it was before blocks: one N x N matrix."""
    sim = similarity_matrix(a, b)
    return {"Loss": symmetric_cross_entropy(sim, t), **retrieval_metrics(sim, topk)}


def tied_vectors(n, dim=16, seed=0):
    """Vectors whose cosines are exact in fp32 in any summation order (entries in {0, +-1}, 4 non-zeros: norm 2),
    with duplicated rows, so many similarities tie exactly."""
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, dim)
    for i in range(n):
        idx = torch.randperm(dim, generator=g)[:4]
        x[i, idx] = torch.randint(0, 2, (4,), generator=g).float() * 2 - 1
    x[n // 2:] = x[: n - n // 2]  # duplicates: rows that tie everywhere
    return x


@pytest.mark.parametrize("kind", ["random", "ties", "nan"])
@pytest.mark.parametrize("rows", [1, 7, 64, 1000])
def test_streamed_evaluation_equals_full_matrix(kind, rows):
    g = torch.Generator().manual_seed(1)
    if kind == "ties":
        a, b = tied_vectors(90), tied_vectors(90, seed=1)
    else:
        a, b = torch.randn(90, 12, generator=g), torch.randn(90, 12, generator=g)
    if kind == "nan":
        a[3] = float("nan")
    want = full_matrix_figures(a, b, 15.0, (1, 3, 10))
    got = evaluate_vectors(a, b, 15.0, (1, 3, 10), block_rows=rows)
    assert got.keys() == want.keys()
    for k in want:
        if k == "Loss":
            torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-5, equal_nan=True)
        else:
            assert got[k].item() == want[k].item(), k  # ranks are exact counts: the same fractions


def test_ties_count_against_the_query_in_blocks():
    # Every vector the same: every pair ties with all N, rank N both ways.
    a = b = torch.ones(10, 4)
    got = evaluate_vectors(a, b, 1.0, (1, 10), block_rows=3)
    assert got["top 1"].item() == 0.0 and got["top 10"].item() == 1.0
    assert got["MRR"].item() == pytest.approx(0.1)


def test_block_rows_bound_the_memory():
    assert block_rows_for(200_000) * 200_000 * 4 * 3 <= 256 * 2**20
    assert block_rows_for(100) == 100  # a small test set is one block: the full-matrix path


@pytest.fixture(scope="module")
def data():
    pairs = planted_pairs(200, 32, signal_dim=8, nuisance=2.0, seed=0)
    return split_data(pairs, *split_indices(len(pairs), 0.25, seed=0))


def fit(data, **kw):
    torch.manual_seed(0)
    model = build_model("original", 32)
    cfg = TrainConfig(epochs=kw.pop("epochs", 15), temperature=15.0, lr=1e-2, topk=(1, 5), **kw)
    return model, train_loop(model, data, cfg, make_optimizer(model, cfg))


def test_batch_at_least_the_set_is_the_full_batch(data):
    _, full = fit(data)
    _, same = fit(data, batch_size=len(data.train[0]))
    _, larger = fit(data, batch_size=10_000)
    assert full == same == larger


def test_minibatches_learn_and_are_seeded(data):
    _, full = fit(data)
    _, mb = fit(data, batch_size=32, seed=1)
    _, again = fit(data, batch_size=32, seed=1)
    _, other = fit(data, batch_size=32, seed=2)
    assert mb == again and mb != other
    assert mb[-1]["Test/top 1"] > 0.2 and mb[-1]["Train/Loss"] < mb[0]["Train/Loss"]
    assert mb[0].keys() == full[0].keys()


def test_epoch_batches_cover_each_set_once():
    steps = epoch_batches([10, 7], 4, seed=0, epoch=1)
    assert len(steps) == 3
    originals = np.concatenate([s[0] for s in steps])
    assert sorted(originals) == list(range(10))
    flipped = [s[1] for s in steps]
    assert flipped[-1] is False and sorted(np.concatenate(flipped[:2])) == list(range(7))
    assert [len(s[0]) for s in steps] == [4, 4, 2]
    assert not np.array_equal(steps[0][0], epoch_batches([10, 7], 4, seed=0, epoch=2)[0][0])
    assert epoch_batches([10], None, 0, 1) == [[None]]


def test_another_objective_plugs_into_the_loop(data):
    seen = []

    def mse(model, left, right, ctx):
        seen.append(ctx.n)
        return BatchOutput(((model(left) - model(right)) ** 2).mean())

    torch.manual_seed(0)
    model = build_model("original", 32)
    cfg = TrainConfig(epochs=2, temperature=15.0, topk=(1,), batch_size=64)
    history = train_loop(model, data, cfg, make_optimizer(model, cfg), batch_loss=mse)
    assert seen[:3] == [64, 64, 64] and "Train/top 1" not in history[0] and "Test/top 1" in history[0]


def test_memory_estimate_and_largest_fitting_batch():
    assert step_bytes(2000, 256, 1024, 1000) < step_bytes(4000, 256, 1024, 1000)
    # The measurement: 15,000 training pairs at full batch peaked near 4.75 GB.
    assert 3e9 < step_bytes(15_000, 256, 1024, 5000) < 8e9
    available = step_bytes(4096, 256, 1024, 1000) + 1
    b = largest_fitting_batch(available, 256, 1024, 1000)
    assert b >= 4096 and step_bytes(b + 1, 256, 1024, 1000) > available
    assert largest_fitting_batch(available, 256, 1024, 1000, world_size=2) % 2 == 0
    assert largest_fitting_batch(10, 256, 1024, 1000) == 0


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    return planted_features(tmp_path_factory.mktemp("scale") / "features.npy", 120)


cli = script_cli(train)


def test_config_records_batch_and_world_size(features, tmp_path, capsys):
    rc, _, err = cli(["-d", features, "-s", tmp_path / "r", "-e", "2", "--batch-size", "32", "--no-images",
                      "--seed", "0"], capsys)
    assert rc == 0, err
    config = json.loads((tmp_path / "r" / "run1" / "config.json").read_text())
    assert config["batch_size"] == 32 and config["world_size"] == 1
    rc, _, err = cli(["-d", features, "-s", tmp_path / "f", "-e", "1", "--no-images"], capsys)
    assert json.loads((tmp_path / "f" / "run1" / "config.json").read_text())["batch_size"] is None


@pytest.mark.parametrize("value,message", [("0", "must be at least 1"), ("-3", "must be at least 1"),
                                           ("x", "must be a whole number"), ("2.5", "must be a whole number")])
def test_bad_batch_size(features, tmp_path, value, message):
    proc = subprocess.run([sys.executable, "train.py", "-d", str(features), "-s", str(tmp_path / "r"),
                           "--batch-size", value], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "r").exists()


def test_memory_check_refuses_with_the_largest_batch(features, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("adaptation.experiment.available_bytes", lambda device: float(step_bytes(40, 16, 1024, 30)))
    rc, _, err = cli(["-d", features, "-s", tmp_path / "r", "-e", "1", "--no-images"], capsys)
    assert rc == 2
    line = err.strip().splitlines()[-1]
    assert "the full batch (90 pairs) needs about" in line and "available" in line
    assert "the largest --batch-size that fits is 40" in line
    assert not (tmp_path / "r").exists()
    rc, _, err = cli(["-d", features, "-s", tmp_path / "r", "-e", "1", "--no-images", "--batch-size", "40"], capsys)
    assert rc == 0, err


def test_block_ranks_are_the_row_ranks():
    from adaptation.metrics import block_partner_ranks, partner_ranks

    sim = torch.randint(0, 3, (9, 9)).float()  # small integers: many ties
    sim[2, 2] = float("nan")
    l2r, _ = partner_ranks(sim)
    assert torch.equal(block_partner_ranks(sim, torch.arange(9), 9), l2r)
    assert torch.equal(block_partner_ranks(sim[3:6], torch.arange(3, 6), 9), l2r[3:6])


@pytest.mark.parametrize("gpu", [True, None], ids=["--gpu", "default"])
def test_cuda_under_torchrun_needs_a_gpu_per_rank(monkeypatch, gpu):
    from train import select_device
    from toolkit.distributed import Ranks
    from toolkit.utils import UserError

    two = [Ranks(rank=r, world_size=2, local_rank=r, local_world_size=2) for r in range(2)]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: f"Fake GPU {torch.device(d).index}")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(UserError, match="needs 2 GPUs, found 1; use torchrun --nproc_per_node 1, or --cpu"):
        select_device(gpu, two[0])
    # --cpu needs no GPU at all, under torchrun as alone.
    assert select_device(False, two[0]) == (torch.device("cpu"), None)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    for rank in range(2):
        device, note = select_device(gpu, two[rank])
        assert device == torch.device("cuda", rank)
        assert f"Fake GPU {rank}" in note and "cuda:LOCAL_RANK" in note


def test_batch_size_checks_against_ranks_and_pairs():
    from adaptation.experiment import resolve_batch_size
    from toolkit.distributed import Ranks
    from toolkit.utils import UserError

    two = Ranks(rank=0, world_size=2, local_world_size=2)
    assert resolve_batch_size(None, 100, two) is None and resolve_batch_size(500, 100, two) is None
    assert resolve_batch_size(64, 100, two) == 64
    with pytest.raises(UserError, match="use batch_size 64"):
        resolve_batch_size(63, 100, two)
    with pytest.raises(UserError, match="3 ranks but only 2 training pairs"):
        resolve_batch_size(None, 2, Ranks(rank=0, world_size=3, local_world_size=3))


def test_blocked_evaluation_of_a_model_adapts_in_blocks_and_equals_the_full_matrix():
    import torch.nn.functional as F

    from adaptation.evaluation import unit_rows
    from adaptation.training import evaluate

    torch.manual_seed(0)
    model = build_model("original", 16, out_dim=32).eval()
    left, right = torch.randn(23, 16), torch.randn(23, 16)
    with torch.no_grad():
        slow = F.normalize(model(left), dim=1)
    for rows in (1, 5, 23, 40):
        assert torch.allclose(unit_rows(model, left, rows), slow, atol=1e-6)
    cfg = TrainConfig(epochs=1, temperature=15.0, topk=(1, 3))
    full = evaluate(model, left, right, cfg)
    for rows in (4, 7):
        blocked = evaluate(model, left, right, cfg, block_rows=rows)
        assert blocked.keys() == full.keys()
        for k in full:
            assert blocked[k].item() == pytest.approx(full[k].item(), abs=1e-5), k
