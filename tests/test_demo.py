"""`make demo`'s driver end to end on the tiny backbone (the real one is what `make demo` runs)."""

from __future__ import annotations

from pathlib import Path

import demo


def test_demo_runs_the_readme_pipeline_and_prints_the_comparison(tmp_path, capfd):
    out = tmp_path / "demo"
    code = demo.main(["--out", str(out), "--model", "tiny_rn", "--pairs", "24", "--pca", "16", "--epochs", "3"])
    stdout, stderr = capfd.readouterr()
    assert code == 0, stderr
    assert "RANDOMLY INITIALISED" in stdout  # the banner
    for command in ("$ python extract.py -d", "$ python train.py -d", "--model original", "--model dummy",
                    "$ python similarity.py --run"):
        assert command in stdout
    table = stdout[stdout.index("model         top 1"):].splitlines()
    assert table[1].split()[0] == "original" and table[2].split()[0] == "dummy"
    assert all(0 <= float(v) <= 100 for row in table[1:3] for v in row.split()[1:])
    assert (out / "runs" / "original" / "run1" / "model_and_optimizer.pt").is_file()
    assert (out / "search.html").is_file() and "tensorboard --logdir" in stdout


def test_comparison_table_formats_percentages():
    summary = {"final": {"Test/top 1": {"mean": 0.5}, "Test/top 3": {"mean": 0.75}, "Test/top 5": {"mean": 1.0},
                         "Test/MRR": {"mean": 0.6}}}
    table = demo.comparison_table({"original": summary}, (1, 3, 5))
    assert table.splitlines()[1].split() == ["original", "50.00", "75.00", "100.00", "60.00"]
