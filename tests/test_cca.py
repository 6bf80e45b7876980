"""Shared CCA (`adaptation.cca`, `train.py --model cca`) and the linear model: the closed form against scipy,
k chosen on validation only, the ridge, a cca run used by similarity.py and ONNX, torchrun, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import scipy.linalg
import torch

import similarity
import train
from adaptation.cca import (PairMoments, SingularFit, choose_k, fit_run, pair_moments, shared_cca,
                            validation_curve)
from adaptation.checkpoint import BEST_CHECKPOINT, CHECKPOINT, load_checkpoint
from adaptation.split import TrainData
from conftest import ROOT, free_port, planted_features, refused_in_one_line, run_bounded, run_script
from test_adaptation_training import one_thread  # noqa: F401  (autouse fixture shared with that module)
from test_similarity import run  # noqa: F401  (run: the module-scoped tiny extraction and run fixture)
from synthetic.planted import planted_array, planted_pairs


def cli(argv, capsys):
    return run_script(train, argv, capsys)


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    return planted_features(tmp_path_factory.mktemp("cca") / "p" / "features.npy", 120)


# ---------------------------------------------------------------- the closed form

def slow_cca(sets, ridge):
    """The definition, spelled out: every pair in both orders as rows, numpy's covariances, scipy's generalised eigh."""
    left = np.concatenate([np.asarray(a, np.float64) for a, _ in sets])
    right = np.concatenate([np.asarray(b, np.float64) for _, b in sets])
    rows_l, rows_r = np.concatenate([left, right]), np.concatenate([right, left])  # (l, r) and (r, l)
    cov_sum = np.cov(rows_l + rows_r, rowvar=False, bias=True)
    cov_diff = np.cov(rows_l - rows_r, rowvar=False, bias=True)
    dim = cov_sum.shape[0]
    b = cov_diff + ridge * np.trace(cov_diff) / dim * np.eye(dim)
    values, vectors = scipy.linalg.eigh(cov_sum, b)
    return values[::-1], vectors[:, ::-1], b


@pytest.mark.parametrize("n_pairs,dim,ridge", [(300, 24, 1e-3), (300, 24, 0.0), (40, 16, 0.1)])
def test_closed_form_matches_scipy_generalised_eigh(n_pairs, dim, ridge):
    pairs = planted_pairs(n_pairs, dim, seed=1)
    sets = [(torch.as_tensor(pairs.left[:n_pairs // 2]), torch.as_tensor(pairs.right[:n_pairs // 2])),
            (torch.as_tensor(pairs.left[n_pairs // 2:]), torch.as_tensor(pairs.right[n_pairs // 2:]))]
    fit = shared_cca(pair_moments(sets), ridge)
    values, vectors, b = slow_cca(sets, ridge)
    assert fit.vectors.dtype == torch.float64
    np.testing.assert_allclose(fit.values.numpy(), values, rtol=1e-6, atol=1e-9)
    # Each direction up to its sign (distinct eigenvalues here: the minimum gap is asserted).
    assert np.diff(values).max() < -1e-6
    signs = np.sign((vectors * fit.vectors.numpy()).sum(0))
    np.testing.assert_allclose(fit.vectors.numpy() * signs, vectors, rtol=0, atol=1e-6 * np.abs(vectors).max())
    np.testing.assert_allclose(fit.vectors.numpy().T @ b @ fit.vectors.numpy(), np.eye(dim), atol=1e-8)
    # The weight of the linear layer is the top-k columns, transposed.
    assert torch.equal(fit.weight(3), fit.vectors[:, :3].T)


def test_moments_add_up_over_shares():
    pairs = planted_pairs(50, 8, seed=2)
    left, right = torch.as_tensor(pairs.left), torch.as_tensor(pairs.right)
    whole = pair_moments([(left, right)])
    parts = [pair_moments([(left[i:i + 17], right[i:i + 17])]) for i in range(0, len(left), 17)]
    summed = PairMoments.unpack(sum(p.pack() for p in parts), 8)
    assert summed.n == whole.n == len(left)
    for a, b in zip(summed.covariances(), whole.covariances()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_the_ridge_fits_fewer_pairs_than_dimensions_and_zero_ridge_is_refused():
    rng = np.random.default_rng(0)
    left, right = torch.as_tensor(rng.normal(size=(10, 32))), torch.as_tensor(rng.normal(size=(10, 32)))
    moments = pair_moments([(left, right)])
    fit = shared_cca(moments, 1e-3)
    _, cov_diff = moments.covariances()
    assert torch.linalg.matrix_rank(cov_diff) <= 10 < 32  # singular without the ridge
    b = cov_diff + 1e-3 * torch.trace(cov_diff) / 32 * torch.eye(32, dtype=torch.float64)
    assert torch.isfinite(fit.vectors).all() and torch.isfinite(fit.values).all()
    torch.testing.assert_close(fit.vectors.T @ b @ fit.vectors, torch.eye(32, dtype=torch.float64), atol=1e-7, rtol=0)
    values, _, _ = slow_cca([(left, right)], 1e-3)
    np.testing.assert_allclose(fit.values.numpy(), values, rtol=1e-6, atol=1e-6 * values.max())
    with pytest.raises(SingularFit, match="singular in 32 dimensions.*cca_ridge above 0"):
        shared_cca(moments, 0.0)
    with pytest.raises(Exception, match="cca_ridge must be a finite number, zero or more"):
        shared_cca(moments, -1e-3)


# ---------------------------------------------------------------- k is chosen on validation, never on test

def _shared(rng, n, shared_dims, dim=6, noise=3.0):
    """n pairs whose partners share `shared_dims` (value plus small noise); the other dimensions are independent."""
    z = rng.normal(size=(n, dim))
    left, right = noise * rng.normal(size=(n, dim)), noise * rng.normal(size=(n, dim))
    left[:, :shared_dims] = z[:, :shared_dims] + 0.1 * rng.normal(size=(n, shared_dims))
    right[:, :shared_dims] = z[:, :shared_dims] + 0.1 * rng.normal(size=(n, shared_dims))
    return torch.as_tensor(left, dtype=torch.float32), torch.as_tensor(right, dtype=torch.float32)


def test_k_is_chosen_on_validation_and_never_on_test():
    rng = np.random.default_rng(0)
    # Training: dimension j is shared with correlation falling with j, so the directions come in axis order.
    z = rng.normal(size=(600, 6))
    spread = np.array([0.2, 0.4, 0.7, 1.0, 1.4, 2.0])
    train_l = torch.as_tensor(z + spread * rng.normal(size=z.shape), dtype=torch.float32)
    train_r = torch.as_tensor(z + spread * rng.normal(size=z.shape), dtype=torch.float32)
    # Planted: the validation pairs share 2 dimensions (best k: 2), the test pairs all 6 (best k: 6).
    val, test = _shared(rng, 60, 2), _shared(rng, 60, 6)
    data = TrainData(train=(train_l, train_r), flipped=None, test=test, train_names=[], test_names=[], val=val,
                     val_names=[])
    fitted = fit_run(data, 1e-3, None, (1,), 15.0)
    test_curve = validation_curve(fitted.fit, *test, (1,), 15.0)
    val_curve = validation_curve(fitted.fit, *val, (1,), 15.0)
    assert fitted.curve == val_curve and fitted.chosen_on == "validation"
    assert fitted.k == choose_k(val_curve, 1) == 2
    assert choose_k(test_curve, 1) == 6 and test_curve[5]["Val/top 1"] > test_curve[1]["Val/top 1"]
    # The map is fitted on the training pairs alone: other validation pairs change the curve, not the map.
    other = TrainData(train=(train_l, train_r), flipped=None, test=test, train_names=[], test_names=[],
                      val=_shared(rng, 60, 4), val_names=[])
    assert torch.equal(fit_run(other, 1e-3, None, (1,), 15.0).fit.vectors, fitted.fit.vectors)
    # Given k: kept as given, the curve still recorded.
    given = fit_run(data, 1e-3, 5, (1,), 15.0)
    assert (given.k, given.chosen_on, given.curve) == (5, "given", val_curve)


def test_choose_k_breaks_ties_by_mrr_then_the_smaller_k():
    curve = [{"k": 1, "Val/top 1": 0.5, "Val/MRR": 0.6}, {"k": 2, "Val/top 1": 0.7, "Val/MRR": 0.7},
             {"k": 3, "Val/top 1": 0.7, "Val/MRR": 0.8}, {"k": 4, "Val/top 1": 0.7, "Val/MRR": 0.8}]
    assert choose_k(curve, 1) == 3


# ---------------------------------------------------------------- train.py --model cca and --model linear

def test_cca_run_writes_what_any_run_writes(features, tmp_path, capsys):
    code, out, err = cli(["-d", features, "--model", "cca", "-s", tmp_path / "r", "--val-split", "0.2", "-t", "15",
                          "-k", "1", "3", "--seed", "0", "-r", "2", "-e", "150", "--no-images"], capsys)
    assert code == 0, err
    assert "model cca is fitted in closed form" in err and "-e/--epochs" in err
    assert "run 1: cca k" in err and "chosen on validation" in err and "Test/top 1" in out
    for r in (1, 2):
        folder = tmp_path / "r" / f"run{r}"
        config = json.loads((folder / "config.json").read_text())
        rec = config["cca"]
        assert rec["chosen_on"] == "validation" and rec["ridge"] == config["cca_ridge"] == 1e-3
        assert len(rec["val_curve"]["k"]) == 16 == len(rec["eigenvalues"])
        assert rec["k"] == choose_k([dict(zip(rec["val_curve"], row)) for row in zip(*rec["val_curve"].values())], 1)
        assert config["model_kwargs"] == {"out_dim": rec["k"]} and config["epochs"] == 1
        metrics = json.loads((folder / "metrics.json").read_text())
        assert len(metrics["epochs"]) == 1 and metrics["best_epoch"] == 1 and "threshold" in metrics
        model, ckpt = load_checkpoint(folder / CHECKPOINT)
        assert ckpt["model_name"] == "cca" and model.out_dim == rec["k"]
        assert list(model.state_dict()) == ["weight_matrix.weight"]  # a bias-free linear layer
        best, _ = load_checkpoint(folder / BEST_CHECKPOINT)
        assert torch.equal(best.weight_matrix.weight, model.weight_matrix.weight)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "r" / "run1")).Reload()
    assert {"CCA/Val/top 1", "CCA/eigenvalue", "CCA/k", "Test/top 1"} <= set(acc.Tags()["scalars"])
    assert len(acc.Scalars("CCA/Val/top 1")) == 16
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["config"]["model"] == "cca" and len(summary["final"]["Test/top 1"]["values"]) == 2
    # -r runs differ by their splits, so their fits differ.
    a = torch.load(tmp_path / "r" / "run1" / CHECKPOINT, weights_only=True)["state_dict"]["weight_matrix.weight"]
    b = torch.load(tmp_path / "r" / "run2" / CHECKPOINT, weights_only=True)["state_dict"]["weight_matrix.weight"]
    assert a.shape != b.shape or not torch.equal(a, b)


def test_cca_learns_above_the_raw_features(tmp_path, capsys):
    path = tmp_path / "f.npy"
    np.save(path, planted_array(400, 32, signal_dim=6, noise=0.5, nuisance=3.0, seed=0))
    common = ["-d", path, "-t", "15", "-k", "1", "--seed", "0", "--no-images", "--val-split", "0.2"]
    assert cli(common + ["--model", "cca", "-s", tmp_path / "cca"], capsys)[0] == 0
    assert cli(common + ["--model", "dummy", "-s", tmp_path / "dummy", "-e", "1"], capsys)[0] == 0
    top1 = {m: json.loads((tmp_path / m / "summary.json").read_text())["final"]["Test/top 1"]["mean"]
            for m in ("cca", "dummy")}
    assert top1["cca"] > top1["dummy"] + 0.2, top1


def test_fewer_training_pairs_than_dimensions_fit_with_the_ridge(tmp_path, capsys):
    path = tmp_path / "few.npy"
    np.save(path, planted_array(12, 16, flipped=False, seed=0))  # 9 training pairs in 16 dimensions
    common = ["-d", path, "--model", "cca", "--cca-k", "4", "-k", "1", "--seed", "0", "--no-images"]
    code, _, err = cli(common + ["-s", tmp_path / "ok"], capsys)
    assert code == 0, err
    code, _, err = cli(common + ["-s", tmp_path / "singular", "--cca-ridge", "0"], capsys)
    # Found by the run's fit, after the headline: one error line, and the runs folder is removed.
    assert code == 2 and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("train.py: error:") and err.count("error") == 1, err
    assert "is singular" in last and "--cca-ridge above 0" in last, err
    assert not (tmp_path / "singular").exists()


@pytest.mark.parametrize("extra,match", [
    (["--model", "cca", "--cca-k", "0"], "--cca-k: must be at least 1"),
    (["--model", "cca", "--cca-k", "17"], "--cca-k must be between 1 and the features' dimension 16, got 17"),
    (["--model", "cca", "--val-split", "0.2", "--objective", "simsiam"], "--model cca is fitted in closed form"),
    (["--model", "cca", "--cca-k", "4", "--cca-ridge", "-0.1"], "--cca-ridge: must be zero or more"),
    (["--model", "cca", "--cca-k", "4", "--cca-ridge", "nan"], "--cca-ridge: must be zero or more"),
    (["--model", "cca"], "--model cca needs --cca-k, or --val-split to choose k"),
    (["--model", "original", "--cca-k", "4"], "--cca-k applies to --model cca only"),
    (["--model", "linear", "--cca-ridge", "0.1"], "--cca-ridge applies to --model cca only"),
    (["--model", "peterson", "--out-dim", "8"], "--out-dim applies to models original and linear"),
    (["--model", "cca", "--cca-k", "4", "--out-dim", "8"], "its width is --cca-k"),
    (["--model", "linear", "--out-dim", "0"], "--out-dim: must be at least 1"),
])
def test_bad_input_one_line_exit_2(extra, match, features, tmp_path, capsys):
    err = refused_in_one_line(train, ["-d", features, "-s", tmp_path / "r", "-e", "1"] + extra, capsys, tmp_path / "r")
    assert match in err, err


def test_linear_and_out_dim(features, tmp_path, capsys):
    common = ["-d", features, "-t", "15", "-k", "1", "--seed", "0", "--no-images", "-e", "3"]
    code, _, err = cli(common + ["--model", "linear", "-s", tmp_path / "lin", "--batch-size", "32", "--precision",
                                 "bf16", "--val-split", "0.2"], capsys)
    assert code == 0, err
    model, ckpt = load_checkpoint(tmp_path / "lin" / "run1" / CHECKPOINT)
    assert ckpt["model_kwargs"] == {"out_dim": 256} and (tmp_path / "lin" / "run1" / BEST_CHECKPOINT).is_file()
    x = torch.randn(5, 16)
    torch.testing.assert_close(model(x), x @ model.weight_matrix.weight.T)  # no bias, no ReLU
    assert (model(-x) < 0).any()
    assert cli(common + ["--model", "linear", "--out-dim", "12", "-s", tmp_path / "l12"], capsys)[0] == 0
    assert load_checkpoint(tmp_path / "l12" / "run1" / CHECKPOINT)[0].out_dim == 12
    assert cli(common + ["--model", "original", "--out-dim", "64", "-s", tmp_path / "o64"], capsys)[0] == 0
    config = json.loads((tmp_path / "o64" / "run1" / "config.json").read_text())
    assert config["model_kwargs"] == {"out_dim": 64}
    assert load_checkpoint(tmp_path / "o64" / "run1" / CHECKPOINT)[0].out_dim == 64
    assert cli(common + ["--model", "original", "-s", tmp_path / "o"], capsys)[0] == 0  # the paper's width
    assert json.loads((tmp_path / "o" / "run1" / "config.json").read_text())["model_kwargs"] == {"out_dim": 1024}


# ---------------------------------------------------------------- a cca run applied: similarity.py and ONNX

def test_cca_checkpoint_serves_and_exports_to_onnx(run, tmp_path, capsys):  # noqa: F811
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from retrieval.visual_similarity import VisualSimilarity

    code, _, err = cli(["-d", run["features"], "--model", "cca", "--cca-k", "5", "-s", tmp_path / "runs", "-t", "15",
                        "--test-split", "0.25", "-k", "1", "--seed", "0", "--no-images"], capsys)
    assert code == 0, err
    folder = tmp_path / "runs" / "run1"
    left = sorted((run["root"] / "tll" / "left").iterdir())
    code, out, err = run_script(similarity, ["--run", folder, "pair", left[0], left[1]], capsys)
    assert code == 0 and "adapted similarity" in out, err
    code, out, err = run_script(similarity, ["--run", folder, "search", left[0], "--gallery", run["gallery"], "-k", "2"],
                                capsys)
    assert code == 0 and out.count(".png") == 2, err
    code, _, err = run_script(similarity, ["--run", folder, "export", "-o", tmp_path / "onnx", "--dynamic-batch"], capsys)
    assert code == 0, err
    a = VisualSimilarity.from_run(folder, device="cpu")
    b = VisualSimilarity.from_onnx(tmp_path / "onnx")
    ea, eb = a.embed(left[:4]).numpy().astype(np.float64), np.asarray(b.embed(left[:4]), np.float64)
    assert ea.shape == (4, 5)
    cos = (ea * eb).sum(1) / (np.linalg.norm(ea, axis=1) * np.linalg.norm(eb, axis=1))
    assert cos.min() >= 0.9999, cos


# ---------------------------------------------------------------- torchrun: 2 gloo ranks give one process's fit

def test_two_ranks_give_one_process_fit(tmp_path):
    features = planted_features(tmp_path / "f" / "features.npy", 61)  # 46 training pairs: shares of 23/23, 19/18
    common = ["--cpu", "-d", features, "--model", "cca", "--val-split", "0.2", "-t", "15", "--seed", "3", "-k", "1",
              "3", "--no-images"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    two = run_bounded([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                       str(free_port()), "train.py", "-s", tmp_path / "two", *common], 180, cwd=ROOT, env=env)
    assert two.returncode == 0, two.stderr
    one = subprocess.run([sys.executable, "train.py", "-s", tmp_path / "one", *map(str, common)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120, env=env)
    assert one.returncode == 0, one.stderr
    cfg_two = json.loads((tmp_path / "two" / "run1" / "config.json").read_text())
    cfg_one = json.loads((tmp_path / "one" / "run1" / "config.json").read_text())
    assert (cfg_two["world_size"], cfg_one["world_size"]) == (2, 1)
    assert cfg_two["cca"]["k"] == cfg_one["cca"]["k"]
    for name, values in cfg_one["cca"]["val_curve"].items():  # the ranks' blocked loss rounds apart in fp32
        np.testing.assert_allclose(cfg_two["cca"]["val_curve"][name], values, rtol=1e-5, err_msg=name)
    np.testing.assert_allclose(cfg_two["cca"]["eigenvalues"], cfg_one["cca"]["eigenvalues"], rtol=1e-9)
    w_two = torch.load(tmp_path / "two" / "run1" / CHECKPOINT, weights_only=True)["state_dict"]["weight_matrix.weight"]
    w_one = torch.load(tmp_path / "one" / "run1" / CHECKPOINT, weights_only=True)["state_dict"]["weight_matrix.weight"]
    torch.testing.assert_close(w_two, w_one, rtol=0, atol=1e-6 * w_one.abs().max().item())
    single = json.loads((tmp_path / "one" / "summary.json").read_text())["final"]
    both = json.loads((tmp_path / "two" / "summary.json").read_text())["final"]
    for name, fig in single.items():
        assert both[name]["mean"] == pytest.approx(fig["mean"], abs=1e-4), name
