"""A search service over a run or an ONNX export and an index folder: `similarity.py ... serve` (FastAPI + uvicorn).

    python similarity.py --onnx RUN1_ONNX serve --index INDEX_DIR [--port 8000] [--api-key-file KEY]

Endpoints (JSON; every error is a 4xx or 5xx with `{"error": "one line"}`, never a traceback):

- `GET /healthz`: 200 while the process runs. `GET /readyz`: 503 until the encoder and the index are
  loaded (in the background, after the port is bound), then the encoder's identity and the index's size.
- `POST /v1/search` (multipart `image`, or JSON `{"embedding": [...]}`; query `k` 1..1000, `offset`):
  the ranked names and adapted cosines that `similarity.py search --index` gives, each with its verdict
  under the run's calibrated threshold (null without one). `POST /v1/score` (`a`, `b`): what
  `similarity.py pair` prints. `POST /v1/embed` (`image`): the L2-normalised adapted embedding.
- `GET /v1/index`; `POST /v1/index/add` (`X-API-Key`; multipart images): the images are kept in the
  uploads folder and appended through `VisualSimilarity.add_to_index` (the index folder's own code and
  lock); `POST /admin/reload` (`X-API-Key`): the index folder read again, aside, then swapped in.
- `GET /metrics` (Prometheus), `GET /` (the search page, `serve_page.html`), `GET /v1/images/{name}`
  (a JPEG thumbnail of an indexed image, nothing else).

Queries are encoded by one worker thread in micro-batches (`MicroBatcher`: up to `max_batch` images,
waiting at most `max_wait_ms` for more). Searches read an immutable snapshot of the index that an add
or a reload replaces in one assignment, so a search sees the index before or after, never in between.
SIGTERM (or Ctrl-C): new requests get 503, those in flight finish, then the process exits 0.
Nothing here imports torch: with `--onnx` neither torch nor open_clip is ever loaded.
No URL is ever fetched: images come in the request body only.

Example:
    >>> app = create_app(ServeConfig("photos_index"), lambda: VisualSimilarity.from_onnx("rn50x4_onnx"))  # doctest: +SKIP
"""

# No `from __future__ import annotations`: FastAPI reads the routes' annotations (Request, Query), which are
# imported inside the functions that define the routes (FastAPI is imported only when serving).
import asyncio
import concurrent.futures
import contextlib
import hashlib
import hmac
import io
import math
import os
import queue
import re
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image, ImageOps

from featuresExtractor.transforms import BadImage, decode_image, load_image
from toolkit.hashing import file_sha256
from toolkit.utils import UserError, atomic_path, first_line

from . import index_folder
from .backend import VectorIndex
from .index import normalise

__all__ = ["ServeConfig", "MicroBatcher", "create_app", "run_server", "read_api_key", "EXTRA", "MAX_K"]

EXTRA = "pip install 'adaptation-similarity[serve]' (or: pip install fastapi uvicorn python-multipart prometheus-client)"
MAX_K = 1000
PAGE_FILE = Path(__file__).with_name("serve_page.html")
THUMB_SIZES = (64, 128, 256)
QUEUE_LIMIT = 1024  # encoding jobs waiting at most; more get 503 rather than unbounded memory
UPLOAD_NAME = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class ServeConfig:
    """How to serve: the index folder, where to listen, the limits and the micro-batching.

    `api_key` is the key itself (read from `--api-key-file` at the edge), None to refuse every
    write. `uploads` is where added images are kept (default: `INDEX_DIR.uploads` beside the index).
    `drain_s` bounds how long SIGTERM waits for requests in flight.
    """

    index: str
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_batch: int = 16
    max_wait_ms: float = 5.0
    max_upload_mb: float = 20.0
    uploads: str | None = None
    drain_s: float = 30.0

    def __post_init__(self):
        if not 1 <= self.max_batch <= 1024:
            raise UserError(f"--max-batch must be between 1 and 1024 (got {self.max_batch})")
        if not 0 <= self.max_wait_ms <= 10_000:
            raise UserError(f"--max-wait-ms must be between 0 and 10000 (got {self.max_wait_ms})")
        if not 0 < self.max_upload_mb <= 1024:
            raise UserError(f"--max-upload-mb must be above 0 and at most 1024 (got {self.max_upload_mb})")
        if not 0 <= self.port <= 65535:
            raise UserError(f"--port must be between 0 and 65535 (got {self.port})")

    @property
    def uploads_dir(self) -> Path:
        return Path(self.uploads) if self.uploads else Path(f"{os.path.normpath(self.index)}.uploads")


def read_api_key(path: str | os.PathLike) -> str:
    """The API key in `path` (its first line, stripped); a `UserError` when unreadable or empty."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read --api-key-file {path} ({first_line(err)})") from None
    key = text.strip().splitlines()[0].strip() if text.strip() else ""
    if len(key) < 8:
        raise UserError(f"--api-key-file {path} holds no key of at least 8 characters on its first line")
    return key


class ApiError(Exception):
    """A request refused: its HTTP status and the one line the client gets as {"error": ...}."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class _TooLarge(Exception):
    """A request body over --max-upload-mb (raised while it is received)."""


# ---------------------------------------------------------------- micro-batching

class MicroBatcher:
    """One worker thread that encodes the images of requests arriving together as one batch.

    `submit(images)` queues a job (a list of decoded images) and returns a future of its (n, d)
    rows. The worker takes the first waiting job, then more until `max_batch` images are
    gathered or `max_wait_s` has passed since the first, encodes them with one `encode` call,
    and hands each job its rows. `max_batch=1` encodes each job alone, at once (no batching).
    `on_batch(n)` is called with each batch's image count (for the metrics).
    """

    def __init__(self, encode: Callable[[list], np.ndarray], max_batch: int, max_wait_s: float,
                 on_batch: Callable[[int], None] | None = None):
        self.encode, self.max_batch, self.max_wait_s, self.on_batch = encode, max_batch, max_wait_s, on_batch
        self.jobs: queue.Queue = queue.Queue(maxsize=QUEUE_LIMIT)
        self.thread = threading.Thread(target=self._work, name="micro-batcher", daemon=True)

    def start(self) -> "MicroBatcher":
        self.thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the queued jobs, then end the worker."""
        if self.thread.is_alive():
            self.jobs.put(None)
            self.thread.join(timeout)

    def submit(self, images: list) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        try:
            self.jobs.put_nowait((images, fut))
        except queue.Full:
            raise ApiError(503, f"the server is busy ({QUEUE_LIMIT} encodings waiting); retry shortly") from None
        return fut

    def _gather(self, first) -> tuple[list, bool]:
        """The jobs of one batch, starting with `first`; and whether the stop mark was met."""
        batch, count = [first], len(first[0])
        deadline = time.monotonic() + self.max_wait_s
        while count < self.max_batch:
            left = deadline - time.monotonic()
            try:
                job = self.jobs.get(timeout=left) if left > 0 else self.jobs.get_nowait()
            except queue.Empty:
                break
            if job is None:
                return batch, True
            batch.append(job)
            count += len(job[0])
        return batch, False

    def _work(self) -> None:
        stop = False
        while not stop:
            first = self.jobs.get()
            if first is None:
                break
            batch, stop = self._gather(first)
            images = [im for job, _ in batch for im in job]
            try:
                rows = self.encode(images)
            except Exception as err:  # noqa: BLE001 - the worker must survive, and each request learns why
                for _, fut in batch:
                    fut.set_exception(err)
                continue
            if self.on_batch:
                self.on_batch(len(images))
            start = 0
            for job, fut in batch:
                fut.set_result(rows[start:start + len(job)])
                start += len(job)


# ---------------------------------------------------------------- the served state

@dataclass(frozen=True)
class Snapshot:
    """The index as searches see it: never changed once made; an add or reload makes a new one."""

    index: VectorIndex  # faiss or Milvus (retrieval.backend): searched through the one interface
    by_name: dict[str, int]
    manifest_sha256: str
    # faiss searches are thread-safe, but the faiss SimilarityIndex.search sets an hnsw index's efSearch for each k
    # first: one search at a time per snapshot (searching is quick next to encoding a query).
    searching: threading.Lock = field(default_factory=threading.Lock, compare=False)

    @classmethod
    def of(cls, index: VectorIndex, folder: str | os.PathLike) -> "Snapshot":
        by_name: dict[str, int] = {}
        for i, name in enumerate(index.names):
            by_name.setdefault(name, i)
        return cls(index, by_name, file_sha256(Path(folder) / index_folder.MANIFEST_FILE))

    def describe(self) -> dict:
        return {"kind": self.index.kind, "size": len(self.index), "dim": self.index.dim}


@dataclass
class Service:
    """What the endpoints share: the loaded encoder, the current snapshot, the batcher, the metrics."""

    config: ServeConfig
    load: Callable[[], Any]
    metrics: Any
    sim: Any = None
    encoder_info: dict | None = None
    snapshot: Snapshot | None = None
    batcher: MicroBatcher | None = None
    failure: str | None = None
    draining: bool = False
    inflight: int = 0
    writing: threading.Lock = field(default_factory=threading.Lock)
    request_exit: Callable[[], None] = lambda: None
    url: str | None = None  # printed once ready (run_server)

    def ready(self) -> bool:
        return self.snapshot is not None and self.batcher is not None and not self.draining

    def require_ready(self) -> Snapshot:
        if self.draining:
            raise ApiError(503, "the server is shutting down")
        if self.snapshot is None or self.batcher is None:
            raise ApiError(503, "the encoder and the index are still loading; retry when /readyz answers 200")
        return self.snapshot

    def start(self) -> None:
        """Load the encoder and the index (in a thread); on failure keep the one line and ask to exit."""
        try:
            sim = self.load()
            identity = sim.identity()
            index = sim.load_index(self.config.index)
            self.sim = sim
            self.encoder_info = {"runtime": "onnxruntime" if sim.onnx else "torch",
                                 "arch": identity.get("backbone", {}).get("arch"),
                                 "checkpoint_sha256": identity.get("checkpoint_sha256"),
                                 "dim": int(identity.get("out_dim") or index.dim)}
            self.snapshot = Snapshot.of(index, self.config.index)
            self.batcher = MicroBatcher(self.encode, self.config.max_batch, self.config.max_wait_ms / 1000,
                                        self.metrics.batch.observe).start()
            if self.url:
                print(f"ready: {self.url}", flush=True)
        except UserError as err:
            self.failure = str(err)
            self.request_exit()
        except Exception as err:  # noqa: BLE001 - reported as one line, then the process exits 1
            self.failure = f"cannot start: {first_line(err)}"
            self.request_exit()

    def encode(self, images: list) -> np.ndarray:
        """L2-normalised adapted rows of decoded images (the batcher's one call per batch)."""
        return normalise(np.asarray(self.sim.embed(images)))

    async def embed(self, images: list) -> np.ndarray:
        assert self.batcher is not None
        return await asyncio.wrap_future(self.batcher.submit(images))


class Metrics:
    """The Prometheus series of one app (its own registry, so two apps in one process do not clash)."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("similarity_requests", "HTTP requests", ["route", "status"], registry=self.registry)
        self.errors = Counter("similarity_errors", "HTTP requests answered 4xx or 5xx", ["route", "status"],
                              registry=self.registry)
        self.latency = Histogram("similarity_request_seconds", "request latency", ["route"], registry=self.registry,
                                 buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))
        self.batch = Histogram("similarity_batch_size", "images per encoder batch", registry=self.registry,
                               buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 1024))

    def text(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


# ---------------------------------------------------------------- the guard: limits, draining, metrics

class Guard:
    """ASGI middleware: 503 while draining, 413 over the upload limit, in-flight count and metrics."""

    def __init__(self, app, service: Service):
        self.app, self.service = app, service
        self.limit = int(service.config.max_upload_mb * 1024 * 1024)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        svc, started, status = self.service, time.perf_counter(), [500]
        received = [0]

        async def counting_receive():
            message = await receive()
            received[0] += len(message.get("body", b""))
            if received[0] > self.limit:
                raise _TooLarge()
            return message

        async def recording_send(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        length = dict(scope.get("headers") or []).get(b"content-length")
        svc.inflight += 1
        try:
            if svc.draining and scope["path"] != "/healthz":
                await _send_error(recording_send, 503, "the server is shutting down")
            elif length is not None and (not length.isdigit() or int(length) > self.limit):
                await _send_error(recording_send, 413, self._too_large())
            else:
                await self.app(scope, counting_receive, recording_send)
        finally:
            svc.inflight -= 1
            route = getattr(scope.get("route"), "path", "unmatched")
            svc.metrics.requests.labels(route, str(status[0])).inc()
            svc.metrics.latency.labels(route).observe(time.perf_counter() - started)
            if status[0] >= 400:
                svc.metrics.errors.labels(route, str(status[0])).inc()

    def _too_large(self) -> str:
        return _too_large_line(self.service.config)


def _too_large_line(config: ServeConfig) -> str:
    return f"the request is over --max-upload-mb {config.max_upload_mb:g}; send a smaller image"


async def _send_error(send, status: int, message: str) -> None:
    import json

    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


# ---------------------------------------------------------------- the app

def create_app(config: ServeConfig, load: Callable[[], Any]):
    """The FastAPI app serving `config.index` with the `VisualSimilarity` that `load()` returns.

    Loading starts with the app (its lifespan), in a thread: /readyz answers 503 until it is done.
    A load that fails (a damaged or mismatched index or export) is kept in `app.state.service.failure`
    and asks the server to stop (`run_server` then exits 2 with that line).
    """
    fastapi = _fastapi()
    service = Service(config, load, Metrics())

    @contextlib.asynccontextmanager
    async def lifespan(app):
        threading.Thread(target=service.start, name="loader", daemon=True).start()
        watcher = asyncio.create_task(_drain_watch(service))
        try:
            yield
        finally:
            watcher.cancel()
            if service.batcher is not None:
                await asyncio.to_thread(service.batcher.stop)

    app = fastapi.FastAPI(title="visual similarity", lifespan=lifespan, docs_url=None, redoc_url=None,
                          openapi_url=None)
    app.state.service = service
    app.add_middleware(Guard, service=service)
    _add_error_handlers(app, service)
    _add_status_routes(app, service)
    _add_query_routes(app, service)
    _add_index_routes(app, service)
    return app


def _fastapi():
    try:
        import fastapi
        import python_multipart  # noqa: F401 - which FastAPI parses forms with
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as err:
        raise UserError(f"{err.name} is not installed: {EXTRA}") from None
    return fastapi


async def _drain_watch(service: Service) -> None:
    """Once draining (SIGTERM), wait for the requests in flight (at most `drain_s`), then ask to exit."""
    while not service.draining:
        await asyncio.sleep(0.05)
    deadline = time.monotonic() + service.config.drain_s
    while service.inflight > 0 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    service.request_exit()


def _error(status: int, message: str):
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": message}, status_code=status)


def _add_error_handlers(app, service: Service) -> None:
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    @app.exception_handler(ApiError)
    async def api_error(request, err: ApiError):
        return _error(err.status, str(err))

    @app.exception_handler(_TooLarge)
    async def too_large(request, err):
        return _error(413, _too_large_line(service.config))

    @app.exception_handler(RequestValidationError)
    async def invalid(request, err: RequestValidationError):
        first = err.errors()[0] if err.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("query", "path", "body"))
        got = f" (got {first['input']!r})" if "input" in first and not isinstance(first["input"], (dict, list)) else ""
        return _error(422, f"{where}: {first.get('msg', 'invalid')}{got}".strip(": "))

    @app.exception_handler(HTTPException)
    async def http_error(request, err: HTTPException):
        detail = str(err.detail or "request refused").strip().splitlines() or ["request refused"]
        return _error(err.status_code, detail[0])

    @app.exception_handler(Exception)
    async def internal(request, err: Exception):  # a bug: one line to the client and to the log
        print(f"similarity.py serve: {request.url.path}: {first_line(err)}", file=sys.stderr, flush=True)
        return _error(500, f"internal error ({type(err).__name__}); see the server's log")


def _add_status_routes(app, service: Service) -> None:
    from fastapi.responses import HTMLResponse, Response

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        if not service.ready():
            raise ApiError(503, "shutting down" if service.draining else "loading the encoder and the index")
        return {"encoder": service.encoder_info, "index": service.snapshot.describe()}

    @app.get("/metrics")
    async def metrics():
        return Response(service.metrics.text(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/")
    async def page():
        return HTMLResponse(PAGE_FILE.read_text(encoding="utf-8"))

    @app.get("/v1/index")
    async def index_info():
        snap = service.require_ready()
        return {**snap.describe(), "encoder": service.encoder_info, "manifest_sha256": snap.manifest_sha256,
                "threshold": _threshold(service)}

    @app.get("/v1/images/{name:path}")
    async def image(name: str, size: int = 128):
        if size not in THUMB_SIZES:
            raise ApiError(422, f"size must be one of {', '.join(map(str, THUMB_SIZES))} (got {size})")
        snap = service.require_ready()
        data = await asyncio.to_thread(_thumbnail, snap, name, size)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "no-store"})


def _add_query_routes(app, service: Service) -> None:
    from fastapi import Query, Request

    @app.post("/v1/search")
    async def search(request: Request, k: int = Query(10, ge=1, le=MAX_K), offset: int = Query(0, ge=0, le=10 ** 6)):
        service.require_ready()
        if request.headers.get("content-type", "").split(";")[0].strip() == "application/json":
            query = _embedding_body(await _json(request), service.snapshot.index.dim)
        else:
            query = (await service.embed([await _image(request, "image")]))[0]
        snap = service.snapshot  # the newest: images added while this query was encoded are found
        results = await asyncio.to_thread(_ranked, snap, query, k, offset)
        for r in results:
            r["alike"] = service.sim.verdict(r["score"]).alike
        return {"results": results, "k": k, "offset": offset, "threshold": _threshold(service)}

    @app.post("/v1/score")
    async def score(request: Request):
        service.require_ready()
        form = await _form(request)
        a, b = await _decode(form, "a"), await _decode(form, "b")
        rows = await service.embed([a, b])
        verdict = service.sim.verdict(float(np.clip(rows[0] @ rows[1], -1.0, 1.0)))
        return {"score": verdict.score, "alike": verdict.alike, "threshold": verdict.threshold}

    @app.post("/v1/embed")
    async def embed(request: Request):
        service.require_ready()
        row = (await service.embed([await _image(request, "image")]))[0]
        return {"embedding": [float(x) for x in row], "dim": int(row.shape[0])}


def _add_index_routes(app, service: Service) -> None:
    from fastapi import Request

    @app.post("/v1/index/add")
    async def add(request: Request):
        _check_key(request, service)
        service.require_ready()
        form = await _form(request)
        uploads = [(v.filename or "upload", v) for _, v in form.multi_items() if hasattr(v, "read")]
        if not uploads:
            raise ApiError(400, "no image: send the images as multipart files (any field name, e.g. images)")
        images = [(name, data, await _decode_bytes(data, name)) for name, data in
                  [(n, await f.read()) for n, f in uploads]]
        added, snap = await asyncio.to_thread(_add, service, images)
        return {"added": added, "size": len(snap.index), "manifest_sha256": snap.manifest_sha256}

    @app.post("/admin/reload")
    async def reload(request: Request):
        _check_key(request, service)
        service.require_ready()
        snap = await asyncio.to_thread(_reload, service)
        return {**snap.describe(), "manifest_sha256": snap.manifest_sha256}


def _threshold(service: Service) -> float | None:
    t = service.sim.threshold if service.sim is not None else None
    return None if t is None else float(t.max_f1)


def _check_key(request, service: Service) -> None:
    """401 without an X-API-Key header, 403 with a wrong one (compared in constant time) or when none is set."""
    given = request.headers.get("x-api-key")
    if given is None:
        raise ApiError(401, "this endpoint needs the X-API-Key header (the key in the server's --api-key-file)")
    if service.config.api_key is None:
        raise ApiError(403, "the server was started without --api-key-file: adding and reloading are disabled")
    if not hmac.compare_digest(given.encode("utf-8", "surrogateescape"), service.config.api_key.encode()):
        raise ApiError(403, "wrong X-API-Key")


async def _json(request) -> Any:
    try:
        return await request.json()
    except ValueError:
        raise ApiError(400, 'the body is not valid JSON; send {"embedding": [numbers]}') from None


def _embedding_body(body: Any, dim: int) -> np.ndarray:
    """The query vector of a JSON search body, L2-normalised; a 422 unless it is `dim` finite numbers, not all zero."""
    vec = body.get("embedding") if isinstance(body, dict) else None
    if not isinstance(vec, list) or len(vec) != dim or \
            not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in vec):
        raise ApiError(422, f'send {{"embedding": [{dim} numbers]}} (the index is {dim}-d)')
    q = np.asarray(vec, dtype=np.float64)
    if not np.isfinite(q).all() or not np.any(q):
        raise ApiError(422, "the embedding must be finite numbers, not all zero")
    return normalise(q[None].astype(np.float32))[0]


async def _form(request):
    ctype = request.headers.get("content-type", "")
    if not ctype.startswith("multipart/form-data"):
        raise ApiError(400, "send the images themselves as multipart/form-data file fields (URLs are not fetched)")
    return await request.form(max_files=1000, max_fields=1000)


async def _image(request, name: str) -> Image.Image:
    return await _decode(await _form(request), name)


async def _decode(form, name: str) -> Image.Image:
    upload = form.get(name)
    if upload is None or not hasattr(upload, "read"):
        raise ApiError(400, f"no file in multipart field {name!r}: send the image itself (URLs are not fetched)")
    return await _decode_bytes(await upload.read(), upload.filename or name)


async def _decode_bytes(data: bytes, label: str) -> Image.Image:
    try:
        return await asyncio.to_thread(decode_image, data)
    except BadImage as err:
        raise ApiError(400, f"{label} is not a readable image ({first_line(err)[:200]})") from None


def _ranked(snap: Snapshot, query: np.ndarray, k: int, offset: int) -> list[dict]:
    """Results offset+1 .. offset+k of one query (fewer at the end of the index)."""
    n = len(snap.index)
    if offset >= n:
        return []
    with snap.searching:
        scores, ids = snap.index.search(query[None].astype(np.float32), min(k + offset, n))
    out = []
    for rank, (s, j) in enumerate(zip(scores[0], ids[0]), start=1):
        if rank > offset and j >= 0:
            out.append({"rank": rank, "name": snap.index.names[j], "score": float(s)})
    return out


def _thumbnail(snap: Snapshot, name: str, size: int) -> bytes:
    """A JPEG thumbnail of the indexed image `name`; 404 for anything else (a link out of its folder included)."""
    i = snap.by_name.get(name)
    path = snap.index.images[i] if i is not None else None
    if path is None:
        raise ApiError(404, f"no image named {name!r} in the index")
    real = os.path.realpath(path)
    if not os.path.isabs(path) or os.path.dirname(real) != os.path.realpath(os.path.dirname(path)) \
            or not os.path.isfile(real):
        raise ApiError(404, f"the image of {name!r} is not a file in its gallery folder")
    try:
        img = load_image(real)
    except BadImage:
        raise ApiError(404, f"the image of {name!r} can no longer be read") from None
    img.thumbnail((size, size))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def _save_upload(folder: Path, name: str, data: bytes, img: Image.Image) -> tuple[Path, bool]:
    """Keep an added image in the uploads folder as PNG (decoded: upright RGB), named by its content's sha256.

    Returns (path, whether this call wrote it); the same image sent twice is the same file.
    """
    stem = UPLOAD_NAME.sub("_", Path(name).stem)[:64].strip("._") or "upload"
    path = folder / f"{hashlib.sha256(data).hexdigest()[:16]}-{stem}.png"
    if path.is_file():
        return path, False
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, suffix=".png", replace=False) as tmp:
        img.save(tmp, format="PNG")
    return path, True


def _add(service: Service, images: list[tuple[str, bytes, Image.Image]]) -> tuple[int, Snapshot]:
    """Append uploaded images through the index folder's own code and lock, then swap the new snapshot in."""
    folder = service.config.uploads_dir
    with service.writing:
        made = []
        try:
            paths = []
            for name, data, img in images:
                path, new = _save_upload(folder, name, data, img)
                paths.append(str(path.resolve()))
                made += [path] if new else []
            index, added, _ = service.sim.add_to_index(service.config.index, paths, progress=False, strict=True)
        except (UserError, OSError) as err:
            for path in made:  # nothing of a refused add stays behind
                path.unlink(missing_ok=True)
            raise ApiError(409, f"cannot add: {err if isinstance(err, UserError) else first_line(err)}") from None
        service.snapshot = snap = Snapshot.of(index, service.config.index)  # one assignment: before or after
    return added, snap


def _reload(service: Service) -> Snapshot:
    """Read the index folder again, aside and under its lock, and swap it in; the old one stays if it cannot be read."""
    with service.writing:
        try:
            with index_folder.locked(service.config.index, "index folder"):
                index = service.sim.load_index(service.config.index)
                snap = Snapshot.of(index, service.config.index)
        except (UserError, OSError) as err:
            why = err if isinstance(err, UserError) else first_line(err)
            raise ApiError(409, f"cannot reload ({why}); still serving the previous index") from None
        service.snapshot = snap
    return snap


# ---------------------------------------------------------------- the process

def run_server(config: ServeConfig, load: Callable[[], Any]) -> int:
    """Bind `config.host:port`, serve until SIGTERM or Ctrl-C (then drain), and return 0.

    Prints the URL once bound and again once ready. A load that fails raises its `UserError`
    (the script exits 2 with that one line); a port that cannot be bound raises `OSError`.
    """
    app = create_app(config, load)  # first: it names the extra to install when FastAPI or uvicorn is missing
    service: Service = app.state.service
    family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
    sock = socket.create_server((config.host, config.port), family=family)
    host, port = sock.getsockname()[:2]
    url = f"http://{'[' + host + ']' if family == socket.AF_INET6 else host}:{port}/"
    server = _uvicorn_server(app, service)
    service.request_exit, service.url = server.ask_exit, url
    print(f"listening on {url} (loading the encoder and the index; /readyz answers 200 once ready)", flush=True)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    if service.failure is not None:
        raise UserError(service.failure)
    return 0


def _uvicorn_server(app, service: Service):
    """uvicorn's Server with the project's signal rule: SIGTERM or Ctrl-C drains (new requests 503,
    those in flight finish), then exits 0; a second signal exits at once. Nothing is re-raised afterwards
    (uvicorn's own `capture_signals` raises the signal again once it has stopped)."""
    import uvicorn

    class Server(uvicorn.Server):
        def ask_exit(self) -> None:
            self.should_exit = True

        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            before = {sig: signal.signal(sig, self.on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in before.items():
                    signal.signal(sig, handler)

        def on_signal(self, sig, frame) -> None:
            if service.draining:
                self.force_exit = self.should_exit = True
            service.draining = True

    return Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on",
                                 timeout_graceful_shutdown=int(service.config.drain_s)))
