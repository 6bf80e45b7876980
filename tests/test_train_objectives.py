"""train.py --objective: contrastive unchanged byte for byte; simsiam and byol runs, their outputs and bad flags."""

import hashlib
import json
import re

import pytest
import torch

import train
from adaptation.checkpoint import load_checkpoint, load_objective
from adaptation.objectives import BYOL, SimSiam
from adaptation.runs import collapse_verdict
from test_adaptation_training import one_thread  # noqa: F401  (autouse fixture shared with that module)
from conftest import planted_features, refused_in_one_line, script_cli
from toolkit.utils import UserError

# Recorded with train.py as it was without --objective (main at 7b82a23, where run i draws its own
# split; 8e04926, before per-run splits, gave 2746e009...), 1 thread, this CPU build of torch: the
# per-epoch figures, the summary's, the weights and the Adam state of two runs.
PINNED_CONTRASTIVE = "a8c90278dfb325a7ebf3b50f9412c06d9b07b47b84db6d792194e75f8c76c474"


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    return planted_features(tmp_path_factory.mktemp("obj") / "p" / "features.npy", 120)


cli = script_cli(train)


def run_digest(runs, n_runs=2):
    h = hashlib.sha256()
    for r in range(1, n_runs + 1):
        h.update(json.dumps(json.loads((runs / f"run{r}" / "metrics.json").read_text())["epochs"], sort_keys=True).encode())
        ck = torch.load(runs / f"run{r}" / "model_and_optimizer.pt", weights_only=True)
        for k, v in sorted(ck["state_dict"].items()):
            h.update(k.encode())
            h.update(v.numpy().tobytes())
        for _, state in sorted(ck["optimizer"]["state"].items()):
            for k, v in sorted(state.items()):
                h.update(k.encode())
                h.update(v.numpy().tobytes())
    h.update(json.dumps(json.loads((runs / "summary.json").read_text())["final"], sort_keys=True).encode())
    return h.hexdigest()


def test_contrastive_is_byte_identical_to_before(features, tmp_path, capsys):
    base = ["-d", features, "-e", "20", "-r", "2", "-t", "15", "--seed", "0", "-k", "1", "3"]
    assert cli(base + ["-s", tmp_path / "default"], capsys)[0] == 0
    assert cli(base + ["-s", tmp_path / "explicit", "--objective", "contrastive"], capsys)[0] == 0
    assert run_digest(tmp_path / "default") == run_digest(tmp_path / "explicit") == PINNED_CONTRASTIVE
    summary = json.loads((tmp_path / "explicit" / "summary.json").read_text())
    assert "collapse" not in summary and summary["config"]["objective"] == "contrastive"
    ckpt = torch.load(tmp_path / "explicit" / "run1" / "model_and_optimizer.pt", weights_only=True)
    assert "objective" not in ckpt


@pytest.mark.parametrize("objective", ["simsiam", "byol"])
def test_positive_objective_run(objective, features, tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rc, out, err = cli(["-d", features, "-s", tmp_path / "r", "-e", "4", "-r", "2", "-t", "15", "--seed", "0",
                        "-k", "1", "3", "--objective", objective, "--batch-size", "32"], capsys)
    assert rc == 0, err
    assert "Train/output std" in out and "collapse: " in out
    contrastive = tmp_path / "c"
    assert cli(["-d", features, "-s", contrastive, "-e", "2", "--seed", "0", "-k", "1", "3"], capsys)[0] == 0
    tags = set(EventAccumulator(str(tmp_path / "r" / "run1")).Reload().Tags()["scalars"])
    ref = set(EventAccumulator(str(contrastive / "run1")).Reload().Tags()["scalars"])
    assert tags == ref | {"Train/output std"}

    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    ref_summary = json.loads((contrastive / "summary.json").read_text())
    assert set(summary["final"]) == set(ref_summary["final"]) | {"Train/output std"}
    collapse = summary["collapse"]
    assert len(collapse["collapsed"]) == 2 and collapse["healthy"] == pytest.approx(1 / 32)
    assert collapse["output_std"] == summary["final"]["Train/output std"]["values"]
    config = summary["config"]
    assert (config["objective"], config["batch_size"]) == (objective, 32)
    assert ("ema" in config) == (objective == "byol")

    path = tmp_path / "r" / "run1" / "model_and_optimizer.pt"
    model, ckpt = load_checkpoint(path)  # what similarity.py reads: the encoder alone
    assert model(torch.zeros(1, 16)).shape == (1, 1024)
    obj, _ = load_objective(path)
    assert isinstance(obj, SimSiam if objective == "simsiam" else BYOL)
    assert torch.equal(obj.encoder.weight_matrix.weight, model.weight_matrix.weight)
    for k, v in ckpt["objective"]["predictor"].items():
        assert torch.equal(obj.predictor.state_dict()[k], v)
    if objective == "byol":
        assert torch.equal(obj.target.weight_matrix.weight, ckpt["objective"]["target"]["weight_matrix.weight"])
        assert not torch.equal(obj.target.weight_matrix.weight, model.weight_matrix.weight)
    else:
        assert ckpt["objective"]["target"] is None
    # Adam holds the encoder's and the predictor's parameters.
    assert len(ckpt["optimizer"]["param_groups"][0]["params"]) == 1 + len(list(obj.predictor.parameters()))


def test_positive_objective_same_seed_same_run(features, tmp_path, capsys):
    argv = ["-d", features, "-e", "3", "--seed", "5", "--objective", "simsiam", "--batch-size", "40"]
    assert cli(argv + ["-s", tmp_path / "a"], capsys)[0] == 0
    assert cli(argv + ["-s", tmp_path / "b"], capsys)[0] == 0
    a, b = (json.loads((tmp_path / x / "run1" / "metrics.json").read_text())["epochs"] for x in "ab")
    assert a == b


def test_load_objective_refuses_a_contrastive_checkpoint(features, tmp_path, capsys):
    assert cli(["-d", features, "-s", tmp_path / "c", "-e", "1", "--seed", "0"], capsys)[0] == 0
    with pytest.raises(UserError, match="contrastive"):
        load_objective(tmp_path / "c" / "run1" / "model_and_optimizer.pt")


@pytest.mark.parametrize("extra, match", [
    (["--ema", "0.9"], "--ema applies to --objective byol only"),
    (["--objective", "simsiam", "--ema", "0.9"], "--ema applies to --objective byol only"),
    (["--objective", "byol", "--model", "dummy"], "nothing to train"),
    (["--objective", "byol", "--ema", "1.5"], "must be in \\[0, 1\\]"),
    (["--objective", "simsiam", "--batch-size", "0"], "must be at least 1"),
    (["--objective", "barlow"], "invalid choice"),
])
def test_bad_objective_flags(extra, match, features, tmp_path, capsys):
    err = refused_in_one_line(train, ["-d", features, "-s", tmp_path / "r", "-e", "1"] + extra, capsys, tmp_path / "r")
    assert re.search(match, err), err


def test_collapse_verdict():
    v = collapse_verdict([0.03, 0.0001, float("nan")], 1024)
    assert v["collapsed"] == [False, True, True] and v["verdict"] == "collapsed in 2 of 3 runs"
    assert v["threshold"] == pytest.approx(0.1 / 32)
    assert collapse_verdict([0.03], 1024)["verdict"] == "no run collapsed"


@pytest.mark.parametrize("objective,args", [("simsiam", ["--batch-size", "1"]), ("byol", ["--batch-size", "1"]),
                                            ("simsiam", ["--test-split", "0.995"])])
def test_a_run_that_would_make_no_step_is_refused_before_anything_is_written(features, tmp_path, capsys, objective,
                                                                               args):
    # A batch of one pair is skipped (the predictor's BatchNorm needs two): such a run would write a finished-looking
    # run with Train/Loss 0 for every epoch. 120 pairs at --test-split 0.995 leave 1 training pair.
    code, out, err = cli(["-d", features, "-s", tmp_path / "r", "-e", "2", "--seed", "0", "--objective", objective,
                          *args], capsys)
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"train.py: error: --objective {objective} needs at least 2 pairs "
                                                   "per batch"), err
    assert "would make no optimiser step; use --batch-size 2 or more" in lines[0]
    assert not (tmp_path / "r").exists()


def test_load_objective_refuses_a_damaged_record(features, tmp_path, capsys):
    runs = tmp_path / "r"
    assert cli(["-d", features, "-s", runs, "-e", "1", "--seed", "0", "--objective", "byol"], capsys)[0] == 0
    path = runs / "run1" / "model_and_optimizer.pt"
    ckpt = torch.load(path, weights_only=True)
    del ckpt["objective"]["target"]
    torch.save(ckpt, tmp_path / "lacking.pt")
    with pytest.raises(UserError, match="lacks target"):
        load_objective(tmp_path / "lacking.pt")
    ckpt = torch.load(path, weights_only=True)
    ckpt["objective"]["predictor"] = {"net.0.weight": torch.zeros(3, 3)}
    torch.save(ckpt, tmp_path / "misfit.pt")
    with pytest.raises(UserError, match="do not fit"):
        load_objective(tmp_path / "misfit.pt")


def test_positive_objective_with_validation_split(features, tmp_path, capsys):
    """--val-split works with simsiam: Val/ figures, best.pt (the encoder, for similarity) and the summary's best_val."""
    runs = tmp_path / "r"
    rc, out, err = cli(["-d", features, "-s", runs, "-e", "4", "--seed", "0", "-k", "1", "3", "--objective", "simsiam",
                        "--val-split", "0.2", "--patience", "2"], capsys)
    assert rc == 0, err
    epochs = json.loads((runs / "run1" / "metrics.json").read_text())["epochs"]
    assert "Val/top 1" in epochs[0] and "Train/output std" in epochs[0]
    summary = json.loads((runs / "summary.json").read_text())
    assert "best_val" in summary and "collapse" in summary
    model, _ = load_checkpoint(runs / "run1" / "best.pt")
    assert model(torch.zeros(1, 16)).shape == (1, 1024)
