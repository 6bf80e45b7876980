"""Validation split, best epoch, early stopping and the calibrated threshold, through train.py."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import train
from adaptation.split import split_data, split_indices
from featuresExtractor.pairs_file import load_pairs
from adaptation.losses import similarity_matrix
from adaptation.metrics import retrieval_metrics
from adaptation.checkpoint import load_checkpoint
from adaptation.models import build_model
from adaptation.selection import best_epoch, patience_exhausted, split_validation
from synthetic.planted import planted_array
from adaptation.training import TrainConfig, make_optimizer
from adaptation.training import train as train_fn
from conftest import planted_features, script_cli
from toolkit.utils import UserError
from test_adaptation_training import one_thread  # noqa: F401  (autouse fixture shared with that module)


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    return planted_features(tmp_path_factory.mktemp("sel") / "features.npy", 160)


cli = script_cli(train)


@pytest.mark.parametrize("n, test_split, val_split, seed", [(100, 0.25, 0.2, 0), (37, 0.3, 0.1, 5), (500, 0.5, 0.5, 9)])
def test_validation_rows_are_disjoint_from_train_and_test(n, test_split, val_split, seed):
    train_idx, test_idx = split_indices(n, test_split, seed)
    tr, val = split_validation(train_idx, val_split, seed)
    assert not set(tr) & set(val) and not set(tr) & set(test_idx) and not set(val) & set(test_idx)
    assert sorted([*tr, *val, *test_idx]) == list(range(n))
    assert len(val) == int(np.floor(val_split * len(train_idx)))
    # The test split is drawn first and is the same with or without validation.
    assert np.array_equal(split_indices(n, test_split, seed)[1], test_idx)
    tr0, val0 = split_validation(train_idx, 0.0, seed)
    assert np.array_equal(tr0, train_idx) and len(val0) == 0


def test_validation_flipped_copies_stay_out_of_training():
    pairs = load_pairs_from(planted_array(40, 8, seed=2))
    train_idx, test_idx = split_indices(len(pairs), 0.25, 0)
    tr, val = split_validation(train_idx, 0.25, 0)
    data = split_data(pairs, tr, test_idx, "cpu", val)
    assert data.flipped[0].shape[0] == len(tr)  # only the training pairs' copies
    assert set(data.val_names) == {pairs.names[i] for i in val}
    assert torch.equal(data.val[0], torch.as_tensor(pairs.left[val]))


def load_pairs_from(arr):
    from featuresExtractor.pairs_file import pairs_from_structured

    return pairs_from_structured(arr)


@pytest.mark.parametrize("bad, match", [(0.001, "at least 2"), (float("nan"), "below 1"), (1.0, "below 1")])
def test_bad_validation_share(bad, match):
    with pytest.raises(UserError, match=match):
        split_validation(np.arange(50), bad, 0)


def brute_best(history, k):
    best = None
    for i, row in enumerate(history, start=1):
        key = (row[f"Val/top {k}"], row["Val/MRR"])
        if best is None or key > best[0]:
            best = (key, i)
    return best[1]


@pytest.mark.parametrize("seed", range(6))
def test_best_epoch_and_patience_against_brute_force(seed):
    rng = np.random.default_rng(seed)
    history = [{"Val/top 1": float(rng.integers(0, 4)) / 4, "Val/MRR": float(rng.integers(0, 3)) / 3}
               for _ in range(int(rng.integers(1, 30)))]
    assert best_epoch(history, 1) == brute_best(history, 1)
    for patience in (1, 2, 5):
        # Replay epoch by epoch: stop at the first epoch P epochs after the best so far.
        stop = next((e for e in range(1, len(history) + 1)
                     if e - brute_best(history[:e], 1) >= patience), None)
        flags = [patience_exhausted(history[:e], patience, 1) for e in range(1, len(history) + 1)]
        assert (flags.index(True) + 1 if True in flags else None) == stop
    nan_first = [{"Val/top 1": float("nan"), "Val/MRR": 0.0}, {"Val/top 1": 0.0, "Val/MRR": 0.0}]
    assert best_epoch(nan_first, 1) == 2


def test_val_split_zero_is_the_run_without_validation(features, tmp_path, capsys):
    # The recipe replayed through the package functions, as train.py ran before validation existed.
    rc, _, err = cli(["-d", features, "-s", tmp_path / "r", "-e", "20", "-t", "15", "-k", "1", "3", "--seed", "4",
                      "--val-split", "0", "--no-images"], capsys)
    assert rc == 0, err
    pairs = load_pairs(features)
    data = split_data(pairs, *split_indices(len(pairs), 0.25, 4, (1, 3)))
    torch.manual_seed(4)
    model = build_model("original", pairs.in_dim)
    cfg = TrainConfig(epochs=20, temperature=15.0, topk=(1, 3))
    history = train_fn(model, data, cfg, make_optimizer(model, cfg))
    record = json.loads((tmp_path / "r" / "run1" / "metrics.json").read_text())
    assert record["epochs"] == json.loads(json.dumps(history))
    assert set(record) == {"run", "seconds", "epochs"}  # nothing about validation
    ckpt = torch.load(tmp_path / "r" / "run1" / "model_and_optimizer.pt", weights_only=True)
    assert all(torch.equal(ckpt["state_dict"][k], v) for k, v in model.state_dict().items())
    assert not (tmp_path / "r" / "run1" / "best.pt").exists()
    assert "best_val" not in json.loads((tmp_path / "r" / "summary.json").read_text())


def test_best_pt_is_the_best_validation_epoch(features, tmp_path, capsys):
    runs = tmp_path / "r"
    rc, out, err = cli(["-d", features, "-s", runs, "-e", "40", "-t", "15", "-k", "1", "3", "--seed", "1",
                        "--val-split", "0.25", "--lr", "3e-3", "--no-images"], capsys)
    assert rc == 0, err
    record = json.loads((runs / "run1" / "metrics.json").read_text())
    history = record["epochs"]
    assert all(f"Val/top {k}" in row for row in history for k in (1, 3))
    best = brute_best(history, 1)
    assert record["best_epoch"] == best and record["patience"] is None and not record["stopped_early"]
    model, ckpt = load_checkpoint(runs / "run1" / "best.pt")
    assert ckpt["epoch"] == best
    # The weights kept are the ones that scored that epoch's validation figures.
    config = json.loads((runs / "run1" / "config.json").read_text())
    assert config["val_split"] == 0.25 and config["n_val"] == len(ckpt["val_names"]) == 30
    pairs = load_pairs(features)
    idx = [pairs.names.index(n) for n in ckpt["val_names"]]
    with torch.no_grad():
        sim = similarity_matrix(model(torch.as_tensor(pairs.left[idx])), model(torch.as_tensor(pairs.right[idx])))
    got = {k: v.item() for k, v in retrieval_metrics(sim, (1, 3)).items()}
    assert got["top 1"] == pytest.approx(history[best - 1]["Val/top 1"])
    assert got["MRR"] == pytest.approx(history[best - 1]["Val/MRR"], abs=1e-6)
    assert not set(ckpt["val_names"]) & set(ckpt["test_names"])
    # The last checkpoint is the last epoch, and both carry a threshold calibrated on validation.
    _, last = load_checkpoint(runs / "run1" / "model_and_optimizer.pt")
    assert last["epoch"] == 40 and last["threshold"]["n_pairs"] == 30 and ckpt["threshold"]["n_pairs"] == 30
    summary = json.loads((runs / "summary.json").read_text())
    assert summary["best_val"]["epochs"] == [best]
    assert summary["best_val"]["Test/top 1"]["mean"] == pytest.approx(history[best - 1]["Test/top 1"])
    assert summary["final"]["Test/top 1"]["mean"] == pytest.approx(history[-1]["Test/top 1"])
    assert f"at best val epoch [{best}]" in out


def test_patience_stops_and_is_recorded(features, tmp_path, capsys):
    runs = tmp_path / "r"
    rc, _, err = cli(["-d", features, "-s", runs, "-e", "400", "-t", "15", "--seed", "2", "--val-split", "0.2",
                      "--patience", "3", "-k", "1", "--no-images", "-r", "2"], capsys)
    assert rc == 0, err
    for run in ("run1", "run2"):
        record = json.loads((runs / run / "metrics.json").read_text())
        assert record["patience"] == 3 and record["stopped_early"]
        assert record["epochs_run"] == len(record["epochs"]) < 400
        assert len(record["epochs"]) - record["best_epoch"] == 3
        assert json.loads((runs / run / "config.json").read_text())["patience"] == 3


def test_dummy_with_validation(features, tmp_path, capsys):
    rc, _, err = cli(["-d", features, "-s", tmp_path / "d", "--model", "dummy", "-e", "10", "--seed", "0",
                      "--val-split", "0.2", "--patience", "2", "-k", "1", "--no-images"], capsys)
    assert rc == 0, err
    record = json.loads((tmp_path / "d" / "run1" / "metrics.json").read_text())
    assert record["best_epoch"] == 1 and record["epochs_run"] == 3
    assert record["threshold"] == record["best_threshold"]


@pytest.mark.parametrize("extra, match", [
    (["--patience", "3"], "--patience needs validation pairs"),
    (["--val-split", "0.01"], "at least 2"),
    (["--val-split", "-0.1"], None),
    (["--val-split", "1"], None),
    (["--patience", "0", "--val-split", "0.2"], None),
])
def test_bad_selection_flags_exit_2(features, tmp_path, capsys, extra, match):
    with pytest.raises(SystemExit) if match is None else _nothing():
        rc, _, err = cli(["-d", features, "-s", tmp_path / "x", "-e", "2", *extra], capsys)
        assert rc == 2 and match in err and err.count("\n") == 1
    if match is None:
        assert capsys.readouterr().err  # argparse's usage line
    assert not (tmp_path / "x").exists()


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
