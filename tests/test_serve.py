"""similarity.py serve (retrieval.serve): the endpoints and every bad input in-process (TestClient); start-up,
readiness, SIGTERM, concurrency and the search page in a real uvicorn process on 127.0.0.1 (torch unimportable)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import similarity
from conftest import ROOT, draw_image, script_cli, torch_free_env

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402

from adaptation.calibration import Threshold  # noqa: E402
from retrieval import index_folder  # noqa: E402
from retrieval import deploy  # noqa: E402
from retrieval.serve import MicroBatcher, ServeConfig, create_app  # noqa: E402
from retrieval.visual_similarity import VisualSimilarity  # noqa: E402
from toolkit.hashing import file_sha256  # noqa: E402

KEY = "test-key-0123456789"


cli = script_cli(similarity)


def linear_export(out: Path, seed: int, dim: int = 16, side: int = 32, threshold: dict | None = None) -> Path:
    """An export folder (`retrieval.deploy`'s format, written by its own `staged` and `write_meta`) whose graph is
    a random linear map of the 32 x 32 pixels, L2-normalised.

    The service treats every export alike; a real backbone's export takes a minute here (test_onnx.py checks
    those), which would make each run of this file that much longer.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(seed).normal(size=(3 * side * side, dim)).astype(np.float32)
    nodes = [helper.make_node("Flatten", ["images"], ["flat"], axis=1), helper.make_node("MatMul", ["flat", "w"], ["y"]),
             helper.make_node("ReduceL2", ["y", "axes"], ["norm"], keepdims=1),
             helper.make_node("Div", ["y", "norm"], ["embedding"])]
    graph = helper.make_graph(
        nodes, "linear", [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 3, side, side])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", dim])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array([1], np.int64), "axes")])
    identity = {"checkpoint_sha256": f"{seed:064d}", "backbone": {"arch": "RandomLinear"}, "pca": None, "out_dim": dim}
    with deploy.staged(out) as tmp:
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), tmp / deploy.ENCODER_FILE)
        preprocess = deploy.Preprocess(side, "bilinear", (side, side), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
        deploy.write_meta(tmp, preprocess, {"identity": identity, "embedding_dim": dim, "batch": None,
                                            "threshold": threshold, "opset": 18})
    return out


THRESHOLD = Threshold(0.9, 1.0, 1.0, 1.0, 0.95, 1.0, 0.95, 4).to_dict()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """An export with a calibrated threshold (0.9); an 8-image gallery indexed with it; a query that is a copy
    of gallery image g3 under another name."""
    root = tmp_path_factory.mktemp("serve")
    linear_export(root / "onnx", 0, threshold=THRESHOLD)
    for i in range(8):
        draw_image(root / "gallery" / f"g{i}.png", 700 + i)
    draw_image(root / "more" / "m0.png", 800)
    draw_image(root / "more" / "m1.png", 801)
    shutil.copy(root / "gallery" / "g3.png", root / "q.png")
    assert similarity.main(["--onnx", str(root / "onnx"), "index", "build", str(root / "gallery"), "-o",
                            str(root / "ix"), "--no-progress"]) == 0
    return {"root": root, "onnx": root / "onnx", "ix": root / "ix", "sim": VisualSimilarity.from_onnx(root / "onnx")}


@pytest.fixture
def index_copy(served, tmp_path) -> Path:
    """A copy of the index, for the tests that add to it or rebuild it."""
    shutil.copytree(served["ix"], tmp_path / "ix")
    return tmp_path / "ix"


@contextlib.contextmanager
def client(index, load, **config):
    """A TestClient of an app serving `index`, once /readyz says it is ready."""
    app = create_app(ServeConfig(str(index), api_key=config.pop("api_key", KEY), **config), load)
    with TestClient(app) as c:
        wait_ready(c.get)
        yield c


def wait_ready(get, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = get("/readyz")
        if r.status_code == 200:
            return r.json()
        assert r.status_code == 503 and "error" in r.json()
        time.sleep(0.05)
    pytest.fail("the server was not ready in time")


def png(path) -> tuple[str, bytes, str]:
    return (Path(path).name, Path(path).read_bytes(), "image/png")


def error_of(r, status: int) -> str:
    """The one-line error of a refused request (and the status it must have)."""
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"} and "\n" not in body["error"] and "Traceback" not in body["error"], body
    return body["error"]


def cli_search(served, index, query, k, capsys) -> list[dict]:
    out = served["root"] / f"hits{time.monotonic_ns()}.json"
    code, _, err = cli(["--onnx", served["onnx"], "search", query, "--index", index, "-k", k, "--json", out], capsys)
    assert code == 0, err
    return json.loads(out.read_text())


# ---------------------------------------------------------------- in-process: the endpoints

def test_endpoints_answer_as_the_cli(served, capsys):
    root, sim = served["root"], served["sim"]
    with client(served["ix"], lambda: VisualSimilarity.from_onnx(served["onnx"])) as c:
        assert c.get("/healthz").json() == {"status": "ok"}
        ready = c.get("/readyz").json()
        assert ready["index"] == {"kind": "flat", "size": 8, "dim": sim.encoder.dim}
        assert ready["encoder"]["runtime"] == "onnxruntime" and ready["encoder"]["arch"] == "RandomLinear"
        for query in (root / "q.png", root / "more" / "m0.png"):
            got = c.post("/v1/search", params={"k": 5}, files={"image": png(query)}).json()
            want = cli_search(served, served["ix"], query, 5, capsys)[0]["matches"]
            assert [r["name"] for r in got["results"]] == [m["name"] for m in want]
            np.testing.assert_allclose([r["score"] for r in got["results"]], [m["score"] for m in want], atol=1e-4)
            assert [r["rank"] for r in got["results"]] == [1, 2, 3, 4, 5] and got["k"] == 5 and got["offset"] == 0
            assert [r["alike"] for r in got["results"]] == [r["score"] >= 0.9 for r in got["results"]]
        assert got["threshold"] == pytest.approx(0.9)
        page = c.post("/v1/search", params={"k": 2, "offset": 3}, files={"image": png(query)}).json()["results"]
        assert [(r["rank"], r["name"]) for r in page] == [(r["rank"], r["name"]) for r in got["results"][3:5]]
        tail = c.post("/v1/search", params={"k": 10, "offset": 6}, files={"image": png(query)}).json()["results"]
        assert [r["rank"] for r in tail] == [7, 8]  # the end of an 8-image index
        # an embedding (from /v1/embed) searched as JSON ranks as the image does
        emb = c.post("/v1/embed", files={"image": png(query)}).json()
        assert emb["dim"] == len(emb["embedding"]) == sim.encoder.dim
        assert abs(np.linalg.norm(emb["embedding"]) - 1) < 1e-5
        np.testing.assert_allclose(emb["embedding"], sim.embed([query])[0], atol=1e-5)
        by_vec = c.post("/v1/search", params={"k": 5}, json={"embedding": emb["embedding"]}).json()["results"]
        assert [r["name"] for r in by_vec] == [r["name"] for r in got["results"]]
        # /v1/score: what `similarity.py pair` gives (its API, and its printed 4 decimals)
        a, b = root / "q.png", root / "more" / "m1.png"
        score = c.post("/v1/score", files={"a": png(a), "b": png(b)}).json()
        verdict = sim.judge(a, b)
        assert abs(score["score"] - verdict.score) < 1e-4 and score["threshold"] == pytest.approx(verdict.threshold)
        assert score["alike"] == verdict.alike
        code, out, _ = cli(["--onnx", served["onnx"], "pair", a, b], capsys)
        assert code == 0 and f"adapted similarity  {score['score']:.4f}" in out
        info = c.get("/v1/index").json()
        assert info["size"] == 8 and info["manifest_sha256"] == file_sha256(served["ix"] / "manifest.json")
        thumb = Image.open(io.BytesIO(c.get("/v1/images/g3.png", params={"size": 64}).content))
        assert thumb.format == "JPEG" and thumb.size == (53, 64)  # the 80 x 96 image, its aspect kept
        page = c.get("/").text
        assert "<input" in page and "v1/search" in page and "http://" not in page and "https://" not in page
        metrics = c.get("/metrics").text
        assert 'similarity_requests_total{route="/v1/search",status="200"}' in metrics
        assert "similarity_batch_size_count" in metrics and "similarity_request_seconds_bucket" in metrics


def test_the_run_path_serves_too(served, tiny_backbone, tmp_path):
    from onnx_paths import memory_sim

    sim = memory_sim(tiny_backbone)  # a run's torch path: tiny random backbone, PCA and adaptation
    sim.build_index(served["root"] / "gallery", tmp_path / "ix", progress=False)
    with client(tmp_path / "ix", lambda: sim) as c:
        assert c.get("/readyz").json()["encoder"]["runtime"] == "torch"
        got = c.post("/v1/search", params={"k": 3}, files={"image": png(served["root"] / "q.png")}).json()["results"]
    want = sim.search(served["root"] / "q.png", sim.load_index(tmp_path / "ix"), k=3)
    assert [r["name"] for r in got] == [m.name for m in want] and got[0]["name"] == "g3.png"
    np.testing.assert_allclose([r["score"] for r in got], [m.score for m in want], atol=1e-4)


def test_readyz_waits_for_the_load_and_a_failed_load_is_kept(served):
    gate = threading.Event()

    def slow_load():
        gate.wait(30)
        return VisualSimilarity.from_onnx(served["onnx"])

    app = create_app(ServeConfig(str(served["ix"])), slow_load)
    with TestClient(app) as c:
        assert "loading" in error_of(c.get("/readyz"), 503)
        assert "loading" in error_of(c.post("/v1/search", files={"image": png(served["root"] / "q.png")}), 503)
        assert c.get("/healthz").status_code == 200
        gate.set()
        assert wait_ready(c.get)["index"]["size"] == 8
    (served["root"] / "noindex").mkdir(exist_ok=True)
    app = create_app(ServeConfig(str(served["root"] / "noindex")), lambda: VisualSimilarity.from_onnx(served["onnx"]))
    with TestClient(app) as c:
        deadline = time.monotonic() + 30
        while app.state.service.failure is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "not an index folder" in app.state.service.failure
        assert c.get("/readyz").status_code == 503


def bomb() -> bytes:
    """A 12000 x 12000 PNG of a few kB: over Pillow's decompression-bomb limit (about 89 M pixels)."""
    buf = io.BytesIO()
    Image.new("1", (12000, 12000)).save(buf, format="PNG")
    return buf.getvalue()


def test_every_bad_input_is_one_line_and_the_server_goes_on(served, tmp_path):
    root = served["root"]
    good = root / "q.png"
    data = good.read_bytes()
    outside = draw_image(tmp_path / "outside" / "secret.png", 5)
    gallery = tmp_path / "gal"
    for i in range(3):
        draw_image(gallery / f"s{i}.png", 900 + i)
    assert similarity.main(["--onnx", str(served["onnx"]), "index", "build", str(gallery), "-o", str(tmp_path / "ix"),
                            "--no-progress"]) == 0
    (gallery / "s1.png").unlink()
    (gallery / "s1.png").symlink_to(outside)  # an indexed name whose file now leads out of the gallery
    with client(tmp_path / "ix", lambda: VisualSimilarity.from_onnx(served["onnx"]), max_upload_mb=0.5) as c:
        big = Image.frombytes("RGB", (600, 600), os.urandom(600 * 600 * 3))
        buf = io.BytesIO()
        big.save(buf, format="PNG")
        cases = [
            (c.post("/v1/search", files={"image": ("x.png", b"plain text, not an image")}), 400, "not a readable image"),
            (c.post("/v1/search", files={"image": ("x.png", data[:len(data) // 2])}), 400, "not a readable image"),
            (c.post("/v1/search", files={"image": ("x.png", b"")}), 400, "empty"),
            (c.post("/v1/search", files={"image": ("b.png", bomb())}), 400, "ecompression"),
            (c.post("/v1/search", files={"image": ("big.png", buf.getvalue())}), 413, "--max-upload-mb"),
            (c.post("/v1/search", content=(b"x" * 65536 for _ in range(16)),  # chunked: no Content-Length
                    headers={"content-type": "multipart/form-data; boundary=zz"}), 413, "--max-upload-mb"),
            (c.post("/v1/search", params={"k": 0}, files={"image": png(good)}), 422, "k"),
            (c.post("/v1/search", params={"k": 1001}, files={"image": png(good)}), 422, "k"),
            (c.post("/v1/search", params={"k": "ten"}, files={"image": png(good)}), 422, "k"),
            (c.post("/v1/search", params={"offset": -1}, files={"image": png(good)}), 422, "offset"),
            (c.post("/v1/search", data={"image": "http://127.0.0.1:1/a.png"}), 400, "URLs are not fetched"),
            (c.post("/v1/search", data={"image": "http://127.0.0.1:1/a.png"}, files={"other": png(good)}), 400,
             "URLs are not fetched"),
            (c.post("/v1/search", json={"url": "http://127.0.0.1:1/a.png"}), 422, "embedding"),
            (c.post("/v1/search", json={"embedding": [1.0, 2.0]}), 422, "embedding"),
            (c.post("/v1/search", content=json.dumps({"embedding": [float("nan")] * served["sim"].encoder.dim}),
                    headers={"content-type": "application/json"}), 422, "finite"),
            (c.post("/v1/search", content=b"{not json", headers={"content-type": "application/json"}), 400, "JSON"),
            (c.post("/v1/search", content=b"raw bytes"), 400, "multipart"),
            (c.post("/v1/score", files={"a": png(good)}), 400, "'b'"),
            (c.get("/v1/images/nothere.png"), 404, "no image named"),
            (c.get("/v1/images/%2e%2e/outside/secret.png"), 404, ""),
            (c.get("/v1/images/..%2f..%2fetc%2fpasswd"), 404, ""),
            (c.get(f"/v1/images/{outside}"), 404, ""),
            (c.get("/v1/images/s1.png"), 404, "not a file in its gallery folder"),
            (c.get("/v1/images/s0.png", params={"size": 100000}), 422, "size"),
            (c.get("/no/such/route"), 404, ""),
            (c.post("/v1/index/add", files={"images": png(good)}), 401, "X-API-Key"),
            (c.post("/v1/index/add", files={"images": png(good)}, headers={"X-API-Key": "wrong"}), 403, "wrong"),
            (c.post("/admin/reload", headers={"X-API-Key": KEY + "x"}), 403, "wrong"),
        ]
        for r, status, words in cases:
            assert words in error_of(r, status), (status, words, r.text)
            assert c.post("/v1/search", params={"k": 1}, files={"image": png(good)}).status_code == 200
        assert c.get("/v1/images/s0.png").status_code == 200
    with client(served["ix"], lambda: VisualSimilarity.from_onnx(served["onnx"]), api_key=None) as c:
        assert "without --api-key-file" in error_of(c.post("/admin/reload", headers={"X-API-Key": KEY}), 403)


def test_add_and_reload(served, index_copy, capsys):
    root = served["root"]
    with client(index_copy, lambda: VisualSimilarity.from_onnx(served["onnx"])) as c:
        before = c.get("/v1/index").json()
        r = c.post("/v1/index/add", files=[("images", png(root / "more" / "m0.png"))], headers={"X-API-Key": KEY})
        assert r.status_code == 200 and r.json()["added"] == 1 and r.json()["size"] == 9
        top = c.post("/v1/search", params={"k": 1}, files={"image": png(root / "more" / "m0.png")}).json()["results"][0]
        assert top["name"].endswith("-m0.png") and top["score"] > 0.9999  # found at once
        assert c.get(f"/v1/images/{top['name']}").status_code == 200
        again = c.post("/v1/index/add", files=[("images", png(root / "more" / "m0.png"))], headers={"X-API-Key": KEY})
        assert again.json()["added"] == 0 and again.json()["size"] == 9
        assert [p.name for p in Path(f"{index_copy}.uploads").iterdir()] == [top["name"]]
        assert cli_search(served, index_copy, root / "more" / "m0.png", 1, capsys)[0]["matches"][0]["name"] == top["name"]
        # the folder is being written by someone else: refused, nothing kept, still serving
        with index_folder.locked(index_copy):
            r = c.post("/v1/index/add", files=[("images", png(root / "more" / "m1.png"))], headers={"X-API-Key": KEY})
            assert "being written" in error_of(r, 409)
            assert "being written" in error_of(c.post("/admin/reload", headers={"X-API-Key": KEY}), 409)
        assert len(list(Path(f"{index_copy}.uploads").iterdir())) == 1
        # rebuilt on disk by the CLI, then reloaded
        code, _, _ = cli(["--onnx", served["onnx"], "index", "add", index_copy, root / "more", "--no-progress"], capsys)
        assert code == 0
        assert c.get("/v1/index").json()["size"] == 9
        r = c.post("/admin/reload", headers={"X-API-Key": KEY}).json()
        assert r["size"] == 11 and r["manifest_sha256"] != before["manifest_sha256"]
        # a damaged folder is not swapped in
        names = index_copy / "names.json"
        names.write_text(names.read_text().replace("g1.png", "gX.png"))
        assert "still serving" in error_of(c.post("/admin/reload", headers={"X-API-Key": KEY}), 409)
        assert c.get("/v1/index").json()["size"] == 11


def test_micro_batcher_groups_requests_that_arrive_together():
    seen = []

    def encode(images):
        seen.append(len(images))
        return np.asarray(images, dtype=np.float32)[:, None]

    batcher = MicroBatcher(encode, max_batch=6, max_wait_s=2.0).start()
    futures = [batcher.submit([i, i + 100]) for i in range(4)]  # 8 images: one batch of 6 (3 jobs), then 2
    assert [f.result(10)[:, 0].tolist() for f in futures] == [[i, i + 100] for i in range(4)]
    assert seen == [6, 2]
    batcher.stop()
    seen.clear()
    alone = MicroBatcher(encode, max_batch=1, max_wait_s=2.0).start()
    t = time.monotonic()
    assert [alone.submit([i]).result(10)[0, 0] for i in range(3)] == [0, 1, 2]
    assert seen == [1, 1, 1] and time.monotonic() - t < 1.5  # batch 1 never waits
    alone.stop()

    def broken(images):
        raise RuntimeError("encoder failed")

    failing = MicroBatcher(broken, max_batch=4, max_wait_s=0.01).start()
    with pytest.raises(RuntimeError, match="encoder failed"):
        failing.submit([1]).result(10)
    assert failing.thread.is_alive()  # the worker survives a failed batch
    failing.stop()


# ---------------------------------------------------------------- a real uvicorn process on 127.0.0.1

class Server:
    """`similarity.py --onnx EXPORT serve` in its own session, torch and open_clip made unimportable."""

    def __init__(self, served, tmp_path, index, *extra):
        (tmp_path / "key").write_text(KEY + "\n")
        env = torch_free_env(tmp_path / "block", PYTHONUNBUFFERED="1")
        cmd = [sys.executable, str(ROOT / "similarity.py"), "--onnx", str(served["onnx"]), "serve", "--index",
               str(index), "--port", "0", "--api-key-file", str(tmp_path / "key"), *map(str, extra)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                     start_new_session=True, cwd=tmp_path)
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [self.lines.put(l) for l in self.proc.stdout], daemon=True).start()
        self.url = None

    def line(self, timeout: float = 60) -> str:
        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            pytest.fail("the server printed nothing in time")

    def ready(self) -> str:
        first = self.line()
        assert first.startswith("listening on http://127.0.0.1:"), first
        self.url = first.split()[2]
        assert self.line().strip() == f"ready: {self.url}"
        return self.url

    def end(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)


@pytest.fixture
def start_server(served, tmp_path):
    """Start servers; every one is killed by its pid (its process group) when the test ends, failed or not."""
    started = []

    def start(index, *extra) -> Server:
        server = Server(served, tmp_path, index, *extra)
        started.append(server)
        return server

    try:
        yield start
    finally:
        for server in started:
            server.end()


def test_startup_readiness_no_torch_and_sigterm(served, start_server):
    server = start_server(served["ix"], "--max-wait-ms", 2000)  # a lone query waits 2 s for batch-mates
    url = server.ready()
    with httpx.Client(base_url=url, timeout=30) as c:
        assert c.get("readyz").json()["index"]["size"] == 8
        maps = Path(f"/proc/{server.proc.pid}/maps").read_text()
        assert "libtorch" not in maps and "open_clip" not in maps
        result = {}
        slow = threading.Thread(target=lambda: result.update(r=c.post("v1/search", files={"image": png(
            served["root"] / "q.png")})))
        slow.start()
        time.sleep(0.5)
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        with httpx.Client(base_url=url, timeout=10) as other:
            assert "shutting down" in error_of(other.get("readyz"), 503)
            assert "shutting down" in error_of(other.post("v1/search", files={"image": png(served["root"] / "q.png")}), 503)
        slow.join(30)
    assert result["r"].status_code == 200 and result["r"].json()["results"][0]["name"] == "g3.png"  # it finished
    assert server.proc.wait(30) == 0
    assert "Traceback" not in server.proc.stderr.read()


def test_startup_refuses_damaged_or_mismatched(served, start_server, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(served["ix"], damaged)
    (damaged / "names.json").write_text((damaged / "names.json").read_text().replace("g1", "gZ"))
    other = tmp_path / "other_ix"  # built with another export
    linear_export(tmp_path / "other_onnx", 1)
    assert similarity.main(["--onnx", str(tmp_path / "other_onnx"), "index", "build", str(served["root"] / "gallery"),
                            "-o", str(other), "--no-progress"]) == 0
    (tmp_path / "empty").mkdir()
    for index, words in ((damaged, "damaged"), (other, "was built with another run"), (tmp_path / "empty", "not an index folder")):
        server = start_server(index)
        assert server.proc.wait(60) == 2
        err = server.proc.stderr.read()
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("similarity.py: error:") and words in lines[0], err


def test_searches_during_add_and_reload_see_before_or_after(served, start_server, index_copy, capsys):
    root = served["root"]
    server = start_server(index_copy)
    url = server.ready()
    states, failures, seen = [], [], []
    stop = threading.Event()

    def searcher():
        try:
            with httpx.Client(base_url=url, timeout=30) as c:
                for _ in range(400):  # bounded
                    if stop.is_set():
                        return
                    r = c.post("v1/search", params={"k": 1000}, json={"embedding": emb})
                    if r.status_code != 200:
                        failures.append(r.text)
                    else:
                        seen.append(frozenset(x["name"] for x in r.json()["results"]))
        except httpx.HTTPError as err:  # the server went away: reported by the test, not as a stray thread error
            failures.append(repr(err))

    with httpx.Client(base_url=url, timeout=60) as c:
        emb = c.post("v1/embed", files={"image": png(root / "q.png")}).json()["embedding"]

        def names():
            return frozenset(x["name"] for x in c.post("v1/search", params={"k": 1000}, json={"embedding": emb}).json()["results"])

        states.append(names())
        threads = [threading.Thread(target=searcher) for _ in range(3)]
        for t in threads:
            t.start()
        key = {"X-API-Key": KEY}
        assert c.post("v1/index/add", files=[("images", png(root / "more" / "m0.png"))], headers=key).status_code == 200
        states.append(names())
        assert cli(["--onnx", served["onnx"], "index", "add", index_copy, root / "more", "--no-progress"], capsys)[0] == 0
        assert c.post("admin/reload", headers=key).json()["size"] == 11  # m0 (the CLI's copy) and m1
        states.append(names())
        assert c.post("v1/index/add", files=[("images", png(root / "gallery" / "g2.png"))], headers=key).status_code == 200
        states.append(names())
        stop.set()
        for t in threads:
            t.join(60)
    assert not any(t.is_alive() for t in threads)
    assert not failures and seen
    assert [len(s) for s in states] == [8, 9, 11, 12]
    assert set(seen) <= set(states), "a search saw a partial index"


def test_the_search_page_in_chromium(served, start_server, tmp_path):
    chromium = shutil.which("chromium")
    if chromium is None:
        print("SKIP: Debian's chromium is not installed (make test installs it as root: apt-get install chromium)")
        pytest.skip("Debian's chromium is not installed (make test installs it where it can: apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (requirements-dev.txt)")
    server = start_server(served["ix"])
    url = server.ready()
    want = httpx.post(url + "v1/search", params={"k": 5}, files={"image": png(served["root"] / "q.png")}).json()
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 700})
            page.goto(url, timeout=30_000)
            page.fill("#k", "5")
            page.set_input_files("#file", str(served["root"] / "q.png"))
            page.wait_for_selector(".card", timeout=30_000)
            page.wait_for_function("Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)",
                                   timeout=30_000)
            cards = page.query_selector_all(".card")
            first = cards[0]
            assert len(cards) == 5 and first.get_attribute("data-name") == "g3.png" == want["results"][0]["name"]
            assert first.query_selector(".score").inner_text() == f"{want['results'][0]['score']:.4f}"
            assert first.query_selector(".verdict").inner_text().strip() == "alike"
            page.screenshot(path=str(tmp_path / "search_page.png"), full_page=True)
        finally:
            browser.close()
    assert (tmp_path / "search_page.png").stat().st_size > 1000
    print(f"screenshot: {tmp_path / 'search_page.png'}")
