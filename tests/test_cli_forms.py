"""Every command form of the paper's README and of its scripts' `-h`, run on a small fixture.

The paper's README writes:

    python extract.py -d PATH/TO/DATASET -s SAVE -b BATCH_SIZE --data-aug OR --no-data-aug --processor PROCESSOR
    python extract.py -d PATH/TO/DATASET -s SAVE -b 2048 --data-aug --processor adapt-pca 256
    python train.py -d EMBDS.NPY --model original -s RUNS -e NUM_EPOCHS -r NUM_RUNS -t TEMPERATURE
                    --test-split SPLITTING_PERCENTAGE -k TOPK_VALS --gpu
    python train.py -h

and its extract.py's `-h` reads `extract.py [-h] -d PATH -s DIR [-b N] [-p [PROCESSOR ...]] [--data-aug | --no-data-aug]`
with long forms `--data`, `--save-to`, `--batch-size`, `--processor`. The tiny random-init backbone
stands in for RN50x4 (the flags after the paper's are only those that choose it).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

import extract
import similarity
import train
from conftest import ROOT, TINY, make_pairs, planted_features
from toolkit.cli import run_cli


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    # 66 pairs, 2 sides, 2 flips: 264 rows, enough for the paper's 256 PCA components.
    root = tmp_path_factory.mktemp("paper") / "tll"
    make_pairs(root, 66)
    return root


EXTRACT_FORMS = {
    "readme, published recipe": ["-d", "{D}", "-s", "{S}", "-b", "2048", "--data-aug", "--processor", "adapt-pca", "256"],
    "readme, --no-data-aug": ["-d", "{D}", "-s", "{S}", "-b", "64", "--no-data-aug", "--processor", "adapt"],
    "-h long forms": ["--data", "{D}", "--save-to", "{S}", "--batch-size", "64", "--processor", "pca", "32",
                      "--data-aug"],
    "-h short forms, save": ["-d", "{D}", "-s", "{S}", "-b", "8", "-p", "save", "--no-data-aug"],
    "--dataset alias": ["--dataset", "{D}", "-s", "{S}", "-p", "adapt"],
}


@pytest.mark.parametrize("form", list(EXTRACT_FORMS))
def test_extract_forms_run(form, dataset, tmp_path, capsys):
    argv = [str(dataset) if a == "{D}" else str(tmp_path / "out") if a == "{S}" else a for a in EXTRACT_FORMS[form]]
    code = run_cli(extract.main, argv + TINY)
    _, err = capsys.readouterr()
    assert code == 0, err
    manifest = json.loads((tmp_path / "out" / "tiny_rn" / "manifest.json").read_text())
    assert manifest["augmentation"]["hflip"] is ("--data-aug" in argv)
    assert manifest["processor"]["name"] == argv[argv.index("-p" if "-p" in argv else "--processor") + 1]
    assert manifest["counts"]["items_kept"] == 66


def test_data_aug_flags_exclude_each_other_and_default_off():
    base = ["-d", "x", "-s", "y"]
    assert extract.parse_args(base).data_aug is False
    assert extract.parse_args(base + ["--no-data-aug"]).data_aug is False
    assert extract.parse_args(base + ["--data-aug"]).data_aug is True
    with pytest.raises(SystemExit):
        extract.parse_args(base + ["--data-aug", "--no-data-aug"])


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    return planted_features(tmp_path_factory.mktemp("feats") / "features.npy", 60)


TRAIN_FORMS = {
    "readme, published recipe": ["-d", "{F}", "--model", "original", "-s", "{S}", "-e", "150", "-r", "1", "-t", "15",
                                 "--test-split", "0.25", "-k", "1", "3", "5", "--gpu"],
    "readme, general form, 2 runs": ["-d", "{F}", "--model", "original", "-s", "{S}", "-e", "3", "-r", "2", "-t", "15",
                                     "--test-split", "0.25", "-k", "1", "3", "--gpu"],
    "-h long forms, --cpu": ["--data", "{F}", "--model", "peterson", "--save-to", "{S}", "--epochs", "3", "--runs", "2",
                             "--temperature", "15", "--test-split", "0.3", "--topk", "1", "5", "--cpu"],
}


@pytest.mark.parametrize("form", list(TRAIN_FORMS))
def test_train_forms_run(form, features, tmp_path, capsys):
    argv = [str(features) if a == "{F}" else str(tmp_path / "runs") if a == "{S}" else a for a in TRAIN_FORMS[form]]
    code = run_cli(train.main, argv + ["--seed", "0", "--no-images"])
    _, err = capsys.readouterr()
    assert code == 0, err
    summary = json.loads((tmp_path / "runs" / "summary.json").read_text())
    runs = int(argv[argv.index("-r" if "-r" in argv else "--runs") + 1])
    assert summary["config"]["runs"] == runs and len(summary["final"]["Test/top 1"]["values"]) == runs


def _parsers():
    """Every parser of the three scripts, subcommands (and theirs) included."""
    found = [script.build_parser() for script in (extract, train, similarity)]
    for p in found:  # grows while it is walked: nested subcommands are visited too
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                found.extend(action.choices.values())
    return found


def test_no_long_option_is_taken_by_prefix():
    parsers = _parsers()
    assert {p.prog for p in parsers} >= {"extract.py", "train.py", "similarity.py", "similarity.py pair",
                                        "similarity.py search"}
    for p in parsers:
        assert p.allow_abbrev is False, p.prog
        # With abbreviations off a long option matches only itself, so no flag can be an
        # ambiguous prefix of another (argparse looks up the exact string first).
        longs = [o for a in p._actions for o in a.option_strings if o.startswith("--")]
        assert len(longs) == len(set(longs)), p.prog


def test_data_is_not_ambiguous():
    args = extract.parse_args(["--data", "D", "--save-to", "S"])
    assert args.dataset == "D" and args.save_to == "S"
    with pytest.raises(SystemExit):
        extract.parse_args(["--dat", "D", "-s", "S"])


@pytest.mark.parametrize("argv", [["extract.py", "-h"], ["train.py", "-h"], ["similarity.py", "-h"],
                                  ["similarity.py", "--run", "x", "pair", "-h"],
                                  ["similarity.py", "--run", "x", "search", "-h"]])
def test_help_runs(argv):
    proc = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: ")
    if argv[0] == "extract.py":
        assert "-d PATH, --data PATH, --dataset PATH" in proc.stdout and "--no-data-aug" in proc.stdout
    if argv[0] == "train.py":
        for flag in ("--gpu", "--cpu", "--same-split", "--seed", "--test-split", "--temperature", "--topk"):
            assert flag in proc.stdout, flag
