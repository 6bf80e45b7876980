"""train.py --subset FILE: train and test on the pairs a subset file names (the paper's TLL_obj.csv format)."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch

import train
from conftest import planted_features, script_cli
from featuresExtractor.pairs_file import load_pairs


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    return planted_features(tmp_path_factory.mktemp("subset") / "features.npy", 60)


cli = script_cli(train)


def paper_csv(path, names):
    """The published TLL_obj.csv's form: a header line, then `index,name` rows, each name listed twice."""
    rows = [f"{i},{name}" for i, name in enumerate(n for name in names for n in (name, name))]
    path.write_text("index,name\n" + "\n".join(rows) + "\n")
    return path


def test_a_subset_in_the_papers_format_keeps_its_pairs_only(features, tmp_path, capsys):
    names = load_pairs(features).names
    kept = sorted(names)[:40]
    subset = paper_csv(tmp_path / "TLL_obj.csv", [n.removesuffix(".jpg") for n in kept] + ["ghost1", "ghost2"])
    code, out, err = cli(["-d", features, "-s", tmp_path / "r", "-e", "2", "--seed", "0", "--no-images",
                          "--subset", subset, "-k", "1"], capsys)
    assert code == 0, err
    assert "on 40 of 60 pairs (subset TLL_obj.csv) of 16-d features (30 train, 10 test" in err
    missing = [ln for ln in err.splitlines() if "not in" in ln]
    assert missing == [f"train.py: 2 name(s) in subset file {subset} are not in {features.resolve()}: ghost1, ghost2"]
    assert out.startswith("on 40 of 60 pairs (subset ")
    config = json.loads((tmp_path / "r" / "run1" / "config.json").read_text())
    assert config["subset"] == {"file": str(subset.resolve()), "count": 42, "kept": 40, "of": 60,
                                "sha256": hashlib.sha256(subset.read_bytes()).hexdigest()}
    assert config["n_pairs"] == 40
    ckpt = torch.load(tmp_path / "r" / "run1" / "model_and_optimizer.pt", weights_only=True)
    assert sorted(ckpt["train_names"] + ckpt["test_names"]) == kept


def test_plain_and_name_column_subsets_keep_the_same_pairs(features, tmp_path, capsys):
    names = sorted(load_pairs(features).names)[:20]
    (tmp_path / "plain.txt").write_text("\n".join(names) + "\n")
    (tmp_path / "cols.csv").write_text("group,name\n" + "\n".join(f"g,{n}" for n in names) + "\n")
    seen = []
    for f in ("plain.txt", "cols.csv"):
        code, _, err = cli(["-d", features, "-s", tmp_path / f"r_{f}", "-e", "1", "--seed", "0", "--no-images",
                            "--subset", tmp_path / f, "-k", "1"], capsys)
        assert code == 0, err
        ckpt = torch.load(tmp_path / f"r_{f}" / "run1" / "model_and_optimizer.pt", weights_only=True)
        seen.append(sorted(ckpt["train_names"] + ckpt["test_names"]))
    assert seen[0] == seen[1] == names


@pytest.mark.parametrize("content,message", [
    (b"", "is empty"),
    (b"\x00\x01\x02binary", "is binary"),
    (b"name\n\xff\xfe caf\xe9\n", "is not UTF-8 text"),
    (b"pair00001.jpg\npair00002.jpg\n", "keeps 2 of 60 pairs, too few to split"),
    (b"nobody\n", "names none of the 60 pairs"),
])
def test_bad_subsets_are_one_line(features, tmp_path, capsys, content, message):
    (tmp_path / "s.txt").write_bytes(content)
    code, out, err = cli(["-d", features, "-s", tmp_path / "r", "-e", "1", "--subset", tmp_path / "s.txt"], capsys)
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("train.py: error: ") and message in lines[0], err
    assert not (tmp_path / "r").exists()


def test_a_fifo_subset_is_refused_without_blocking(features, tmp_path, capsys):
    os.mkfifo(tmp_path / "fifo")
    code, _, err = cli(["-d", features, "-s", tmp_path / "r", "-e", "1", "--subset", tmp_path / "fifo"], capsys)
    assert code == 2 and "not a regular file" in err and len(err.strip().splitlines()) == 1
