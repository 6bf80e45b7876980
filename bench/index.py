"""Similarity index kinds on synthetic clustered vectors: build time, size, queries/s, recall@10.

The vectors stand in for the `original` adaptation's output: 1024-d, non-negative
(the model ends in a ReLU) and L2-normalised, drawn around `--clusters` centres so
that approximate search is not trivial. Within a cluster, points vary mostly along
`--intrinsic` shared random directions plus a little noise in all 1024, as learnt
embeddings do (`--intrinsic 0`: isotropic noise in all 1024 dimensions, where nearest
neighbours are barely nearer than any cluster member and every ANN method struggles).
Queries are fresh draws from the same clusters (not gallery items). Each kind is built with `retrieval.index.build`
(the code `similarity.py index build` runs), written with `retrieval.index_folder.write`
(size on disk) and searched in one batch of all queries (median of `--repeat`).
Recall@10 is the share of the exact (flat) top 10 that a kind returns in its top 10.
"RAM" is the growth of this process's resident memory while the index was built
(earlier indexes are kept, and glibc's mmap threshold is fixed, so freed memory
neither hides nor inflates it).

With `--target-recall R`, each approximate kind is built as `index build --target-recall R`
does: its ef_search / nprobe chosen on a held-out sample of the gallery (the build time includes
that choice); the chosen value and the recall measured on the held-out sample are printed beside
the recall on the fresh queries.

The issue's size is 1M vectors (`--n 1000000`, about 4 GB of vectors plus the
indexes); the default (50k) is smaller so that it runs in a few minutes. `--free` drops each
index once measured, so that 1M fits in 24 GB.

Usage:
    python bench/index.py --threads 1                # 50k x 1024, flat / hnsw / ivf / ivfpq (README figures)
    python bench/index.py --n 1000000 --kinds flat ivf --target-recall 0.98 --free --save   # issue 33's goal
    python bench/index.py --n 200000 --kinds flat hnsw ivf --target-recall 0.98
    python bench/index.py --n 50000 --kinds flat hnsw --ef-search 64
"""

from __future__ import annotations

import argparse
import gc
import os
import tempfile
import time
from pathlib import Path
from typing import Sequence

import benchlib  # bench/ is the script's folder, so it is on sys.path; the packages come from the install

import numpy as np

from retrieval import index as ixf
from retrieval import index_folder as ixd
from retrieval.index import IndexParams
from toolkit.cli import run_cli


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/index.py", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--n", type=int, default=50_000, help="gallery vectors (the issue's size: 1000000)")
    p.add_argument("--dim", type=int, default=1024, help="vector dimension (the original model's output)")
    p.add_argument("--clusters", type=int, default=1000, help="cluster centres")
    p.add_argument("--intrinsic", type=int, default=64, help="directions of within-cluster variation (0: all)")
    p.add_argument("--spread", type=float, default=1.0, help="variation around a centre, relative to the centres' scale")
    p.add_argument("--queries", type=int, default=1000, help="queries, searched as one batch")
    p.add_argument("-k", type=int, default=10, help="recall@k and neighbours per query")
    p.add_argument("--kinds", nargs="+", choices=ixf.KINDS, default=list(ixf.KINDS))
    d = IndexParams()
    p.add_argument("--hnsw-m", type=int, default=d.hnsw_m)
    p.add_argument("--ef-construction", type=int, default=d.ef_construction)
    p.add_argument("--ef-search", type=int, default=d.ef_search)
    p.add_argument("--nlist", type=int, default=d.nlist, help="0: 4 sqrt(n)")
    p.add_argument("--pq-m", type=int, default=d.pq_m, help="0: dim / 8")
    p.add_argument("--nbits", type=int, default=d.nbits)
    p.add_argument("--nprobe", type=int, default=d.nprobe)
    p.add_argument("--target-recall", type=float, default=None,
                   help="choose ef_search / nprobe per kind as index build --target-recall does")
    p.add_argument("--free", action="store_true", help="drop each index once measured (1M: bounds memory)")
    p.add_argument("--repeat", type=int, default=3, help="timed search repeats (median)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="faiss OpenMP threads (default: faiss's; 1 is faster when the cores are shared and busy)")
    p.add_argument("--save", action="store_true", help="write bench/results/index-TIMESTAMP.json")
    return p.parse_args(argv)


def clustered(n: int, queries: int, dim: int, clusters: int, spread: float, seed: int,
              intrinsic: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(gallery, queries): non-negative unit rows around shared centres, drawn in blocks to bound memory."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim)).astype(np.float32)
    basis = rng.normal(size=(intrinsic, dim)).astype(np.float32) / np.sqrt(intrinsic) if intrinsic else None

    def draw(m: int) -> np.ndarray:
        out = np.empty((m, dim), np.float32)
        for s in range(0, m, 65536):
            e = min(m, s + 65536)
            if basis is None:
                noise = rng.standard_normal((e - s, dim), np.float32)
            else:  # the same variance per dimension as isotropic noise, but along the shared directions
                noise = rng.standard_normal((e - s, intrinsic), np.float32) @ basis \
                    + 0.1 * rng.standard_normal((e - s, dim), np.float32)
            x = centres[rng.integers(clusters, size=e - s)] + spread * noise
            out[s:e] = ixf.normalise(np.maximum(x, 0))
        return out

    return draw(n), draw(queries)


def _fixed_mmap_threshold() -> None:
    """Make glibc return large freed blocks to the system, so RSS growth is what an index keeps."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c")).mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD: fixed at 1 MiB
    except (OSError, AttributeError):  # not glibc: RSS growth may then under-count
        pass


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    import faiss

    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    _fixed_mmap_threshold()
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    x, q = clustered(args.n, args.queries, args.dim, args.clusters, args.spread, args.seed, args.intrinsic)
    print(f"{args.n} x {args.dim} vectors, {args.clusters} clusters, {args.queries} queries "
          f"(drawn in {time.perf_counter() - t0:.1f} s); faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads")
    # --target-recall adds its held-out sample last: ids are mapped back to gallery rows through the names
    names, images = [str(i) for i in range(args.n)], [None] * args.n
    rows, truth, alive = [], None, []
    kinds = ["flat"] + [k for k in args.kinds if k != "flat"]  # flat first: it is the truth for recall
    for kind in kinds:
        params = IndexParams(kind, args.hnsw_m, args.ef_construction, args.ef_search, args.nlist, args.pq_m,
                             args.nbits, args.nprobe, target_recall=None if kind == "flat" else args.target_recall)
        gc.collect()
        rss0 = benchlib.rss_bytes()
        t = time.perf_counter()
        ix = ixf.build(x, names, images, params, identity={})
        build_s = time.perf_counter() - t
        ram = benchlib.rss_bytes() - rss0
        with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
            t = time.perf_counter()
            ixd.write(ix, Path(tmp) / "ix")
            write_s = time.perf_counter() - t
            disk = (Path(tmp) / "ix" / "index.faiss").stat().st_size
        times = []
        for _ in range(args.repeat):
            t = time.perf_counter()
            _, ids = ix.search(q, args.k)
            times.append(time.perf_counter() - t)
        ids = np.array([int(name) for name in ix.names] + [-1])[ids]  # id -> gallery row (-1 stays -1)
        if kind == "flat":
            truth = ids
        recall = float(np.mean([len(set(a) & set(b)) / args.k for a, b in zip(ids.tolist(), truth.tolist())]))
        row = {"kind": kind, "params": ix.manifest["params"], "build_s": build_s, "vectors_per_s": args.n / build_s,
               "write_s": write_s, "disk_mb": disk / 1e6, "ram_mb": ram / 1e6, "qps": args.queries / benchlib.median(times),
               "recall": recall, "tuned": ix.manifest.get("tuned")}
        rows.append(row)
        tuned = row["tuned"]
        note = f" ({tuned['param']} {tuned['value']} chosen: held-out recall@{tuned['k']} {tuned['recall']:.3f})" \
            if tuned else ""
        print(f"  {kind}: built in {build_s:.1f} s, {row['qps']:.0f} queries/s, recall@{args.k} {recall:.3f}{note}",
              flush=True)
        if not args.free:
            alive.append(ix)  # freed memory would be reused by the next build and hide its growth
        del ix
    if "flat" not in args.kinds:
        rows = rows[1:]
    flat = next((r for r in rows if r["kind"] == "flat"), None)
    for r in rows:
        r["qps_vs_flat"] = r["qps"] / flat["qps"] if flat else None
        r["disk_vs_flat"] = r["disk_mb"] / flat["disk_mb"] if flat else None
    print(benchlib.table(rows, [("kind", "kind", "s"), ("build_s", "build s", ".1f"), ("vectors_per_s", "vec/s", ".0f"),
                                ("disk_mb", "disk MB", ".1f"), ("ram_mb", "RAM MB", ".1f"),
                                ("qps", "queries/s", ".0f"), ("qps_vs_flat", "x flat", ".2f"),
                                ("disk_vs_flat", "size/flat", ".3f"), ("recall", f"recall@{args.k}", ".3f")]))
    for r in rows:
        print(f"  {r['kind']}: {r['params']}")
    info = benchlib.machine()
    print(f"CPU: {info['cpu']}, {info['cores']} cores; load average {load0:.2f} at the start, "
          f"{os.getloadavg()[0]:.2f} at the end")
    return benchlib.finish("index", args, info, rows=rows) if args.save else 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main, prog="bench/index.py"))
