"""`similarity.py serve` under load: /v1/search from 8 and 32 concurrent clients, micro-batching on and off.

For each model (random weights, no network) this makes a small run (drawn pairs, extract.py with
adapt-pca N, two epochs of train.py), exports it (`similarity.py --run RUN export --dynamic-batch`),
indexes a gallery of drawn images with the export, and starts `similarity.py --onnx EXPORT serve` on
127.0.0.1 (a free port) once per setting: `--max-batch 16 --max-wait-ms 5` (batching on) and
`--max-batch 1` (off). Clients are asyncio tasks of one httpx client in this process, each posting
a drawn query image to /v1/search (k=10) in a loop bounded by `--seconds` (and by `--max-requests`
per client), after a warm-up. Reported per setting: queries/s, p50 and p99 latency, errors (non-200
or failed requests), the server's peak RSS (VmHWM) and its mean encoder batch (from /metrics).
The machine's CPU, ISA flags and load average are printed with the table (other work shares the CPU).

Usage:
    python bench/serve.py                                          # tiny_rn and RN50x4, 30 s each setting
    python bench/serve.py --models tiny_rn --seconds 5 --clients 8     # a quick look
"""

from __future__ import annotations

import argparse
import asyncio
import os
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Sequence

import benchlib

from toolkit.cli import run_cli

ROOT = benchlib.ROOT
BATCHING = {"on": ["--max-batch", "16", "--max-wait-ms", "5"], "off": ["--max-batch", "1"]}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/serve.py", description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--models", nargs="+", default=["tiny_rn", "clip_rn50x4"], help="backbones (random weights)")
    p.add_argument("--clients", nargs="+", type=int, default=[8, 32], help="concurrent clients (default 8 32)")
    p.add_argument("--seconds", type=float, default=30.0, help="timed seconds per setting (default 30)")
    p.add_argument("--max-requests", type=int, default=100_000, help="requests per client at most (a bound)")
    p.add_argument("--batching", nargs="+", choices=tuple(BATCHING), default=list(BATCHING), help="on, off or both")
    p.add_argument("--gallery", type=int, default=64, help="drawn images in the index (default 64)")
    p.add_argument("--pairs", type=int, default=8, help="drawn pairs of the small run (default 8)")
    p.add_argument("--pca", type=int, default=16, help="adapt-pca N of the small run (default 16)")
    p.add_argument("--save", action="store_true", help="write bench/results/serve-TIMESTAMP.json")
    args = p.parse_args(argv)
    if args.seconds <= 0 or min(args.clients) < 1 or args.max_requests < 1 or args.gallery < 1:
        p.error("--seconds, --clients, --max-requests and --gallery must be positive")
    return args


def isa_flags() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "?"
    flags = set(re.search(r"^flags\s*:(.*)$", text, re.M).group(1).split())
    return " ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16") if f in flags) or "none listed"


def prepare(model: str, args, tmp: Path) -> tuple[Path, Path, list[bytes]]:
    """(export folder, index folder, query images as PNG bytes) of a small random-init run of `model`."""
    import io

    from synthetic.drawn_images import render_pair

    run = benchlib.small_run(model, tmp / model, args.pairs, args.pca)
    export = tmp / f"{model}_onnx"
    benchlib.script(["similarity.py", "--run", run, "export", "-o", export, "--dynamic-batch"])
    gallery = tmp / f"{model}_gallery"
    gallery.mkdir()
    for i in range(-(-args.gallery // 2)):
        for side, im in zip("ab", render_pair(seed=5, index=i)):
            im.save(gallery / f"{i:04d}{side}.png")
    index = tmp / f"{model}_index"
    benchlib.script(["similarity.py", "--onnx", export, "index", "build", gallery, "-o", index, "--no-progress"])
    queries = []
    for i in range(8):
        buf = io.BytesIO()
        render_pair(seed=9, index=i)[0].save(buf, format="PNG")
        queries.append(buf.getvalue())
    return export, index, queries


class Server:
    """`similarity.py --onnx EXPORT serve` on 127.0.0.1, a free port; ended by its pid (process group)."""

    def __init__(self, export: Path, index: Path, extra: list[str]):
        cmd = [sys.executable, str(ROOT / "similarity.py"), "--onnx", str(export), "serve", "--index", str(index),
               "--host", "127.0.0.1", "--port", "0", *extra]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                                     start_new_session=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [lines.put(line) for line in self.proc.stdout], daemon=True).start()
        self.url = ""
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                line = lines.get(timeout=1)
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
                continue
            if line.startswith("ready: "):
                self.url = line.split()[1]
                return
        self.end()
        raise RuntimeError(f"the server did not start: {self.proc.stderr.read()[-500:]}")

    def peak_rss_mib(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def end(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(30)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


async def load(url: str, queries: list[bytes], clients: int, seconds: float, max_requests: int) -> dict:
    """`clients` tasks posting queries to /v1/search until `seconds` pass; latencies and errors."""
    import httpx

    latencies: list[float] = []
    errors = 0

    async def client(c: httpx.AsyncClient, n: int, until: float, record: bool) -> None:
        nonlocal errors
        for i in range(max_requests):
            if time.monotonic() >= until:
                return
            t = time.perf_counter()
            try:
                r = await c.post("v1/search", params={"k": 10},
                                 files={"image": ("q.png", queries[(n + i) % len(queries)], "image/png")})
                ok = r.status_code == 200
            except httpx.HTTPError:
                ok = False
            if record and ok:
                latencies.append(time.perf_counter() - t)
            elif record:
                errors += 1

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as c:
        await asyncio.gather(*(client(c, n, time.monotonic() + min(3.0, seconds), False) for n in range(clients)))
        start = time.monotonic()
        await asyncio.gather(*(client(c, n, start + seconds, True) for n in range(clients)))
        elapsed = time.monotonic() - start
        metrics = (await c.get("metrics")).text
    lat = sorted(latencies)
    pick = (lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] * 1000) if lat else (lambda q: float("nan"))
    total = dict(re.findall(r"^similarity_batch_size_(sum|count) (\S+)$", metrics, re.M))
    mean_batch = float(total["sum"]) / float(total["count"]) if float(total.get("count", 0)) else float("nan")
    return {"qps": len(lat) / elapsed, "p50_ms": pick(0.50), "p99_ms": pick(0.99), "errors": errors,
            "requests": len(lat) + errors, "mean_batch": mean_batch}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    info = {**benchlib.machine(), "isa": isa_flags()}
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_serve_") as tmp:
        for model in args.models:
            export, index, queries = prepare(model, args, Path(tmp))
            for batching in args.batching:
                for clients in args.clients:
                    server = Server(export, index, BATCHING[batching])
                    try:
                        got = asyncio.run(load(server.url, queries, clients, args.seconds, args.max_requests))
                        got["server_peak_rss_mib"] = server.peak_rss_mib()
                    finally:
                        server.end()
                    rows.append({"model": model, "batching": batching, "clients": clients, **got})
                    print(f"{model} batching {batching}, {clients} clients: {got['qps']:.1f} q/s", flush=True)
    info["load_avg_end"] = os.getloadavg()
    print(f"CPU: {info['cpu']} ({info['cores']} cores; {info['isa']}); load average {info['load_avg_start']} at the "
          f"start, {info['load_avg_end']} at the end; {args.seconds:g} s per setting, index of {args.gallery} images")
    print(benchlib.table(rows, [("model", "model", ""), ("batching", "batching", ""), ("clients", "clients", "d"),
                                ("qps", "q/s", ".1f"), ("p50_ms", "p50 ms", ".0f"), ("p99_ms", "p99 ms", ".0f"),
                                ("errors", "errors", "d"), ("mean_batch", "mean batch", ".2f"),
                                ("server_peak_rss_mib", "server peak RSS MiB", ".0f")]))
    return benchlib.finish("serve", args, info, rows=rows) if args.save else 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
