"""The engine graph cache (featuresExtractor.graph_cache): entries checked before use, damaged ones built
again, unwritable folders and concurrent fills; and the onnxruntime engine built through it."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, make_pairs, run_script
from featuresExtractor.graph_cache import FORMAT, GraphCache, cache_folder, key_digest
from toolkit.lock import sibling_lock

KEY = {"weights_sha256": "ab" * 32, "taps": ["layer1", "attnpool"], "image_shape": [3, 32, 32]}


class Builds:
    """A build that writes known bytes and counts its calls."""

    def __init__(self, data: bytes = b"graph bytes " * 100):
        self.data, self.calls = data, 0

    def __call__(self, path: Path) -> None:
        self.calls += 1
        path.write_bytes(self.data)


def cache(folder, lines=None, wait_s=600.0):
    return GraphCache(folder, say=(lines if lines is not None else []).append, wait_s=wait_s)


def test_the_folder_follows_xdg_cache_home_only_when_absolute(tmp_path):
    assert cache_folder({"XDG_CACHE_HOME": str(tmp_path)}) == tmp_path / "adaptation-similarity" / "graphs"
    assert cache_folder({"XDG_CACHE_HOME": "relative/dir"}) == Path.home() / ".cache" / "adaptation-similarity" / "graphs"
    assert cache_folder({}) == Path.home() / ".cache" / "adaptation-similarity" / "graphs"


def test_the_entry_name_is_the_sha256_of_the_canonical_key():
    import hashlib

    slow = hashlib.sha256(b'{"image_shape":[3,32,32],"taps":["layer1","attnpool"],"weights_sha256":"' + b"ab" * 32
                          + b'"}').hexdigest()
    assert key_digest(KEY) == slow
    assert key_digest(dict(reversed(list(KEY.items())))) == slow  # order of the keys does not matter
    assert key_digest({**KEY, "taps": ["layer1"]}) != slow


def test_a_graph_is_built_once_and_then_read_from_its_checked_entry(tmp_path):
    lines, build = [], Builds()
    first = cache(tmp_path, lines).get(KEY, build)
    graph, sidecar = cache(tmp_path).paths(KEY)
    assert first == str(graph) and graph.read_bytes() == build.data and build.calls == 1
    meta = json.loads(sidecar.read_text())
    assert meta["format"] == FORMAT and meta["key"] == KEY and meta["size"] == len(build.data) and meta["build_s"] >= 0
    assert len(lines) == 1 and "built the graph" in lines[0]
    assert cache(tmp_path, lines).get(KEY, build) == str(graph) and build.calls == 1 and len(lines) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([graph.name, sidecar.name])  # no lock or temp left


@pytest.mark.parametrize("damage", ["flipped byte", "truncated graph", "graph missing", "sidecar missing",
                                    "sidecar not json", "sidecar of another key", "sidecar a fifo",
                                    "sidecar a folder"])
def test_a_damaged_entry_is_built_again_never_trusted(tmp_path, damage):
    build = Builds()
    cache(tmp_path).get(KEY, build)
    graph, sidecar = cache(tmp_path).paths(KEY)
    if damage == "flipped byte":
        data = bytearray(graph.read_bytes())
        data[10] ^= 1
        graph.write_bytes(bytes(data))
    elif damage == "truncated graph":
        graph.write_bytes(build.data[:50])
    elif damage == "graph missing":
        graph.unlink()
    elif damage == "sidecar missing":
        sidecar.unlink()
    elif damage == "sidecar not json":
        sidecar.write_text("{not json")
    elif damage == "sidecar of another key":
        meta = json.loads(sidecar.read_text())
        sidecar.write_text(json.dumps({**meta, "key": {**KEY, "taps": ["layer1"]}}))
    elif damage == "sidecar a fifo":  # would block a read: never opened
        sidecar.unlink()
        os.mkfifo(sidecar)
    else:
        sidecar.unlink()
        sidecar.mkdir()
    lines = []
    assert cache(tmp_path).check(KEY) is not None
    if damage == "sidecar a folder":  # not a file this cache can replace: the run goes on without it
        assert cache(tmp_path, lines).get(KEY, build) == build.data
        assert sidecar.is_dir() and "cannot write" in lines[-1]
        return
    assert cache(tmp_path, lines).get(KEY, build) == str(graph)
    assert build.calls == 2 and graph.read_bytes() == build.data and cache(tmp_path).check(KEY) is None
    assert any("damaged" in line for line in lines) or damage == "graph missing" and "built" in lines[-1]


def test_a_folder_that_cannot_be_made_builds_the_graph_for_this_run_only(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a user's file")
    lines, build = [], Builds()
    assert cache(blocker / "graphs", lines).get(KEY, build) == build.data
    assert len(lines) == 1 and "cannot write the cache folder" in lines[0] and "XDG_CACHE_HOME" in lines[0]
    assert blocker.read_text() == "a user's file" and sorted(p.name for p in tmp_path.iterdir()) == ["file"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through a read-only mode")
def test_a_read_only_folder_builds_the_graph_for_this_run_only(tmp_path):
    folder = tmp_path / "graphs"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        lines, build = [], Builds()
        assert cache(folder, lines).get(KEY, build) == build.data and "cannot write" in lines[0]
        assert list(folder.iterdir()) == []
    finally:
        folder.chmod(0o755)


def test_a_full_folder_leaves_nothing_half_written_and_the_run_goes_on(tmp_path):
    folder = tmp_path / "graphs"

    def build(path: Path) -> None:  # the disk under the cache folder fills during the write
        with open(path, "wb") as fh:
            fh.write(b"half a graph")
            if folder in path.parents:
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
            fh.write(b" and the rest")

    lines = []
    assert cache(folder, lines).get(KEY, build) == b"half a graph and the rest"
    assert len(lines) == 1 and "No space left on device" in lines[0] and "free some space" in lines[0]
    assert list(folder.iterdir()) == []  # no temporary file, no lock file, no entry


def test_a_second_filler_waits_for_the_first_and_uses_its_entry(tmp_path):
    # Two processes fill one entry at once: one builds (slowly), the other waits and reads its entry.
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from pathlib import Path
        from featuresExtractor.graph_cache import GraphCache
        def build(path):
            with open({str(tmp_path / "builds.log")!r}, "a") as log:
                log.write("build\\n")
            time.sleep(1.5)
            path.write_bytes(b"the graph" * 1000)
        print(GraphCache(sys.argv[1], say=lambda line: print(line, file=sys.stderr)).get({KEY!r}, build))
    """)
    folder = tmp_path / "graphs"
    procs = [subprocess.Popen([sys.executable, "-c", script, str(folder)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    try:
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            p.kill()
    graph, _ = cache(folder).paths(KEY)
    assert [p.returncode for p in procs] == [0, 0], outs
    assert [o.strip() for o, _ in outs] == [str(graph)] * 2
    assert (tmp_path / "builds.log").read_text() == "build\n"
    assert graph.read_bytes() == b"the graph" * 1000 and cache(folder).check(KEY) is None
    assert sorted(p.suffix for p in folder.iterdir()) == [".json", ".onnx"]


def test_a_filler_that_waits_too_long_goes_on_without_the_graph(tmp_path):
    graph, _ = cache(tmp_path).paths(KEY)
    lines, build = [], Builds()
    with sibling_lock(graph, "the graph cache entry"):  # another process building it (the lock is per open file)
        assert cache(tmp_path, lines, wait_s=0.3).get(KEY, build) is None
    assert build.calls == 0 and len(lines) == 1 and "still building" in lines[0]


# ---- the onnxruntime engine through the cache ------------------------------------------------------------------

@pytest.fixture()
def engine_cache(tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "adaptation-similarity" / "graphs"


def test_the_onnxruntime_engine_matches_torch_at_any_batch_and_reuses_its_graph(engine_cache, tmp_path, capsys):
    from featuresExtractor.backbones import load_backbone, resolve_spec
    from featuresExtractor.extractor import FeatureExtractor

    names = make_pairs(tmp_path / "data", 3, seed=5)
    images = [str(tmp_path / "data" / side / name) for name in names for side in ("left", "right")]
    backbone = load_backbone(resolve_spec("tiny_rn", pretrained="none"))
    torch_fx = FeatureExtractor(backbone, engine="torch")
    for slice_size in (1, 4):
        fx = FeatureExtractor(backbone, engine="onnxruntime")
        got, want = fx.pooled(images, slice_size=slice_size), torch_fx.pooled(images)
        assert fx.engine == "onnxruntime" and set(got) == set(want)
        for tap in want:
            a, b = got[tap].astype(np.float64), want[tap].astype(np.float64)
            cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
            assert a.shape == b.shape == (len(images), b.shape[1]) and cos.min() > 0.9999, tap
    err = capsys.readouterr().err
    assert err.count("built the graph") == 1  # the second extractor read the cached entry
    assert len(list(engine_cache.glob("*.onnx"))) == 1


def test_extract_with_onnxruntime_writes_nothing_beside_the_data_and_survives_an_unwritable_cache(tmp_path, capsys,
                                                                                                 monkeypatch):
    import extract

    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    data = tmp_path / "tll"
    make_pairs(data, 3, seed=2)
    before = sorted(p.relative_to(data) for p in data.rglob("*"))
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    vectors = {}
    for name, cache_home in (("torch", tmp_path / "cache"), ("cached", tmp_path / "cache"), ("unwritable", blocker)):
        monkeypatch.setenv("XDG_CACHE_HOME", str(cache_home))
        out = tmp_path / name
        engine = "torch" if name == "torch" else "onnxruntime"
        code, _, err = run_script(extract, ["-d", data, "-s", out, "-p", "adapt", "--model", "tiny_rn", "--pretrained",
                                            "none", "--workers", "0", "--no-progress", "--engine", engine], capsys)
        assert code == 0, err
        assert json.loads((out / "tiny_rn" / "manifest.json").read_text())["engine"] == engine
        vectors[name] = np.load(out / "tiny_rn" / "features.npy")
        if name == "unwritable":
            assert "cannot write the cache folder" in err and "Traceback" not in err
    assert sorted(p.relative_to(data) for p in data.rglob("*")) == before
    assert len(list((tmp_path / "cache").rglob("*.onnx"))) == 1 and blocker.read_text() == "x"
    for name in ("cached", "unwritable"):
        for side in ("left", "right"):
            a, b = vectors["torch"][side].astype(np.float64), vectors[name][side].astype(np.float64)
            assert ((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).min() > 0.9999
