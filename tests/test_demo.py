"""`make demo`'s driver end to end on the tiny backbone (the real one is what `make demo` runs)."""

from __future__ import annotations

import re

import numpy as np
import torch

import demo
from adaptation.split import split_data, split_indices
from featuresExtractor.pairs_file import load_pairs
from adaptation.models import build_model
from adaptation.selection import split_validation
from adaptation.training import TrainConfig, make_optimizer, train


def test_demo_runs_the_readme_pipeline_and_original_beats_dummy(tmp_path, capfd):
    out = tmp_path / "demo"
    code = demo.main(["--out", str(out), "--model", "tiny_rn", "--pairs", "96", "--pca", "32", "--epochs", "150"])
    stdout, stderr = capfd.readouterr()
    assert code == 0, stderr
    assert "RANDOMLY INITIALISED" in stdout  # the banner
    for command in ("$ python extract.py -d", "$ python train.py -d", "--model original", "--model cca", "--model dummy",
                    "--val-split 0.2", "$ python similarity.py --run", " pair ", " search "):
        assert command in stdout
    assert "What this shows" in stdout and "What it cannot show" in stdout
    assert re.search(r"^threshold +-?\d\.\d{4} \(max F1 on 14 validation pairs", stdout, re.M)
    assert re.search(r"^verdict +(alike|not alike)$", stdout, re.M)
    table = stdout[re.search(r"^model +top 1", stdout, re.M).start():].splitlines()
    rows = {line.split()[0]: [float(v) for v in line.split()[1:]] for line in table[1:5]}
    assert list(rows) == ["original", "original@val", "cca", "dummy"]
    assert re.search(r"^\(cca kept \d+ of 32 directions, k chosen on validation top-1\)$", stdout, re.M)
    assert all(0 <= v <= 100 for row in rows.values() for v in row)
    # The demo's own split: the trained adaptation ranks held-out partners better than raw features.
    assert rows["original"][0] > rows["dummy"][0] and rows["original"][3] > rows["dummy"][3]
    run = out / "runs" / "original" / "run1"
    assert (run / "model_and_optimizer.pt").is_file() and (run / "best.pt").is_file()
    assert (out / "search.html").is_file() and "tensorboard --logdir" in stdout
    assert sorted(p.name for p in (out / "gallery").iterdir()) == sorted(
        torch.load(run / "model_and_optimizer.pt", weights_only=True)["test_names"])

    # The margin is not one lucky split: over three splits of the demo's data, same recipe.
    pairs = load_pairs(out / "features" / "tiny_rn" / "features_pca32.npy")
    top1 = {"original": [], "dummy": []}
    for seed in range(3):
        train_idx, test_idx = split_indices(len(pairs), 0.25, seed)
        train_idx, val_idx = split_validation(train_idx, 0.2, seed)
        data = split_data(pairs, train_idx, test_idx, "cpu", val_idx)
        for name in top1:
            torch.manual_seed(seed)
            model = build_model(name, pairs.in_dim)
            cfg = TrainConfig(epochs=150, temperature=15.0, topk=(1,))
            top1[name].append(train(model, data, cfg, make_optimizer(model, cfg))[-1]["Test/top 1"])
    assert np.mean(top1["original"]) >= np.mean(top1["dummy"]) + 0.10, top1


def test_comparison_table_formats_percentages():
    summary = {"final": {"Test/top 1": {"mean": 0.5}, "Test/top 3": {"mean": 0.75}, "Test/top 5": {"mean": 1.0},
                         "Test/MRR": {"mean": 0.6}}}
    best = {"Test/top 1": {"mean": 0.25}, "Test/top 3": {"mean": 0.5}, "Test/top 5": {"mean": 0.5},
            "Test/MRR": {"mean": 0.4}}
    table = demo.comparison_table({"original": {**summary, "best_val": best}, "cca": {**summary, "best_val": summary},
                                   "dummy": summary}, (1, 3, 5))
    lines = table.splitlines()
    assert lines[1].split() == ["original", "50.00", "75.00", "100.00", "60.00"]
    assert lines[2].split() == ["original@val", "25.00", "50.00", "50.00", "40.00"]
    assert lines[3].split()[0] == "cca" and lines[4].split()[0] == "dummy" and len(lines) == 5
