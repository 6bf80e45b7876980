"""train.py end to end: the paper's command, outputs, determinism, and every bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import train
from adaptation.checkpoint import load_checkpoint
from synthetic.planted import planted_array
from conftest import script_cli
from test_adaptation_training import one_thread  # noqa: F401  (autouse fixture shared with that module)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    folder = tmp_path_factory.mktemp("feats") / "planted"
    folder.mkdir()
    path = folder / "features.npy"
    np.save(path, planted_array(200, 32, signal_dim=8, nuisance=2.0, seed=0))
    (folder / "manifest.json").write_text("{}")
    return path


cli = script_cli(train)


@pytest.fixture(scope="module")
def small_features(tmp_path_factory):
    # 150 epochs as written, on a file small enough that they take a second or two.
    folder = tmp_path_factory.mktemp("small") / "planted"
    folder.mkdir()
    np.save(folder / "features.npy", planted_array(60, 16, signal_dim=4, nuisance=2.0, seed=0))
    (folder / "manifest.json").write_text("{}")
    return folder / "features.npy"


def test_paper_command_as_written(small_features, tmp_path):
    features = small_features
    runs = tmp_path / "RUNS"
    cmd = [sys.executable, "train.py", "-d", features, "--model", "original", "-s", runs, "-e", "150", "-r", "1",
           "-t", "15", "--test-split", "0.25", "-k", "1", "3", "5", "--gpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # see one_thread in test_adaptation_training
    proc = subprocess.run([str(c) for c in cmd], cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    if not torch.cuda.is_available():
        assert "CUDA is not available; training on the CPU" in proc.stderr
    assert "train.py: train.py:" not in proc.stderr  # each note carries the script's name once
    assert "Test/top 5" in proc.stdout
    run1 = runs / "run1"
    assert {p.name for p in runs.iterdir()} == {"run1", "summary.json"}
    assert any(p.name.startswith("events.out.tfevents") for p in run1.iterdir())

    config = json.loads((run1 / "config.json").read_text())
    assert config["data"] == str(features.resolve()) and Path(config["data"]).is_absolute()
    assert config["manifest"] == str(features.parent.resolve() / "manifest.json")
    assert (config["model"], config["in_dim"], config["epochs"], config["temperature"]) == ("original", 16, 150, 15.0)
    assert config["topk"] == [1, 3, 5] and config["n_test"] == 15 and config["n_train_flipped"] == 45

    metrics = json.loads((run1 / "metrics.json").read_text())["epochs"]
    assert len(metrics) == 150 and metrics[-1]["epoch"] == 150

    ckpt = torch.load(run1 / "model_and_optimizer.pt", weights_only=True)
    assert ckpt["epoch"] == 150 and ckpt["model_name"] == "original" and ckpt["in_dim"] == 16
    assert ckpt["config"] == config and len(ckpt["test_names"]) == 15 and ckpt["optimizer"]["state"]
    model, _ = load_checkpoint(run1 / "model_and_optimizer.pt")
    assert model(torch.zeros(1, 16)).shape == (1, 1024)

    summary = json.loads((runs / "summary.json").read_text())
    final = summary["final"]["Test/top 1"]
    assert final["mean"] == pytest.approx(metrics[-1]["Test/top 1"]) and final["std"] == 0.0


def test_tensorboard_tags_and_config_text(features, tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rc, out, _ = cli(["-d", features, "-s", tmp_path / "r", "-e", "3", "-r", "2", "-k", "1", "3", "--seed", "0"], capsys)
    assert rc == 0
    for sub in ("run1", "run2", "avg"):
        acc = EventAccumulator(str(tmp_path / "r" / sub)).Reload()
        tags = set(acc.Tags()["scalars"])
        for tag in ["Train/Loss", "Test/Loss", "Train/top 1", "Test/top 3", "Test/left2right top 1",
                    "Test/right2left top 3", "Test/MRR"]:
            assert tag in tags, (sub, tag)
        assert len(acc.Scalars("Test/top 1")) == 3
    acc = EventAccumulator(str(tmp_path / "r" / "run1")).Reload()
    assert any(t.startswith("config") for t in acc.Tags()["tensors"])
    runs = [json.loads((tmp_path / "r" / f"run{i}" / "metrics.json").read_text())["epochs"][-1] for i in (1, 2)]
    avg = EventAccumulator(str(tmp_path / "r" / "avg")).Reload().Scalars("Test/MRR")[-1].value
    assert avg == pytest.approx((runs[0]["Test/MRR"] + runs[1]["Test/MRR"]) / 2, rel=1e-6)
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())["final"]["Test/MRR"]
    assert summary["std"] == pytest.approx(float(np.std([r["Test/MRR"] for r in runs], ddof=1)))


def test_same_seed_same_metrics(features, tmp_path, capsys):
    argv = ["-d", features, "-e", "5", "--seed", "11", "-t", "15"]
    assert cli(argv + ["-s", tmp_path / "a"], capsys)[0] == 0
    assert cli(argv + ["-s", tmp_path / "b"], capsys)[0] == 0
    a, b = (json.loads((tmp_path / x / "run1" / "metrics.json").read_text()) for x in "ab")
    assert a["epochs"] == b["epochs"]
    ca, cb = (torch.load(tmp_path / x / "run1" / "model_and_optimizer.pt", weights_only=True) for x in "ab")
    assert ca["test_names"] == cb["test_names"]
    assert torch.equal(ca["state_dict"]["weight_matrix.weight"], cb["state_dict"]["weight_matrix.weight"])


def test_learns_above_dummy_and_paper_pickle_format(features, tmp_path, capsys):
    arr = np.load(features)
    order = np.argsort(arr["augmented"], kind="stable")  # the paper's code put originals first
    arr = arr[order]
    names = [("augmented_" + n) if a else n for n, a in zip(arr["name"], arr["augmented"])]
    seed_file = tmp_path / "embds.npy"
    np.save(seed_file, {"left": arr["left"], "right": arr["right"], "left_name": names, "right_name": names},
            allow_pickle=True)
    top1 = {}
    for model in ("dummy", "original"):
        out = tmp_path / model
        argv = ["-d", seed_file, "--allow-pickle", "--model", model, "-s", out, "-e", "40", "-t", "15",
                "--lr", "1e-2", "--seed", "0"]
        assert cli(argv, capsys)[0] == 0
        top1[model] = json.loads((out / "summary.json").read_text())["final"]["Test/top 1"]["mean"]
    assert top1["original"] > top1["dummy"] + 0.2
    ckpt = torch.load(tmp_path / "dummy" / "run1" / "model_and_optimizer.pt", weights_only=True)
    assert ckpt["optimizer"] is None and ckpt["state_dict"] == {}


def test_bf16_precision_runs(features, tmp_path, capsys):
    rc, _, _ = cli(["-d", features, "-s", tmp_path / "r", "-e", "3", "--precision", "bf16", "--seed", "0"], capsys)
    assert rc == 0
    assert json.loads((tmp_path / "r" / "run1" / "config.json").read_text())["precision"] == "bf16"


def test_save_to_not_empty_refused_then_overwrite(features, tmp_path, capsys):
    out = tmp_path / "r"
    assert cli(["-d", features, "-s", out, "-e", "2", "-r", "2", "--seed", "0"], capsys)[0] == 0
    (out / "notes.txt").write_text("mine")
    rc, _, err = cli(["-d", features, "-s", out, "-e", "2", "--seed", "1"], capsys)
    assert rc == 2 and "not empty" in err and "--overwrite" in err
    assert (out / "run2").is_dir()
    rc, _, _ = cli(["-d", features, "-s", out, "-e", "2", "--seed", "1", "--overwrite"], capsys)
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "run1", "summary.json"]
    assert json.loads((out / "run1" / "config.json").read_text())["seed"] == 1


def _write(path, content):
    path.write_text(content)
    return path


def _structured(fields, n=8):
    arr = np.zeros(n, dtype=fields)
    arr["name"] = [f"p{i}" for i in range(n)]
    return arr


BAD = {
    "missing file": (lambda d: d / "nope.npy", "cannot read"),
    "not numpy": (lambda d: _write(d / "x.npy", "text"), "not a .npy file"),
    "plain 2-D array": (lambda d: np.save(d / "x.npy", np.zeros((8, 4))) or d / "x.npy", "not pairs"),
    "1-D array": (lambda d: np.save(d / "x.npy", np.zeros(8)) or d / "x.npy", "not pairs"),
    "flat folder": (lambda d: np.save(d / "x.npy", _structured([("name", "U4"), ("augmented", "?"), ("feature", "<f4", (4,))])) or d / "x.npy", "flat image folder"),
    "missing field": (lambda d: np.save(d / "x.npy", _structured([("name", "U4"), ("augmented", "?"), ("left", "<f4", (4,))])) or d / "x.npy", "no field right"),
    "scalar vectors": (lambda d: np.save(d / "x.npy", _structured([("name", "U4"), ("augmented", "?"), ("left", "<f4"), ("right", "<f4")])) or d / "x.npy", "one vector per pair"),
    "dims differ": (lambda d: np.save(d / "x.npy", _structured([("name", "U4"), ("augmented", "?"), ("left", "<f4", (4,)), ("right", "<f4", (3,))])) or d / "x.npy", "dimensions"),
    "pickle without flag": (lambda d: np.save(d / "x.npy", {"left": 1}, allow_pickle=True) or d / "x.npy", "--allow-pickle"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_files(case, tmp_path, capsys):
    make, match = BAD[case]
    rc, out, err = cli(["-d", make(tmp_path), "-s", tmp_path / "out"], capsys)
    assert rc == 2 and match in err
    assert len(err.strip().splitlines()) == 1 and ": error: " in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_features(bad, tmp_path, capsys):
    arr = planted_array(20, 4)
    arr["left"][3, 0] = bad
    np.save(tmp_path / "f.npy", arr)
    rc, _, err = cli(["-d", tmp_path / "f.npy", "-s", tmp_path / "out"], capsys)
    assert rc == 2 and "NaN or inf" in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "extra,match",
    [
        (["--test-split", "0"], "strictly between"),
        (["--test-split", "1"], "strictly between"),
        (["--test-split", "0.005"], "at least 2"),
        (["-k", "1", "51"], "larger than the test set"),
    ],
)
def test_bad_split_settings(features, tmp_path, capsys, extra, match):
    rc, _, err = cli(["-d", features, "-s", tmp_path / "out"] + extra, capsys)
    assert rc == 2 and match in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_save_to_is_a_file(features, tmp_path, capsys):
    (tmp_path / "f").write_text("")
    rc, _, err = cli(["-d", features, "-s", tmp_path / "f"], capsys)
    assert rc == 2 and "not a folder" in err


@pytest.mark.parametrize("extra", [["-e", "0"], ["-k", "0"], ["-t", "-1"], ["--lr", "nan"], ["--model", "vgg"],
                                   ["--gpu", "--cpu"]])
def test_bad_flags_exit_2(features, tmp_path, extra):
    with pytest.raises(SystemExit) as exc:
        train.main(["-d", str(features), "-s", str(tmp_path / "o")] + extra)
    assert exc.value.code == 2 and not (tmp_path / "o").exists()


def test_import_has_no_side_effects():
    code = "import sys, train; assert 'tensorboard' not in sys.modules and 'torch.utils.tensorboard' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60, env={**os.environ})


def test_failed_overwrite_puts_earlier_runs_back(tmp_path, monkeypatch):
    import train as train_script
    from featuresExtractor.pairs_file import to_structured

    rng = np.random.default_rng(0)
    feats = tmp_path / "f.npy"
    np.save(feats, to_structured([f"p{i}" for i in range(16)], [False] * 16,
                                 rng.normal(size=(16, 8)).astype(np.float32), rng.normal(size=(16, 8)).astype(np.float32)))
    runs = tmp_path / "runs"
    args = ["-d", str(feats), "-s", str(runs), "-e", "1", "-k", "1", "--seed", "0", "--model", "dummy"]
    assert train_script.main(args) == 0
    before = (runs / "summary.json").read_bytes()

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr("adaptation.experiment.train", boom)
    with pytest.raises(KeyboardInterrupt):
        train_script.main(args + ["--overwrite"])
    assert (runs / "summary.json").read_bytes() == before and (runs / "run1" / "model_and_optimizer.pt").is_file()
    assert not (runs / ".replaced").exists()
    monkeypatch.undo()
    (runs / ".replaced").mkdir()
    from toolkit.utils import UserError

    with pytest.raises(UserError, match="set aside by an interrupted --overwrite"):
        train_script.main(args + ["--overwrite"])


def test_each_run_draws_its_own_split_unless_same_split(features, tmp_path, capsys):
    argv = ["-d", features, "-e", "2", "-r", "3", "--seed", "5", "--no-images"]
    assert cli(argv + ["-s", tmp_path / "a"], capsys)[0] == 0
    assert cli(argv + ["-s", tmp_path / "b"], capsys)[0] == 0
    assert cli(argv + ["-s", tmp_path / "c", "--same-split"], capsys)[0] == 0

    def splits(folder):
        ckpts = [torch.load(tmp_path / folder / f"run{i}" / "model_and_optimizer.pt", weights_only=True) for i in (1, 2, 3)]
        return [(c["test_names"], c["train_names"], c["config"]["split_seed"]) for c in ckpts]

    a, b, c = splits("a"), splits("b"), splits("c")
    assert a == b  # reproducible from --seed
    assert [s[2] for s in a] == [5, 6, 7] and len({tuple(s[0]) for s in a}) == 3
    for test, train_names, _ in a:
        assert not set(test) & set(train_names) and len(test) + len(train_names) == 200
    assert len({tuple(s[0]) for s in c}) == 1 and [s[2] for s in c] == [5, 5, 5]
    assert c[0][0] == a[0][0]  # run 1 splits the same way either way
    summary = json.loads((tmp_path / "c" / "summary.json").read_text())
    assert summary["config"]["same_split"] is True


def test_device_default_is_cuda_when_available(monkeypatch):
    from train import select_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    device, note = select_device(None)
    assert device.type == "cpu" and "CUDA is not available" in note and "--gpu" not in note
    assert select_device(False) == (torch.device("cpu"), None)
    device, note = select_device(True)
    assert device.type == "cpu" and "--gpu given" in note
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "Fake GPU")
    device, note = select_device(None)
    assert device.type == "cuda" and "Fake GPU" in note and "--cpu" in note
    assert select_device(False) == (torch.device("cpu"), None)
    assert train.parse_args(["-d", "f", "-s", "s"]).gpu is None
    assert train.parse_args(["-d", "f", "-s", "s", "--cpu"]).gpu is False


@pytest.mark.parametrize("temperature", ["1e39", "3e38"])
def test_non_finite_loss_stops_the_run_and_leaves_nothing(features, tmp_path, capsys, temperature):
    out = tmp_path / "out"
    rc, _, err = cli(["-d", features, "-s", out, "-e", "3", "-t", temperature, "--seed", "0", "--no-images"], capsys)
    assert rc == 2 and "training loss is" in err and "-t" in err
    assert err.strip().splitlines()[-1].startswith("train.py: error:") and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize("seed", ["-1", str(2**32), "1e3"])
def test_bad_seed_is_refused_by_the_parser(features, tmp_path, seed):
    with pytest.raises(SystemExit) as exc:
        train.main(["-d", str(features), "-s", str(tmp_path / "o"), "--seed", seed])
    assert exc.value.code == 2 and not (tmp_path / "o").exists()


def test_largest_seed_with_several_runs(features, tmp_path, capsys):
    rc, _, err = cli(["-d", features, "-s", tmp_path / "o", "-e", "1", "-r", "2", "--seed", str(2**32 - 1),
                      "--no-images"], capsys)
    assert rc == 0, err


def test_each_run_holds_out_validation_pairs_from_its_own_split(features, tmp_path, capsys):
    argv = ["-d", features, "-e", "1", "-r", "2", "--seed", "5", "--no-images", "--val-split", "0.2"]
    assert cli(argv + ["-s", tmp_path / "a"], capsys)[0] == 0
    assert cli(argv + ["-s", tmp_path / "c", "--same-split"], capsys)[0] == 0

    def names(folder):
        out = []
        for i in (1, 2):
            for name in ("model_and_optimizer.pt", "best.pt"):
                c = torch.load(tmp_path / folder / f"run{i}" / name, weights_only=True)
                out.append((set(c["train_names"]), set(c["val_names"]), set(c["test_names"])))
        return out

    a, c = names("a"), names("c")
    assert a[0] == a[1] and a[2] == a[3]  # best.pt and the last checkpoint record the same split
    assert a[0][1] != a[2][1] and a[0][2] != a[2][2]  # run 2: other test and validation pairs
    for train_names, val, test in a:
        assert len(val) == int(0.2 * 150) and not (train_names & val or train_names & test or val & test)
        assert len(train_names | val | test) == 200
    assert c[0] == c[2] == a[0]  # --same-split: run 1's split, validation pairs included, for every run
