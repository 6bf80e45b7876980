"""The Milvus backend (issue 33) against a Milvus Lite server on 127.0.0.1.

One `milvus-lite server` is started for the module on a free loopback port and stopped by pid,
also when a test fails. These tests prove the client contract (what pymilvus sends, what the
folder records, the one-line refusals), not a Milvus cluster's behaviour.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import free_port
from test_index import big_gallery, cli, one_error_line, sim  # noqa: F401  (module fixtures)
from test_similarity import run  # noqa: F401  (the module-scoped tiny run fixture)

from retrieval import index as ixf
from retrieval import milvus_index as mvi
from retrieval.index import IndexParams
from toolkit.utils import UserError


def _milvus_lite_command(data_dir: Path, port: int) -> list[str]:
    script = Path(sys.executable).parent / "milvus-lite"
    head = [str(script)] if script.exists() else [sys.executable, "-m", "milvus_lite"]
    return head + ["server", "--data-dir", str(data_dir), "--host", "127.0.0.1", "--port", str(port)]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The URI of a Milvus Lite server started for this module (ended by pid afterwards, however the tests end)."""
    port = free_port()
    log = tmp_path_factory.mktemp("milvus") / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(_milvus_lite_command(log.parent / "data", port), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"milvus-lite server did not start: {log.read_text()[-2000:]}")
            time.sleep(0.2)
        yield f"http://127.0.0.1:{port}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def build(run, gallery, out, capsys, *extra):  # noqa: F811
    return cli(["--run", str(run["run"]), "index", "build", str(gallery), "-o", str(out), "--no-progress", *extra],
               capsys)


def test_milvus_folder_searches_pairs_and_adds_as_a_faiss_flat_one(run, sim, big_gallery, server, tmp_path,  # noqa: F811
                                                                  capsys):
    code, out, err = build(run, big_gallery, tmp_path / "mv", capsys, "--backend", "milvus", "--uri", server,
                           "--kind", "flat", "--collection", "parity")
    assert code == 0, err
    assert "indexed 22 image(s)" in out and "Milvus collection parity" in out
    assert sorted(p.name for p in (tmp_path / "mv").iterdir()) == ["manifest.json"]
    manifest = json.loads((tmp_path / "mv" / "manifest.json").read_text())
    assert manifest["backend"] == "milvus" and manifest["metric"] == "inner_product" and manifest["dim"] == sim.identity()["out_dim"]
    assert manifest["milvus"] == {"uri": server, "collection": "parity", "token_file": None}
    assert manifest["identity"]["checkpoint_sha256"] == sim.checkpoint_sha256
    assert build(run, big_gallery, tmp_path / "fx", capsys)[0] == 0
    mv, fx = sim.load_index(tmp_path / "mv"), sim.load_index(tmp_path / "fx")
    assert mv.backend == "milvus" and len(mv) == len(fx) == 22
    queries = sorted(str(p) for p in big_gallery.iterdir())
    for a, b in zip(sim.search(queries, mv, k=10), sim.search(queries, fx, k=10)):
        assert [m.name for m in a.matches] == [m.name for m in b.matches]
        np.testing.assert_allclose([m.score for m in a.matches], [m.score for m in b.matches], atol=1e-5)
    # search and pairs through the command line, unchanged
    code, out, err = cli(["--run", str(run["run"]), "search", queries[0], "--index", str(tmp_path / "mv"), "-k", "3"],
                         capsys)
    assert code == 0 and Path(queries[0]).name in out.splitlines()[2], err
    for ix in ("mv", "fx"):
        code, _, err = cli(["--run", str(run["run"]), "pairs", "--index", str(tmp_path / ix), "--top", "5", "-o",
                            str(tmp_path / f"pairs_{ix}")], capsys)
        assert code == 0, err
    pairs = [{frozenset(r[:2]): float(r[2]) for r in (line.split(",") for line in
                                                     (tmp_path / f"pairs_{ix}.csv").read_text().splitlines()[1:])}
             for ix in ("mv", "fx")]
    assert pairs[0].keys() == pairs[1].keys() and len(pairs[0]) == 5
    np.testing.assert_allclose([pairs[0][p] for p in pairs[1]], list(pairs[1].values()), atol=1e-5)


def test_adds_are_keyed_by_content_and_a_rerun_adds_nothing_twice(run, sim, server, tmp_path, capsys):  # noqa: F811
    code, _, err = build(run, run["gallery"], tmp_path / "mv", capsys, "--backend", "milvus", "--uri", server,
                         "--kind", "hnsw", "--collection", "adds")
    assert code == 0, err
    more = run["root"] / "tll" / "left"
    for expected in (8, 0):  # the second run (as after a kill once all was in) finds every image there
        code, out, err = cli(["--run", str(run["run"]), "index", "add", str(tmp_path / "mv"), str(more),
                              "--no-progress"], capsys)
        assert code == 0 and f"added {expected} image(s)" in out and "holds 14" in out, (out, err)
    ix = sim.load_index(tmp_path / "mv")
    assert len(ix) == 14 and len(set(ix.names)) == 14
    # a kill after half of an add: the rerun upserts the same keys, nothing is doubled
    g = sim.gallery(run["root"] / "tll" / "right")
    vecs = ixf.normalise(np.asarray(sim.adapt(g.vectors)))
    ix.add(vecs[:4], g.names[:4], g.images[:4])
    code, out, err = cli(["--run", str(run["run"]), "index", "add", str(tmp_path / "mv"),
                          str(run["root"] / "tll" / "right"), "--no-progress"], capsys)
    assert code == 0 and "added 4 image(s)" in out and "holds 22" in out, (out, err)
    ix.add(vecs, g.names, g.images)  # all of them again, directly
    assert len(ix) == 22
    # the build resumes a collection of the same run instead of doubling it
    code, out, err = build(run, run["gallery"], tmp_path / "mv2", capsys, "--backend", "milvus", "--uri", server,
                           "--kind", "hnsw", "--collection", "adds")
    assert code == 0 and "holds 22" in out, err


def test_hnsw_recall_at_10_on_20000_planted_vectors(server):
    rng = np.random.default_rng(0)
    n, dim = 20_000, 64
    centres = rng.normal(size=(200, dim))
    x = ixf.normalise(centres[rng.integers(200, size=n)] + 0.5 * rng.normal(size=(n, dim)))
    q = ixf.normalise(x[rng.choice(n, 200, replace=False)] + 0.2 * rng.normal(size=(200, dim)))
    ix, resumed = mvi.create(mvi.MilvusTarget(server, "planted"), IndexParams("hnsw", ef_search=128), dim, {})
    assert not resumed
    ix.add(x, [f"v{i}" for i in range(n)], [None] * n)
    assert len(ix) == n
    assert ix.client.describe_index("planted", "vector")["index_type"] == "HNSW"
    _, ids = ix.search(q, 10)
    truth = np.argsort(-(q @ x.T), axis=1)[:, :10]
    names = np.array(ix.names)
    assert ixf.recall_at(names[ids], np.array([f"v{i}" for i in range(n)])[truth]) >= 0.99


def test_refusals_are_one_line_exit_2_and_write_nothing(run, server, tmp_path, capsys):  # noqa: F811
    down = f"http://127.0.0.1:{free_port()}"
    token = tmp_path / "token"
    token.write_text("")
    cases = [
        (["--uri", down], "cannot reach a Milvus server"),
        (["--uri", "127.0.0.1:19530"], "is not a Milvus server address"),
        (["--uri", server, "--collection", "no-dash"], "collection name"),
        (["--uri", server, "--kind", "ivf"], "flat or hnsw"),
        (["--uri", server, "--kind", "hnsw", "--target-recall", "0.9"], "applies to --backend faiss"),
        (["--uri", server, "--token-file", str(tmp_path / "missing")], "does not exist"),
        (["--uri", server, "--token-file", str(token)], "empty"),
        ([], "needs --uri"),
    ]
    for extra, says in cases:
        code, _, err = build(run, run["gallery"], tmp_path / "ix", capsys, "--backend", "milvus", *extra)
        assert code == 2 and says in one_error_line(err), (extra, err)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["token"]
    code, _, err = build(run, run["gallery"], tmp_path / "ix", capsys, "--uri", server)
    assert code == 2 and "--backend milvus only" in one_error_line(err)
    with pytest.raises(SystemExit):  # no way to put a token on the command line
        build(run, run["gallery"], tmp_path / "ix", capsys, "--backend", "milvus", "--uri", server, "--token", "x")


def test_a_missing_foreign_or_mismatched_collection_is_refused(run, sim, server, tmp_path, capsys):  # noqa: F811
    code, _, err = build(run, run["gallery"], tmp_path / "mv", capsys, "--backend", "milvus", "--uri", server,
                         "--collection", "gone")
    assert code == 0, err
    client = mvi.connect(mvi.MilvusTarget(server, "gone"))
    client.drop_collection("gone")
    code, _, err = cli(["--run", str(run["run"]), "search", str(next(run["gallery"].iterdir())), "--index",
                        str(tmp_path / "mv")], capsys)
    assert code == 2 and "collection gone does not exist" in one_error_line(err)
    manifest = json.loads((tmp_path / "mv" / "manifest.json").read_text())
    manifest["milvus"]["uri"] = f"http://127.0.0.1:{free_port()}"  # the server moved, or is down
    (tmp_path / "mv" / "manifest.json").write_text(json.dumps(manifest))
    for argv in (["search", str(next(run["gallery"].iterdir())), "--index", str(tmp_path / "mv")],
                 ["index", "add", str(tmp_path / "mv"), str(run["gallery"])]):
        code, _, err = cli(["--run", str(run["run"]), *argv], capsys)
        assert code == 2 and "cannot reach a Milvus server at http://127.0.0.1:" in one_error_line(err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mv"]
    # a collection this toolkit did not make is never used nor dropped, even with --overwrite
    from pymilvus import DataType

    schema = client.create_schema(auto_id=True)
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=8)
    client.create_collection("foreign", schema=schema)
    code, _, err = build(run, run["gallery"], tmp_path / "f", capsys, "--backend", "milvus", "--uri", server,
                         "--collection", "foreign", "--overwrite")
    assert code == 2 and "not made by this toolkit" in one_error_line(err) and client.has_collection("foreign")
    assert not (tmp_path / "f").exists()
    # another run's (identity) or another dimension's collection
    dim = sim.identity()["out_dim"]
    mvi.create(mvi.MilvusTarget(server, "other"), IndexParams("flat"), dim, {"checkpoint_sha256": "x"})
    mvi.create(mvi.MilvusTarget(server, "wide"), IndexParams("flat"), 16, sim.identity())
    for name, says in (("other", "another run or encoder"), ("wide", f"16-d vectors, not {dim}-d")):
        code, _, err = build(run, run["gallery"], tmp_path / name, capsys, "--backend", "milvus", "--uri", server,
                             "--collection", name)
        assert code == 2 and says in one_error_line(err) and not (tmp_path / name).exists(), err


def test_a_refused_token_is_one_line_naming_the_token_file(tmp_path):
    from pymilvus.exceptions import MilvusException

    target = mvi.MilvusTarget("http://127.0.0.1:1", "c", str(tmp_path / "token"))
    with pytest.raises(UserError, match=f"refused the token in {tmp_path / 'token'}"):
        with mvi.server_errors(target):
            raise MilvusException(1800, "auth check failure, please check username, password or token")
    (tmp_path / "token").write_text("root:Milvus\n")
    assert target.token() == "root:Milvus"
    assert "root:Milvus" not in json.dumps(target.manifest())


def test_the_search_service_serves_a_milvus_folder_as_it_serves_a_faiss_one(run, sim, big_gallery, server,  # noqa: F811
                                                                            tmp_path, capsys):
    from fastapi.testclient import TestClient

    from retrieval.serve import ServeConfig, create_app

    for name, extra in (("mv", ["--backend", "milvus", "--uri", server, "--collection", "served"]), ("fx", [])):
        code, _, err = build(run, big_gallery, tmp_path / name, capsys, *extra)
        assert code == 0, err
    query = sorted(big_gallery.iterdir())[3]
    got = {}
    for name in ("mv", "fx"):
        with TestClient(create_app(ServeConfig(str(tmp_path / name)), lambda: sim)) as c:
            deadline = time.monotonic() + 60
            while c.get("/readyz").status_code != 200:
                assert time.monotonic() < deadline, c.get("/readyz").text
                time.sleep(0.05)
            got[name] = c.post("/v1/search", params={"k": 5},
                               files={"image": (query.name, query.read_bytes(), "image/png")}).json()["results"]
    assert [r["name"] for r in got["mv"]] == [r["name"] for r in got["fx"]] and got["mv"][0]["name"] == query.name
    np.testing.assert_allclose([r["score"] for r in got["mv"]], [r["score"] for r in got["fx"]], atol=1e-5)
