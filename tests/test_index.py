"""The persistent faiss index: build, add, search, pairs, refusals, resumable encoding, result files."""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import numpy as np
import pytest

import extract
import similarity
import train
from conftest import TINY, script_cli
from test_similarity import ImgCounter, run  # noqa: F401  (run: the module-scoped tiny run fixture)

from retrieval import index as ixf
from retrieval import index_folder as ixd
from retrieval.index import IndexParams


cli = script_cli(similarity)


def one_error_line(err: str) -> str:
    lines = [l for l in err.splitlines() if l.startswith("similarity.py: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def sim(run):  # noqa: F811
    from retrieval.visual_similarity import VisualSimilarity

    return VisualSimilarity.from_run(run["run"], device="cpu")


@pytest.fixture(scope="module")
def big_gallery(run, tmp_path_factory):  # noqa: F811
    """The 6 gallery images plus the 16 pair images: 22 images in one flat folder."""
    root = tmp_path_factory.mktemp("big")
    for f in run["gallery"].iterdir():
        (root / f.name).write_bytes(f.read_bytes())
    for side in ("left", "right"):
        for f in (run["root"] / "tll" / side).iterdir():
            (root / f"{side}_{f.name}").write_bytes(f.read_bytes())
    return root


def test_flat_index_search_equals_brute_force_order(run, sim, big_gallery, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "ix"
    code, stdout, err = cli(["--run", str(run["run"]), "index", "build", str(big_gallery), "-o", str(out),
                             "--no-progress"], capsys)
    assert code == 0, err
    assert "indexed 22 image(s)" in stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "flat" and manifest["count"] == 22 and manifest["version"] == ixd.VERSION
    assert manifest["identity"]["checkpoint_sha256"] == sim.checkpoint_sha256
    assert manifest["identity"]["pca"]["n_components"] == 8 and manifest["identity"]["backbone"]["name"] == "tiny_rn"
    assert not (tmp_path / "ix.partial").exists()
    index = sim.load_index(out)
    gallery = sim.gallery(big_gallery)
    queries = sorted(str(p) for p in big_gallery.iterdir())[:8]
    for q, hits in zip(queries, sim.search(queries, index, k=22)):
        brute = sim.search(q, gallery, k=22)
        assert [m.name for m in hits.matches] == [m.name for m in brute]
        np.testing.assert_allclose([m.score for m in hits.matches], [m.score for m in brute], atol=1e-5)
        assert hits.matches[0].name == Path(q).name  # each query is in the gallery


def clustered(n=3000, dim=64, clusters=30, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim))
    x = centres[rng.integers(clusters, size=n)] + 0.35 * rng.normal(size=(n, dim))
    q = x[rng.choice(n, 200, replace=False)] + 0.1 * rng.normal(size=(200, dim))
    return ixf.normalise(x), ixf.normalise(q)


@pytest.mark.parametrize("params", [IndexParams("hnsw", hnsw_m=16, ef_construction=40, ef_search=32),
                                    IndexParams("ivfpq", nlist=16, pq_m=16, nbits=8, nprobe=4)])
def test_approximate_kinds_find_the_exact_top1_for_most_queries(params, tmp_path):
    x, q = clustered()
    names = [f"v{i}" for i in range(len(x))]
    exact = ixf.build(x, names, [None] * len(x), IndexParams("flat"), identity={})
    approx = ixf.build(x, names, [None] * len(x), params, identity={})
    ixd.write(approx, tmp_path / "ix")
    approx = ixd.read(tmp_path / "ix")  # search-time settings survive the round trip
    assert approx.manifest["params"] == params.resolved(len(x), x.shape[1])
    _, truth = exact.search(q, 1)
    _, found = approx.search(q, 10)
    top1 = float((found[:, 0] == truth[:, 0]).mean())
    assert top1 >= 0.8, top1
    assert float(np.mean([t in f for t, f in zip(truth[:, 0], found)])) >= 0.95
    brute = np.argsort(-(q @ x.T), axis=1, kind="stable")[:, 0]
    np.testing.assert_array_equal(truth[:, 0], brute)


def test_cli_hnsw_and_ivfpq_on_the_tiny_gallery(run, sim, big_gallery, tmp_path, capsys):  # noqa: F811
    q = str(big_gallery / "g3.png")
    for kind, extra in (("hnsw", []), ("ivfpq", ["--nlist", "2", "--pq-m", "8", "--nbits", "2"])):
        out = tmp_path / kind
        code, _, err = cli(["--run", str(run["run"]), "index", "build", str(big_gallery), "-o", str(out), "--kind",
                            kind, "--no-progress", *extra], capsys)
        assert code == 0, err
        code, stdout, err = cli(["--run", str(run["run"]), "search", q, "--index", str(out), "-k", "3"], capsys)
        assert code == 0, err
        rows = [l.split() for l in stdout.splitlines() if l.strip()[:1].isdigit()]
        assert len(rows) == 3 and (kind == "ivfpq" or rows[0][-1] == "g3.png")
    code, _, err = cli(["--run", str(run["run"]), "index", "build", str(big_gallery), "-o", str(tmp_path / "pq8"),
                        "--kind", "ivfpq"], capsys)
    assert code == 2 and "ivfpq index of 22 vectors" in one_error_line(err)
    assert not (tmp_path / "pq8").exists()


def test_add_then_search_finds_the_new_images(run, sim, tmp_path, capsys):  # noqa: F811
    first, more = tmp_path / "first", tmp_path / "more"
    for i in range(4):
        (first / f"g{i}.png").parent.mkdir(exist_ok=True)
        (first / f"g{i}.png").write_bytes((run["gallery"] / f"g{i}.png").read_bytes())
    more.mkdir()
    for i in (4, 5):
        (more / f"g{i}.png").write_bytes((run["gallery"] / f"g{i}.png").read_bytes())
    for hnsw in ([], ["--kind", "hnsw"]):
        out = tmp_path / f"ix{len(hnsw)}"
        assert cli(["--run", str(run["run"]), "index", "build", str(first), "-o", str(out), *hnsw], capsys)[0] == 0
        code, stdout, err = cli(["--run", str(run["run"]), "index", "add", str(out), str(more)], capsys)
        assert code == 0 and "added 2 image(s)" in stdout and "holds 6" in stdout, err
        code, stdout, err = cli(["--run", str(run["run"]), "index", "add", str(out), str(more)], capsys)
        assert code == 0 and "added 0 image(s)" in stdout, err  # already indexed: not added twice
        hits = sim.search([str(more / "g4.png"), str(more / "g5.png")], sim.load_index(out), k=6)
        assert [h.matches[0].name for h in hits] == ["g4.png", "g5.png"]
        brute = sim.search(str(more / "g5.png"), run["gallery"], k=6)
        assert sorted(m.name for m in hits[1].matches) == sorted(m.name for m in brute)
        assert not list(tmp_path.glob("*.add.partial"))


def test_gallery_kinds_features_file_and_list_file(run, sim, tmp_path):  # noqa: F811
    assert extract.main(["-d", str(run["gallery"]), "-s", str(tmp_path / "g"), "-p", "adapt", "--normalize", "layers",
                         *TINY]) == 0
    from_file, _ = sim.build_index(tmp_path / "g" / "tiny_rn" / "features.npy", tmp_path / "f", progress=False)
    listing = tmp_path / "list.txt"
    paths = sorted(run["gallery"].iterdir())
    listing.write_text("# gallery\n" + "\n".join(str(p) for p in paths[:4]) + f"\n{paths[4]}\t{paths[5]}\n")
    from_list, _ = sim.build_index(listing, tmp_path / "l", progress=False)
    assert len(from_file) == len(from_list) == 6
    q = run["root"] / "tll" / "left" / "pair001.png"
    a, b = sim.search(q, from_file, k=6), sim.search(q, from_list, k=6)
    assert [m.name for m in a] == [Path(m.name).name for m in b]
    np.testing.assert_allclose([m.score for m in a], [m.score for m in b], atol=1e-5)
    assert Path(a[0].image).is_file() and Path(b[0].image).is_absolute()
    pairs_ix, _ = sim.build_index(run["root"] / "tll", tmp_path / "p", progress=False)
    assert len(pairs_ix) == 16 and pairs_ix.names[0] == "left/pair000.png" and pairs_ix.names[8] == "right/pair000.png"


def test_interrupted_build_resumes_from_its_cache(run, sim, big_gallery, tmp_path, monkeypatch):  # noqa: F811
    import retrieval.visual_similarity as S

    monkeypatch.setattr(S, "INDEX_CHUNK", 5)  # 22 images: 5 chunks
    calls = []
    real = S.VisualSimilarity.raw

    def failing(self, images):
        calls.append(len(images))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, images)

    monkeypatch.setattr(S.VisualSimilarity, "raw", failing)
    out = tmp_path / "ix"
    with pytest.raises(KeyboardInterrupt):
        sim.build_index(big_gallery, out, progress=False)
    assert not out.exists() and len(list((tmp_path / "ix.partial").glob("chunk*.npz"))) == 2
    calls.clear()
    monkeypatch.setattr(S.VisualSimilarity, "raw", lambda self, images: calls.append(len(images)) or real(self, images))
    index, _ = sim.build_index(big_gallery, out, progress=False)
    assert sum(calls) == 22 - 10 and len(index) == 22  # the two cached chunks were not encoded again
    assert not (tmp_path / "ix.partial").exists()
    fresh, _ = sim.build_index(big_gallery, tmp_path / "fresh", progress=False)
    np.testing.assert_allclose(index.vectors(), fresh.vectors(), atol=1e-6)
    assert index.names == fresh.names


def test_search_json_csv_round_trip_html_and_an_unreadable_query(run, sim, big_gallery, tmp_path, capsys):  # noqa: F811
    from retrieval.results import read_search_results

    out = tmp_path / "ix"
    assert cli(["--run", str(run["run"]), "index", "build", str(big_gallery), "-o", str(out)], capsys)[0] == 0
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
    qdir = tmp_path / "qdir"
    qdir.mkdir()
    (qdir / "g1.png").write_bytes((big_gallery / "g1.png").read_bytes())
    qlist = tmp_path / "queries.txt"
    qlist.write_text(f"{big_gallery / 'g2.png'}\n")
    queries = [str(big_gallery / "g0.png"), str(tmp_path / "bad.jpg"), str(qdir), str(qlist)]
    argv = ["--run", str(run["run"]), "search", *queries, "--index", str(out), "-k", "4"]
    files = ["--json", str(tmp_path / "r.json"), "--csv", str(tmp_path / "r.csv"), "--html", str(tmp_path / "r.html")]
    code, stdout, err = cli(argv + files, capsys)
    assert code == 2 and "bad.jpg" in one_error_line(err)
    assert stdout.count("query: ") == 3 and "bad.jpg" not in stdout
    expected = sim.search([queries[0], str(tmp_path / "bad.jpg"), str(qdir / "g1.png"), str(big_gallery / "g2.png")],
                          sim.load_index(out), k=4)
    assert [h.error is not None for h in expected] == [False, True, False, False]
    for path in ("r.json", "r.csv"):
        back = read_search_results(tmp_path / path)
        assert [(h.query, h.error is None) for h in back] == [(h.query, h.error is None) for h in expected]
        for got, want in zip(back, expected):
            assert [(m.name, m.image) for m in got.matches] == [(m.name, m.image) for m in want.matches]
            np.testing.assert_allclose([m.score for m in got.matches], [m.score for m in want.matches], atol=1e-6)
    assert [h.matches[0].name for h in expected if not h.error] == ["g0.png", "g1.png", "g2.png"]
    parser = ImgCounter()
    parser.feed((tmp_path / "r.html").read_text())
    assert len(parser.srcs) == 4 + 3 * 4  # a query cell per row, k results for each readable query
    code, _, err = cli(argv + files, capsys)
    assert code == 2 and "--overwrite" in one_error_line(err)


def _brute_pairs(x: np.ndarray):
    s = x @ x.T
    return sorted(((float(s[i, j]), i, j) for i, j in itertools.combinations(range(len(x)), 2)), key=lambda t: -t[0])


def test_look_alike_pairs_against_all_pairs():
    x, _ = clustered(n=300, dim=16, clusters=5)
    ix = ixf.build(x, [str(i) for i in range(300)], [None] * 300, IndexParams("flat"), identity={})
    brute = _brute_pairs(x)
    a, b, s, capped = ixf.look_alike_pairs(ix, top=50, batch=64)
    assert [(i, j) for _, i, j in brute[:50]] == list(zip(a.tolist(), b.tolist()))
    np.testing.assert_allclose(s, [t[0] for t in brute[:50]], atol=1e-5)
    t = brute[400][0]
    a, b, s, capped = ixf.look_alike_pairs(ix, threshold=t, per_item=299, batch=64)
    assert not capped and set(zip(a.tolist(), b.tolist())) == {(i, j) for sc, i, j in brute if sc >= t}
    a, b, s, capped = ixf.look_alike_pairs(ix, threshold=t, per_item=2)
    assert capped and len(set(zip(a.tolist(), b.tolist()))) == len(a)  # each pair once


def test_pairs_cli_writes_csv_and_html(run, sim, big_gallery, tmp_path, capsys):  # noqa: F811
    from retrieval.results import read_pairs

    out = tmp_path / "ix"
    assert cli(["--run", str(run["run"]), "index", "build", str(big_gallery), "-o", str(out)], capsys)[0] == 0
    gallery = sim.gallery(big_gallery)
    v = ixf.normalise(sim.adapt(gallery.vectors).numpy())
    brute = _brute_pairs(v)
    code, stdout, err = cli(["--run", str(run["run"]), "pairs", "--index", str(out), "--top", "5", "-o",
                             str(tmp_path / "top")], capsys)
    assert code == 0, err
    rows = read_pairs(tmp_path / "top.csv")
    assert [(r[0], r[1]) for r in rows] == [(gallery.names[i], gallery.names[j]) for _, i, j in brute[:5]]
    np.testing.assert_allclose([r[2] for r in rows], [t[0] for t in brute[:5]], atol=1e-5)
    parser = ImgCounter()
    parser.feed((tmp_path / "top.html").read_text())
    assert len(parser.srcs) == 10
    t = (brute[20][0] + brute[21][0]) / 2  # not on a score, where float rounding would decide
    code, stdout, err = cli(["--run", str(run["run"]), "pairs", "--index", str(out), "--threshold", repr(t), "-o",
                             str(tmp_path / "thr"), "--html-rows", "3"], capsys)
    assert code == 0, err
    rows = read_pairs(tmp_path / "thr.csv")
    assert {(r[0], r[1]) for r in rows} == {(gallery.names[i], gallery.names[j]) for s, i, j in brute if s >= t}
    assert "showing the best 3 of" in (tmp_path / "thr.html").read_text()


def test_refusals_are_one_line_exit_2(run, sim, big_gallery, tmp_path, capsys):  # noqa: F811
    r = ["--run", str(run["run"])]
    out = tmp_path / "ix"
    assert cli(r + ["index", "build", str(run["gallery"]), "-o", str(out)], capsys)[0] == 0
    q = str(run["gallery"] / "g0.png")
    # Another run (same features, another seed: another checkpoint).
    assert train.main(["-d", str(run["features"]), "--model", "original", "-s", str(tmp_path / "runs"), "-e", "1",
                       "-t", "15", "--test-split", "0.25", "-k", "1", "--seed", "1", "--no-images"]) == 0
    other = ["--run", str(tmp_path / "runs" / "run1")]
    cases = {"another run": (other + ["search", q, "--index", str(out)], "another run"),
             "add with another run": (other + ["index", "add", str(out), str(run["gallery"])], "another run"),
             "pairs with another run": (other + ["pairs", "--index", str(out), "--top", "2", "-o", str(tmp_path / "p")],
                                        "another run"),
             "exists": (r + ["index", "build", str(run["gallery"]), "-o", str(out)], "--overwrite"),
             "not an index": (r + ["search", q, "--index", str(run["gallery"])], "not an index folder"),
             "k too large": (r + ["search", q, "--index", str(out), "-k", "7"], "has 6 item(s)"),
             "bad kind params": (r + ["index", "build", str(run["gallery"]), "-o", str(tmp_path / "h"), "--kind", "hnsw",
                                      "--hnsw-m", "0"], "--hnsw-m must be at least 1"),
             "missing gallery": (r + ["index", "build", str(tmp_path / "nope"), "-o", str(tmp_path / "n")],
                                 "does not exist")}
    for what, key in (("backbone", "another backbone"), ("pca", "another PCA")):
        copy = tmp_path / f"ix_{what}"
        copy.mkdir()
        for f in out.iterdir():
            (copy / f.name).write_bytes(f.read_bytes())
        manifest = json.loads((copy / "manifest.json").read_text())
        manifest["identity"][what]["taps" if what == "backbone" else "sha256"] = ["layer1"] if what == "backbone" else "0"
        (copy / "manifest.json").write_text(json.dumps(manifest))
        cases[what] = (r + ["search", q, "--index", str(copy)], key)
    damaged = tmp_path / "ix_damaged"
    damaged.mkdir()
    for f in out.iterdir():
        (damaged / f.name).write_bytes(f.read_bytes()[:100] if f.name == "index.faiss" else f.read_bytes())
    cases["damaged"] = (r + ["search", q, "--index", str(damaged)], "damaged")
    garbage = tmp_path / "ix_garbage"
    garbage.mkdir()
    (garbage / "manifest.json").write_text("{not json")
    cases["damaged manifest"] = (r + ["search", q, "--index", str(garbage)], "cannot read")
    capsys.readouterr()
    for label, (argv, message) in cases.items():
        code, _, err = cli(argv, capsys)
        assert code == 2 and message in one_error_line(err), (label, err)
    assert not (tmp_path / "h").exists() and not (tmp_path / "p.csv").exists()


def test_writes_are_atomic_locked_and_overwrite_only_when_asked(run, sim, tmp_path, capsys, monkeypatch):  # noqa: F811
    out = tmp_path / "ix"
    first, _ = sim.build_index(run["gallery"], out, progress=False)
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    with ixd.locked(out):  # another writer holds the lock
        code, _, err = cli(["--run", str(run["run"]), "index", "add", str(out), str(run["root"] / "tll")], capsys)
    assert code == 2 and f"is being written by process {os.getpid()}" in one_error_line(err)

    def full_disk(index, path):
        Path(path).write_bytes(b"x")
        raise RuntimeError("Error in faiss::FileIOWriter: No space left on device")

    import faiss

    monkeypatch.setattr(faiss, "write_index", full_disk)
    code, _, err = cli(["--run", str(run["run"]), "index", "add", str(out), str(run["root"] / "tll")], capsys)
    assert code == 2 and "No space left" in one_error_line(err)
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before  # the index is untouched
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".ix.") and p.is_dir()) == []
    monkeypatch.undo()
    code, _, err = cli(["--run", str(run["run"]), "index", "build", str(run["root"] / "tll"), "-o", str(out),
                        "--kind", "hnsw", "--overwrite"], capsys)
    assert code == 0, err
    assert sim.load_index(out).kind == "hnsw" and len(sim.load_index(out)) == 16
    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    import toolkit.folders

    monkeypatch.setattr(toolkit.folders.tempfile, "mkdtemp", read_only)  # root ignores chmod, so the refusal is simulated
    code, _, err = cli(["--run", str(run["run"]), "index", "build", str(run["gallery"]), "-o", str(tmp_path / "ro"),
                        "--no-progress"], capsys)
    assert code == 2 and "writable" in one_error_line(err) and not (tmp_path / "ro").exists()


@pytest.mark.parametrize("content", ["name_a,name_b,score,image_a,image_b\na,b\n", "a,b,c\n1,2,3\n",
                                     "name_a,name_b,score,image_a,image_b\na,b,high,,\n", "\xff\xfe"])
def test_a_damaged_pairs_file_is_one_user_error(tmp_path, content):
    from retrieval.results import read_pairs
    from toolkit.utils import UserError

    path = tmp_path / "pairs.csv"
    path.write_bytes(content.encode("latin-1"))
    with pytest.raises(UserError, match="pairs"):
        read_pairs(path)
