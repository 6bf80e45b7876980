"""Hostile inputs to similarity.py and the formats it reads: each is one line, exit 2, nothing written."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil

import numpy as np
import pytest
import torch

from retrieval import index as ixf
from retrieval import index_folder as ixd
from adaptation.calibration import Threshold
from adaptation.checkpoint import CHECKPOINT, load_checkpoint
from test_index import cli, one_error_line
from test_similarity import run  # noqa: F401  (the module-scoped tiny run fixture)
from toolkit.utils import UserError


@pytest.fixture()
def flat_index(tmp_path):
    x = ixf.normalise(np.random.default_rng(0).normal(size=(5, 4)))
    ix = ixf.build(x, [f"v{i}" for i in range(5)], [None] * 5, ixf.IndexParams("flat"), identity={})
    return ixd.write(ix, tmp_path / "ix")


def _edit_manifest(path, change):
    m = json.loads((path / "manifest.json").read_text())
    change(m)
    (path / "manifest.json").write_text(json.dumps(m))


def _bad_names(m, path):
    (path / "names.json").write_text(json.dumps([1, 2, 3, 4, 5]))
    m["files"]["names.json"] = hashlib.sha256((path / "names.json").read_bytes()).hexdigest()  # a consistent forgery


MANIFEST_DAMAGE = {
    "files is a list": (lambda m, p: m.update(files=[]), "files is []"),
    "files is text": (lambda m, p: m.update(files="x"), "files is 'x'"),
    "no dim": (lambda m, p: m.pop("dim"), "dim is None"),
    "count is a bool": (lambda m, p: m.update(count=True), "count is True"),
    "unknown kind": (lambda m, p: m.update(kind="weird"), "kind is 'weird'"),
    "kind lies about the index": (lambda m, p: m.update(kind="hnsw", params={"hnsw_m": 3, "ef_construction": 3,
                                                                          "ef_search": 3}), "not an inner-product hnsw"),
    "hnsw without its params": (lambda m, p: m.update(kind="hnsw"), "params is {}"),
    "no params": (lambda m, p: m.pop("params"), "params is None"),
    "identity is a list": (lambda m, p: m.update(identity=[]), "identity is []"),
    "names of the wrong shape": (_bad_names, "names.json is damaged"),
}


@pytest.mark.parametrize("damage", MANIFEST_DAMAGE, ids=list(MANIFEST_DAMAGE))
def test_index_of_the_wrong_shape_is_refused_where_it_is_read(flat_index, damage):
    change, said = MANIFEST_DAMAGE[damage]
    assert len(ixd.read(flat_index)) == 5  # intact, it reads
    _edit_manifest(flat_index, lambda m: change(m, flat_index))
    with pytest.raises(UserError, match="rebuild the index") as err:
        ixd.read(flat_index)
    assert said in str(err.value)


def test_damaged_manifest_through_the_cli_is_one_line(run, flat_index, capsys):  # noqa: F811
    _edit_manifest(flat_index, lambda m: m.update(files=[]))
    query = next(run["gallery"].iterdir())
    code, _, err = cli(["--run", str(run["run"]), "search", str(query), "--index", str(flat_index), "-k", "2"], capsys)
    assert code == 2 and "files is []" in one_error_line(err)


THRESHOLD = {"max_f1": 0.6, "f1": 0.8, "precision": 0.9, "recall": 0.7, "at_precision": 0.7,
             "recall_at_precision": 0.5, "target_precision": 0.95, "n_pairs": 10}
BAD_THRESHOLDS = {
    "not a dict": "x",
    "None": None,
    "missing keys": {"max_f1": 0.5},
    "text number": dict(THRESHOLD, max_f1="0.5"),
    "NaN": dict(THRESHOLD, max_f1=float("nan")),
    "out of range": dict(THRESHOLD, max_f1=7.0),
    "rate above 1": dict(THRESHOLD, precision=1.5),
    "no pair count": dict(THRESHOLD, n_pairs=None),
    "half of the precision threshold": dict(THRESHOLD, at_precision=None),
}


def test_threshold_from_dict_checks_every_entry():
    assert Threshold.from_dict(THRESHOLD).to_dict() == THRESHOLD
    assert Threshold.from_dict(dict(THRESHOLD, at_precision=None, recall_at_precision=None)).at_precision is None
    assert Threshold.from_dict(dict(THRESHOLD, max_f1=np.float32(0.5), n_pairs=np.int64(3))).n_pairs == 3
    for name, bad in BAD_THRESHOLDS.items():
        with pytest.raises(ValueError):
            Threshold.from_dict(bad)
            pytest.fail(name)


@pytest.mark.parametrize("entry", ["threshold", "val_names"])
def test_checkpoint_with_a_damaged_threshold_or_val_names_is_refused(run, tmp_path, capsys, entry):  # noqa: F811
    bad = tmp_path / "run"
    shutil.copytree(run["run"], bad)
    ckpt = torch.load(bad / CHECKPOINT, weights_only=True)
    ckpt[entry] = dict(THRESHOLD, max_f1=float("nan")) if entry == "threshold" else 5
    torch.save(ckpt, bad / CHECKPOINT)
    with pytest.raises(UserError, match=f"is damaged: .*{'threshold' if entry == 'threshold' else 'val_names'}"):
        load_checkpoint(bad / CHECKPOINT)
    images = sorted(run["gallery"].iterdir())
    code, out, err = cli(["--run", str(bad), "pair", str(images[0]), str(images[1])], capsys)
    assert code == 2 and "is damaged" in one_error_line(err) and out == ""


@pytest.mark.parametrize("value", ["nan", "inf", "1.5", "-2"])
def test_pairs_threshold_outside_the_cosine_range_is_refused(run, flat_index, tmp_path, capsys, value):  # noqa: F811
    code, _, err = cli(["--run", str(run["run"]), "pairs", "--index", str(flat_index), "--threshold", value,
                        "-o", str(tmp_path / "p")], capsys)
    assert code == 2 and "between -1 and 1" in one_error_line(err)
    assert not list(tmp_path.glob("p.*"))


def test_query_folder_with_a_name_that_is_not_utf8_writes_nothing(run, tmp_path, capsys):  # noqa: F811
    folder = tmp_path / "q"
    folder.mkdir()
    src = sorted(run["gallery"].iterdir())
    shutil.copy(src[0], folder / "ok.png")
    shutil.copy(src[1], os.fsdecode(bytes(folder) + b"/n\xffm.png"))
    outs = [tmp_path / "o.json", tmp_path / "o.csv", tmp_path / "o.html"]
    code, _, err = cli(["--run", str(run["run"]), "search", str(folder), "--gallery", str(run["gallery"]), "-k", "2",
                        "--json", str(outs[0]), "--csv", str(outs[1]), "--html", str(outs[2])], capsys)
    assert code == 2 and "not valid UTF-8" in one_error_line(err)
    assert not any(o.exists() for o in outs)


def test_add_to_a_folder_that_is_no_index_leaves_no_lock_file(run, tmp_path, capsys):  # noqa: F811
    code, _, err = cli(["--run", str(run["run"]), "index", "add", str(tmp_path / "nothere"), str(run["gallery"]),
                        "--no-progress"], capsys)
    assert code == 2 and "is not an index folder" in one_error_line(err)
    assert sorted(os.listdir(tmp_path)) == []


def test_several_unreadable_queries_are_one_error_line(run, tmp_path, capsys):  # noqa: F811
    # Before: one "similarity.py: error:" line per unreadable query.
    good = sorted(run["gallery"].iterdir())[0]
    bad = [tmp_path / f"bad{i}.jpg" for i in range(5)]
    bad[0].write_bytes(b"")
    for b in bad[1:]:
        b.write_text("not an image")
    code, out, err = cli(["--run", str(run["run"]), "search", str(good), *map(str, bad), "--gallery",
                          str(run["gallery"]), "-k", "2", "--json", str(tmp_path / "r.json")], capsys)
    line = one_error_line(err)
    assert code == 2 and line.startswith("similarity.py: error: cannot read 5 of 6 queries: ")
    assert "bad0.jpg: empty file (0 bytes)" in line and line.endswith("; and 2 more")
    written = json.loads((tmp_path / "r.json").read_text())  # the readable query is answered, the others say why
    assert [h["error"] is None for h in written] == [True] + [False] * 5
    code, _, err = cli(["--run", str(run["run"]), "search", str(bad[0]), "--gallery", str(run["gallery"]), "-k", "2"],
                       capsys)
    assert code == 2
    assert one_error_line(err) == f"similarity.py: error: cannot read query {bad[0]}: empty file (0 bytes)"


def test_output_written_by_another_run_meanwhile_is_never_overwritten(run, tmp_path, capsys, monkeypatch):  # noqa: F811
    # Before: the "already exists" check ran before the model loaded and the write renamed over whatever
    # was there by then, so two searches started together into one --json both said "wrote" and exit 0,
    # the later one replacing the other's results without --overwrite.
    from retrieval.visual_similarity import VisualSimilarity

    out = tmp_path / "r.json"
    real = VisualSimilarity.search

    def other_run_writes_first(self, *a, **k):
        out.write_text("[]\n")  # the other run's results (no query answered)
        return real(self, *a, **k)

    monkeypatch.setattr(VisualSimilarity, "search", other_run_writes_first)
    good = sorted(run["gallery"].iterdir())[0]
    code, _, err = cli(["--run", str(run["run"]), "search", str(good), "--gallery", str(run["gallery"]), "-k", "2",
                        "--json", str(out)], capsys)
    assert code == 2 and "r.json appeared while this run was working" in one_error_line(err)
    assert out.read_text() == "[]\n" and os.listdir(tmp_path) == ["r.json"]
    code, _, _ = cli(["--run", str(run["run"]), "search", str(good), "--gallery", str(run["gallery"]), "-k", "2",
                      "--json", str(out), "--overwrite"], capsys)
    assert code == 0 and json.loads(out.read_text())[0]["query"] == str(good)


def test_write_pairs_without_overwrite_never_replaces(tmp_path):
    from retrieval.results import read_pairs, write_pairs

    rows = [("a", "b", 0.5, None, None)]
    write_pairs(rows, tmp_path / "p.csv", overwrite=False)
    assert read_pairs(tmp_path / "p.csv") == rows
    with pytest.raises(UserError, match="appeared while this run was working"):
        write_pairs([("c", "d", 0.1, None, None)], tmp_path / "p.csv", overwrite=False)
    assert read_pairs(tmp_path / "p.csv") == rows and os.listdir(tmp_path) == ["p.csv"]  # no temporary file left


def test_outputs_are_all_written_or_none_changed(run, tmp_path, capsys, monkeypatch):  # noqa: F811
    # Before: --json, --csv and --html (and pairs' OUT.csv and OUT.html) were put in place one after the
    # other, so a full disk at the HTML page left the new JSON beside the previous run's CSV and page.
    import errno
    from pathlib import Path

    good = sorted(run["gallery"].iterdir())
    outs = [tmp_path / "o.json", tmp_path / "o.csv", tmp_path / "o.html"]
    argv = ["--run", str(run["run"]), "search", "--gallery", str(run["gallery"]), "-k", "2", "--overwrite",
            "--json", str(outs[0]), "--csv", str(outs[1]), "--html", str(outs[2])]
    assert cli(argv[:3] + [str(good[0])] + argv[3:], capsys)[0] == 0
    before = {o: o.read_bytes() for o in outs}
    real = Path.write_text

    def full_at_the_page(self, *a, **k):
        if self.name.startswith(".o.html."):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "write_text", full_at_the_page)
    code, _, err = cli(argv[:3] + [str(good[1])] + argv[3:], capsys)
    assert code == 2 and "o.html" in one_error_line(err) and "No space left on device" in err
    assert {o: o.read_bytes() for o in outs} == before and sorted(os.listdir(tmp_path)) == ["o.csv", "o.html",
                                                                                             "o.json"]


def test_write_texts_without_overwrite_takes_back_what_it_placed(tmp_path):
    from retrieval.results import write_texts

    (tmp_path / "b.html").write_text("another run's page")
    with pytest.raises(UserError, match="b.html appeared while this run was working"):
        write_texts({tmp_path / "a.csv": "x", tmp_path / "b.html": "y"}, overwrite=False)
    assert os.listdir(tmp_path) == ["b.html"] and (tmp_path / "b.html").read_text() == "another run's page"


def _first_weight_nan(ckpt):
    name = next(iter(ckpt["state_dict"]))
    ckpt["state_dict"][name] = torch.full_like(ckpt["state_dict"][name], float("nan"))


WEIGHT_DAMAGE = {  # before: a ValueError traceback, a 32 TB allocation failing with a traceback, NaN scores
    "out_dim not a number": (lambda c: c["model_kwargs"].update(out_dim="x"), "cannot build model 'original'"),
    "out_dim huge": (lambda c: c["model_kwargs"].update(out_dim=10 ** 12), "the model wants (1000000000000, 8)"),
    "NaN weights": (_first_weight_nan, "holds NaN or infinite values"),
    "a weight that is no tensor": (lambda c: c["state_dict"].update({next(iter(c["state_dict"])): "x"}),
                                   "the file holds str"),
    "a newer format": (lambda c: c.update(format_version=99), "has checkpoint format 99, which this toolkit cannot read"),
    "a format that is no number": (lambda c: c.update(format_version="1"), "has checkpoint format '1'"),
    "provenance that is no sha256": (lambda c: c["provenance"].update(features_sha256="x"),
                                     "is damaged: provenance is not"),
    "a PCA outside the features folder": (lambda c: c["provenance"]["pca_sha256"].update({"../p.npz": "0" * 64}),
                                          "is damaged: provenance is not"),
}


@pytest.mark.parametrize("damage", WEIGHT_DAMAGE, ids=list(WEIGHT_DAMAGE))
def test_checkpoint_whose_model_or_weights_are_damaged_is_one_line(run, tmp_path, capsys, damage):  # noqa: F811
    change, said = WEIGHT_DAMAGE[damage]
    bad = tmp_path / "run"
    shutil.copytree(run["run"], bad)
    ckpt = torch.load(bad / CHECKPOINT, weights_only=True)
    change(ckpt)
    torch.save(ckpt, bad / CHECKPOINT)
    with pytest.raises(UserError, match=re.escape(said)):
        load_checkpoint(bad / CHECKPOINT)
    images = sorted(run["gallery"].iterdir())
    code, out, err = cli(["--run", str(bad), "pair", str(images[0]), str(images[1])], capsys)
    assert code == 2 and said in one_error_line(err) and out == ""


def test_pair_with_a_fifo_or_a_folder_says_what_it_is(run, tmp_path, capsys):  # noqa: F811
    fifo = tmp_path / "q.jpg"
    os.mkfifo(fifo)
    image = sorted(run["gallery"].iterdir())[0]
    for bad, said in [(fifo, "is not a regular file (a FIFO"), (tmp_path, "is a folder"),
                      (tmp_path / "none.jpg", "does not exist")]:
        code, out, err = cli(["--run", str(run["run"]), "pair", str(bad), str(image)], capsys)
        assert code == 2 and said in one_error_line(err) and out == "", err


def test_written_here_tells_this_toolkits_outputs_from_a_users_files(tmp_path):
    from retrieval.pages import GENERATOR, pairs_page, search_page
    from retrieval.results import pairs_text, search_results_text, written_here
    from retrieval.visual_similarity import Hits, Match

    hits = [Hits("q.jpg", None, [Match("a.jpg", 0.5, None)])]
    ours = {"r.json": search_results_text(hits, "r.json"), "r.csv": search_results_text(hits, "r.csv"),
            "p.csv": pairs_text([("a", "b", 0.5, None, None)]), "s.html": search_page(hits),
            "p.html": pairs_page([("a", "b", 0.5, None, None)]), "none.json": "[]\n",
            "old.html": search_page(hits).replace(GENERATOR, "")}  # a page of an earlier version
    theirs = {"notes.json": '{"mine": 1}', "list.json": '[{"query": "x"}]', "data.csv": "a,b\n1,2\n",
              "page.html": "<html><head><title>mine</title></head></html>", "bad.json": "{not json",
              "blank.csv": ""}
    for name, text in {**ours, **theirs}.items():
        (tmp_path / name).write_text(text)
        assert written_here(tmp_path / name) == (name in ours), name
    assert not written_here(tmp_path / "missing.json")


@pytest.mark.parametrize("flag, name, text", [("--json", "notes.json", '{"mine": 1}\n'),
                                              ("--csv", "data.csv", "a,b\n1,2\n"),
                                              ("--html", "page.html", "<html><body>mine</body></html>\n")])
def test_overwrite_never_replaces_a_users_file(run, tmp_path, capsys, flag, name, text):  # noqa: F811
    mine = tmp_path / name
    mine.write_text(text)
    good = sorted(run["gallery"].iterdir())[0]
    code, _, err = cli(["--run", str(run["run"]), "search", str(good), "--gallery", str(run["gallery"]), "-k", "2",
                        flag, str(mine), "--overwrite"], capsys)
    line = one_error_line(err)
    assert code == 2 and f"{flag} {mine} exists and is not a file this command wrote" in line, err
    assert mine.read_text() == text and os.listdir(tmp_path) == [name]


def test_pairs_overwrite_never_replaces_a_users_csv(run, tmp_path, capsys):  # noqa: F811
    mine = tmp_path / "out.csv"
    mine.write_text("my,own\n")
    index = tmp_path / "idx"
    assert cli(["--run", str(run["run"]), "index", "build", str(run["gallery"]), "-o", str(index)], capsys)[0] == 0
    code, _, err = cli(["--run", str(run["run"]), "pairs", "--index", str(index), "--top", "3", "-o",
                        str(tmp_path / "out"), "--overwrite"], capsys)
    assert code == 2 and "is not a file this command wrote" in one_error_line(err)
    assert mine.read_text() == "my,own\n" and not (tmp_path / "out.html").exists()
