"""index build --target-recall and the ivf kind (issue 33): the chosen setting is the smallest reaching the goal."""

from __future__ import annotations

import json

import numpy as np
import pytest

from test_index import clustered, big_gallery, cli, one_error_line, sim  # noqa: F401  (module fixtures)
from test_similarity import run  # noqa: F401  (the module-scoped tiny run fixture)

from retrieval import index as ixf
from retrieval import index_folder as ixd
from retrieval.index import IndexParams
from toolkit.utils import UserError


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_target_recall_keeps_the_smallest_setting_that_reaches_it(kind, tmp_path):
    x, q = clustered(n=4000, dim=64, clusters=40)
    names = [f"v{i}" for i in range(len(x))]
    params = IndexParams(kind, hnsw_m=8, ef_construction=40, nlist=64 if kind == "ivf" else 0, target_recall=0.99)
    ix = ixf.build(x, names, [None] * len(x), params, identity={})
    tuned = ix.manifest["tuned"]
    param = "ef_search" if kind == "hnsw" else "nprobe"
    assert tuned["param"] == param and tuned["reached"] and tuned["recall"] >= 0.99 and tuned["queries"] == 400
    assert ix.manifest["params"][param] == tuned["value"] and len(ix) == len(x) and sorted(ix.names) == sorted(names)
    # the choice, redone on an index of the other rows: the value below it misses the target, it reaches it
    held = ixf.tune_queries(len(x), np.random.default_rng(0))
    rest = np.setdiff1d(np.arange(len(x)), held)
    base = ixf.build(x[rest], [names[i] for i in rest], [None] * len(rest), IndexParams(
        kind, hnsw_m=8, ef_construction=40, nlist=params.nlist), identity={})
    again = ixf.tune(base, x[rest], x[held], 0.99)
    truth = np.argsort(-(x[held] @ x[rest].T), axis=1, kind="stable")[:, :10]
    below = [v for v in (ixf.EF_GRID if kind == "hnsw" else ixf.NPROBE_GRID) if v < again["value"]]
    assert below, "this gallery is too easy: the first setting reaches the target, so nothing below it is tested"
    for value, reaches in ((below[-1], False), (again["value"], True)):
        base.set_search(**{param: value})
        recall = ixf.recall_at(base.search(x[held], 10)[1], truth)
        assert (recall >= 0.99) == reaches, (value, recall)
    assert again["recall"] == pytest.approx(recall)
    position = {n: i for i, n in enumerate(ix.names)}
    rest_ids = np.array([position[f"v{i}"] for i in range(len(x))])  # gallery row -> index id
    # fresh queries: the promise holds beyond the sample it was measured on (with some slack)
    ix.set_search(**{param: tuned["value"]})
    exact = np.argsort(-(q @ x.T), axis=1)[:, :10]
    assert ixf.recall_at(ix.search(q, 10)[1], rest_ids[exact]) >= 0.9
    ixd.write(ix, tmp_path / "ix")
    back = ixd.read(tmp_path / "ix")
    assert back.manifest["tuned"] == tuned and back.manifest["params"][param] == tuned["value"]


def test_an_ivf_index_is_exact_in_its_scores_and_round_trips_with_nprobe_override(tmp_path):
    x, q = clustered(n=3000, dim=64, clusters=30)
    names = [f"v{i}" for i in range(len(x))]
    ix = ixf.build(x, names, [None] * len(x), IndexParams("ivf", nlist=32, nprobe=32), identity={})
    scores, ids = ix.search(q, 5)
    np.testing.assert_array_equal(ids, np.argsort(-(q @ x.T), axis=1, kind="stable")[:, :5])  # all lists: exact
    np.testing.assert_allclose(scores, np.sort(q @ x.T, axis=1)[:, ::-1][:, :5], atol=1e-5)
    ix.set_search(nprobe=1)
    ixd.write(ix, tmp_path / "ix")
    back = ixd.read(tmp_path / "ix")
    assert back.manifest["params"] == {"nlist": 32, "nprobe": 1}
    back.set_search(nprobe=500)  # capped at nlist
    assert back.manifest["params"]["nprobe"] == 32
    np.testing.assert_array_equal(back.search(q, 5)[1], ids)


@pytest.mark.parametrize("value", ["0", "1.5", "-0.2", "nan"])
def test_a_target_recall_outside_0_1_is_one_line(run, big_gallery, tmp_path, capsys, value):  # noqa: F811
    code, _, err = cli(["--run", str(run["run"]), "index", "build", str(big_gallery), "-o", str(tmp_path / "ix"),
                        "--kind", "hnsw", "--target-recall", value], capsys)
    assert code == 2 and "--target-recall must be a recall in (0, 1]" in one_error_line(err)
    assert not list(tmp_path.iterdir())


def test_cli_target_recall_prints_and_records_the_choice_and_refuses_a_small_ivf(run, sim, big_gallery, tmp_path,  # noqa: F811
                                                                                 capsys):
    code, out, err = cli(["--run", str(run["run"]), "index", "build", str(big_gallery), "-o", str(tmp_path / "ix"),
                          "--kind", "hnsw", "--target-recall", "0.9", "--no-progress"], capsys)
    assert code == 0, err
    manifest = json.loads((tmp_path / "ix" / "manifest.json").read_text())
    tuned = manifest["tuned"]
    assert f"ef_search {tuned['value']}: recall@{tuned['k']} {tuned['recall']:.4f}" in out
    assert tuned["queries"] == 2 and manifest["params"]["ef_search"] == tuned["value"]
    index = sim.load_index(tmp_path / "ix", ef_search=300)  # search --ef-search still overrides
    assert index.manifest["params"]["ef_search"] == 300
    code, _, err = cli(["--run", str(run["run"]), "search", str(big_gallery / "g1.png"), "--index",
                        str(tmp_path / "ix"), "--ef-search", "300", "-k", "2"], capsys)
    assert code == 0, err
    for extra, says in ((["--kind", "ivf"], "an ivf index needs at least 624 vectors"),
                        (["--kind", "flat", "--target-recall", "0.9"], "a flat index is exact")):
        code, _, err = cli(["--run", str(run["run"]), "index", "build", str(big_gallery), "-o", str(tmp_path / "x"),
                            *extra], capsys)
        assert code == 2 and says in one_error_line(err) and not (tmp_path / "x").exists(), err
    with pytest.raises(UserError, match="at least 10"):
        ixf.build(ixf.normalise(np.eye(4, 8)), list("abcd"), [None] * 4, IndexParams("hnsw", target_recall=0.5), {})


def test_an_unreachable_target_keeps_the_best_setting_tried_and_stops_once_recall_stalls():
    x, _ = clustered(n=4000, dim=64, clusters=40)
    # 4 codes of 6 bits for 64 dims: the compressed scores cap recall far below the target, whatever nprobe
    params = IndexParams("ivfpq", nlist=64, pq_m=4, nbits=6, target_recall=0.99)
    ix = ixf.build(x, [f"v{i}" for i in range(len(x))], [None] * len(x), params, identity={})
    tuned = ix.manifest["tuned"]
    assert not tuned["reached"] and tuned["recall"] < 0.5
    assert ix.manifest["params"]["nprobe"] == tuned["value"] < 64  # stopped before trying every list
