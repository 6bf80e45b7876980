"""similarity.py: apply a trained adaptation to new images.

    python similarity.py --run RUNS/run1 pair A.jpg B.jpg
    python similarity.py --run RUNS/run1 search QUERY.jpg --gallery DIR_OR_FEATURES.npy -k 5 --html results.html
    python similarity.py --run RUNS/run1 index build GALLERY -o INDEX_DIR [--kind flat|hnsw|ivf|ivfpq]
    python similarity.py --run RUNS/run1 index build GALLERY -o INDEX_DIR --kind hnsw --target-recall 0.98
    python similarity.py --run RUNS/run1 index build GALLERY -o INDEX_DIR --backend milvus --uri http://127.0.0.1:19530 [--collection NAME] [--token-file FILE]
    python similarity.py --run RUNS/run1 index add INDEX_DIR MORE_IMAGES
    python similarity.py --run RUNS/run1 search Q1.jpg Q2.jpg QUERY_DIR --index INDEX_DIR -k 10 --json hits.json --html hits.html
    python similarity.py --run RUNS/run1 pairs --index INDEX_DIR --threshold 0.9 -o look_alikes
    python similarity.py --run RUNS/run1 export -o RUN1_ONNX [--best] [--opset 18] [--dynamic-batch]
    python similarity.py --onnx RUN1_ONNX pair A.jpg B.jpg        (and search, index build/add, pairs: no torch)
    python similarity.py --onnx RUN1_ONNX serve --index INDEX_DIR [--port 8000] [--api-key-file KEY]

`pair` prints the adapted similarity of two images, the cosine of their raw features
for comparison and, when the run was trained with `--val-split`, the threshold calibrated
on its validation pairs and the verdict (alike or not); without one it says that no
calibrated threshold exists. `--best` uses the best validation epoch's model (`best.pt`).
`search` ranks a gallery (a folder of images, extracted on the fly, or a flat features
file from extract.py), or a persistent index built once with `index build`, for one or
many queries (image files, folders, list files); it prints a table (marking the results
at or above the calibrated threshold) and can write `--json`, `--csv` and a
self-contained `--html` page (the same marks).
`export` writes the run's whole image-to-embedding path as one ONNX graph with its
preprocessing and manifest (`retrieval.export`), after checking it against the torch path;
`--onnx DIR` then runs every other command through onnxruntime, without torch
(`retrieval.deploy`). An index built with `--onnx` is used with that export only.
`pairs` lists the look-alike pairs of an indexed gallery (each pair once) as
PREFIX.csv and PREFIX.html. `serve` answers searches over HTTP (JSON, a search page, metrics;
`retrieval.serve`), on 127.0.0.1 unless `--host` says otherwise. An unreadable query is reported on stderr while the
others are answered; the exit status is then 2. See
`retrieval.visual_similarity.VisualSimilarity` for the API and `retrieval.index_folder` for the
index folder. `--backend milvus` keeps the vectors in a Milvus collection (Milvus Lite, or a
Milvus cluster: the URI and a token file differ, nothing else; `retrieval.milvus_index`); the
folder then holds the manifest, and `search`, `pairs` and `index add` use it as they use a faiss one.

Example:
    >>> import similarity
    >>> similarity.main(["--run", "runs/run1", "pair", "a.jpg", "b.jpg"])   # doctest: +SKIP
    adapted similarity  0.8123
    raw cosine          0.6543
    threshold           0.7412 (max F1 on 30 validation pairs; 0.8630 for 95% precision)
    verdict             alike
    0
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

__all__ = ["build_parser", "parse_args", "main"]


def build_parser() -> argparse.ArgumentParser:
    """similarity.py's argument parser; its help is also the command-line reference of the HTML docs."""
    p = argparse.ArgumentParser(prog="similarity.py", description="Score or search images with a trained adaptation.",
                                allow_abbrev=False)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--run", help="a run folder of train.py (holding model_and_optimizer.pt)")
    which.add_argument("--onnx", metavar="DIR", help="an ONNX export of a run (made with: --run RUN export -o DIR); "
                                                     "runs without torch")
    _add_run_options(p)
    sub = p.add_subparsers(dest="command", required=True)
    pair = sub.add_parser("pair", help="similarity of two images", allow_abbrev=False)
    pair.add_argument("a", metavar="A", help="first image")
    pair.add_argument("b", metavar="B", help="second image")
    _add_search_parser(sub)
    _add_index_parser(sub)
    _add_pairs_parser(sub)
    _add_export_parser(sub)
    _add_serve_parser(sub)
    for leaf in _leaf_parsers(p):
        _add_run_options(leaf, argparse.SUPPRESS)
    return p


def _add_run_options(parser, default=None) -> None:
    """--device, --best and --weights, before the subcommand and after it (`export -o DIR --best` as well
    as `--best export -o DIR`). On the subcommands their default is SUPPRESS, so that one not given there
    leaves the value given before the subcommand (or its default) in place."""
    parser.add_argument("--device", default=default,
                        help="torch device: cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    parser.add_argument("--best", action="store_true", default=default if default is not None else False,
                        help="use best.pt, the best validation epoch (runs with --val-split)")
    parser.add_argument("--weights", default=default,
                        help="the backbone checkpoint, if the extraction used --weights and it moved")
    parser.add_argument("--engine", choices=("auto", "torch", "folded", "onnxruntime"),
                        default=default if default is not None else "auto",
                        help="how the CPU runs the backbone in fp32, as extract.py's --engine (export checks with torch)")


def _leaf_parsers(parser) -> list[argparse.ArgumentParser]:
    """The parsers of the commands themselves (pair, search, index build, ...), nested subcommands included."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        return [parser]
    return [leaf for a in subs for child in a.choices.values() for leaf in _leaf_parsers(child)]


def _add_serve_parser(sub) -> None:
    serve = sub.add_parser("serve", help="an HTTP search service over an index (needs the [serve] extra)",
                           allow_abbrev=False)
    serve.add_argument("--index", required=True, help="an index folder built with: index build")
    serve.add_argument("--host", default="127.0.0.1", help="the address to listen on (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=8000, help="the port (default 8000; 0: any free one, printed)")
    serve.add_argument("--api-key-file", default=None, metavar="FILE",
                       help="a file holding the key that /v1/index/add and /admin/reload need (X-API-Key); "
                            "without it both are refused")
    serve.add_argument("--uploads", default=None, metavar="DIR",
                       help="where images added through /v1/index/add are kept (default: INDEX.uploads beside it)")
    serve.add_argument("--max-batch", type=int, default=16, help="images encoded together at most (default 16; 1: no batching)")
    serve.add_argument("--max-wait-ms", type=float, default=5.0,
                       help="how long a query waits for others to batch with (default 5)")
    serve.add_argument("--max-upload-mb", type=float, default=20.0, help="the largest request body (default 20)")


def _add_export_parser(sub) -> None:
    from retrieval.deploy import ENCODER_FILE, MANIFEST_FILE, PREPROCESS_FILE

    export = sub.add_parser("export", help="write the run's image-to-embedding path as an ONNX graph (needs --run)",
                            allow_abbrev=False)
    export.add_argument("-o", "--out", required=True, metavar="DIR",
                        help=f"the export folder to write ({ENCODER_FILE}, {PREPROCESS_FILE}, {MANIFEST_FILE})")
    export.add_argument("--opset", type=int, default=18, help="the ONNX opset (default 18)")
    export.add_argument("--dynamic-batch", action="store_true", help="a graph taking any batch size (default: 1)")
    export.add_argument("--check-images", default=None, metavar="DIR",
                        help="images (a folder or list) to check the graph on (default: drawn images)")
    export.add_argument("--overwrite", action="store_true", help="replace an existing export folder")


def _add_search_parser(sub) -> None:
    search = sub.add_parser("search", help="rank a gallery or an index against query images", allow_abbrev=False)
    search.add_argument("query", nargs="+", help="query images, folders of images, or image list files")
    where = search.add_mutually_exclusive_group(required=True)
    where.add_argument("--gallery", help="folder of images, image list file, or a flat features file from extract.py")
    where.add_argument("--index", help="an index folder built with: index build")
    search.add_argument("-k", type=int, default=5, help="how many results per query")
    search.add_argument("--json", default=None, help="write the results here as JSON")
    search.add_argument("--csv", default=None, help="write the results here as CSV")
    search.add_argument("--html", default=None, help="write a self-contained results page here")
    search.add_argument("--ef-search", type=int, default=None, help="hnsw: candidates explored (default: the index's)")
    search.add_argument("--nprobe", type=int, default=None, help="ivf, ivfpq: lists visited (default: the index's)")
    search.add_argument("--overwrite", action="store_true", help="replace existing output files")
    _add_strict(search)


def _add_index_parser(sub) -> None:
    index = sub.add_parser("index", help="build or extend a persistent index of a gallery (faiss or Milvus)",
                           allow_abbrev=False)
    isub = index.add_subparsers(dest="index_command", required=True)
    build = isub.add_parser("build", help="encode a gallery and write an index folder", allow_abbrev=False)
    build.add_argument("gallery", help="folder of images (flat or left/right), image list file, or features.npy")
    build.add_argument("-o", "--out", required=True, help="the index folder to write")
    from retrieval.index import KINDS, IndexParams

    build.add_argument("--kind", choices=KINDS, default="flat",
                       help="flat: exact; the others approximate (faster / smaller); --backend milvus: flat or hnsw")
    build.add_argument("--target-recall", type=float, default=None, metavar="R",
                       help="hnsw / ivf kinds: choose --ef-search / --nprobe as the smallest reaching recall@10 R "
                            "(0 < R <= 1) on a held-out sample of the gallery against exact search")
    build.add_argument("--backend", choices=("faiss", "milvus"), default="faiss",
                       help="faiss (the default): the vectors in the index folder; milvus: in a Milvus collection "
                            "(needs --uri)")
    build.add_argument("--uri", default=None, help="milvus: the server, e.g. http://127.0.0.1:19530")
    build.add_argument("--collection", default=None,
                       help="milvus: the collection (default: vs_ and the index folder's name)")
    build.add_argument("--token-file", default=None, metavar="FILE",
                       help="milvus: a file holding the token (USER:PASSWORD or an API key); never on the command line")

    d = IndexParams()  # the defaults shown in --help
    build.add_argument("--hnsw-m", type=int, default=d.hnsw_m, help=f"hnsw: links per vector (default {d.hnsw_m})")
    build.add_argument("--ef-construction", type=int, default=d.ef_construction,
                       help=f"hnsw: build-time candidates (default {d.ef_construction})")
    build.add_argument("--ef-search", type=int, default=d.ef_search,
                       help=f"hnsw: search-time candidates (default {d.ef_search})")
    build.add_argument("--nlist", type=int, default=d.nlist,
                       help="ivf, ivfpq: inverted lists (default: 4 sqrt(n), at most 1680)")
    build.add_argument("--pq-m", type=int, default=d.pq_m, help="ivfpq: bytes per vector code (default: dim / 8)")
    build.add_argument("--nbits", type=int, default=d.nbits, help=f"ivfpq: bits per code part (default {d.nbits})")
    build.add_argument("--nprobe", type=int, default=d.nprobe, help=f"ivf, ivfpq: lists visited per query (default {d.nprobe})")
    build.add_argument("--overwrite", action="store_true", help="replace an existing index folder")
    add = isub.add_parser("add", help="append images to an index (those already in it are skipped)", allow_abbrev=False)
    add.add_argument("index_dir", metavar="INDEX_DIR", help="an index folder built with: index build")
    add.add_argument("gallery", help="folder of images, image list file, or features.npy")
    for q in (build, add):
        q.add_argument("--no-progress", action="store_true", help="no progress bar")
        _add_strict(q)


def _add_strict(parser) -> None:
    parser.add_argument("--strict", action="store_true",
                        help="refuse a gallery entry that is unreadable or not an image file instead of skipping it")


def _add_pairs_parser(sub) -> None:
    pairs = sub.add_parser("pairs", help="look-alike pairs across an indexed gallery, as CSV and HTML",
                           allow_abbrev=False)
    pairs.add_argument("--index", required=True, help="an index folder built with: index build")
    which = pairs.add_mutually_exclusive_group(required=True)
    which.add_argument("--threshold", type=float, help="every pair scoring at least this")
    which.add_argument("--top", type=int, help="the N best pairs")
    pairs.add_argument("-o", "--out", required=True, help="writes OUT.csv (all pairs) and OUT.html")
    pairs.add_argument("--per-image", type=int, default=100,
                       help="with --threshold: neighbours looked at per image (default 100)")
    pairs.add_argument("--html-rows", type=int, default=200, help="pairs shown in the HTML page (default 200)")
    pairs.add_argument("--overwrite", action="store_true", help="replace existing OUT.csv / OUT.html")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse similarity.py's command line (see `python similarity.py -h`)."""
    return build_parser().parse_args(argv)


def _query_image(path: str):
    from featuresExtractor.transforms import BadImage, load_image
    from toolkit.utils import UserError, require_regular_file

    if not Path(path).exists():
        raise UserError(f"image {path} does not exist")
    require_regular_file(path, "image")  # a folder, or a FIFO that would block the read
    try:
        return load_image(path)
    except BadImage as err:
        raise UserError(f"cannot read image {path}: {err}") from None


def _queries(args: Sequence[str]) -> list[str]:
    """Query image paths from files, folders and list files (missing ones are kept, to be reported)."""
    from retrieval.visual_similarity import gallery_items
    from featuresExtractor.transforms import IMAGE_EXTENSIONS

    out = []
    for a in args:
        p = Path(a)
        if p.is_dir():
            out += [str(im) for _, im in gallery_items(p)]  # its listing refuses names that are not UTF-8
        elif p.is_file() and p.suffix.lower() not in IMAGE_EXTENSIONS:
            out += [str(im) for _, im in gallery_items(p)]
        else:
            out.append(a)
    return out


def _check_outputs(outputs: dict[str, str | None], overwrite: bool) -> None:
    """Output files (flag -> path): none the same file as another, a folder, existing without --overwrite, or
    existing and not one this command writes (`retrieval.results.written_here`: a user's file is never replaced)."""
    from retrieval.results import written_here
    from toolkit.folders import check_outputs
    from toolkit.utils import check_writable

    check_outputs(outputs, overwrite, ours=written_here)  # --overwrite replaces only our own results
    for path in outputs.values():
        if path:
            check_writable(Path(path).parent, "output")  # before the model loads


def _print_matches(matches, sim) -> None:
    print(f"{'rank':>4}  {'score':>8}  {'alike':>5}  name")
    for i, m in enumerate(matches, start=1):
        alike = sim.verdict(m.score).alike
        print(f"{i:>4}  {m.score:>8.4f}  {'-' if alike is None else ('yes' if alike else 'no'):>5}  {m.name}")


def _threshold_text(threshold) -> str:
    from retrieval.visual_similarity import NO_THRESHOLD

    if threshold is None:
        return NO_THRESHOLD
    at = ("no threshold reaches 95% precision" if threshold.at_precision is None
          else f"{threshold.at_precision:.4f} for {100 * threshold.target_precision:.0f}% precision")
    return f"{threshold.max_f1:.4f} (max F1 on {threshold.n_pairs} validation pairs; {at})"


def main(argv: Sequence[str] | None = None) -> int:
    """Run similarity.py; returns the exit status (0 on success, 2 on bad input)."""
    args = parse_args(argv)
    from toolkit.distributed import Ranks
    from toolkit.device import choose_device
    from toolkit.utils import UserError, require_utf8

    if Ranks.from_env().distributed:  # every rank would encode the same images and write the same files
        raise UserError("similarity.py runs in one process; start it without torchrun")

    named = {"a": "first image", "b": "second image", "gallery": "gallery", "index": "--index", "json": "--json",
             "csv": "--csv", "html": "--html", "out": "-o", "index_dir": "index folder", "check_images": "--check-images",
             "api_key_file": "--api-key-file", "uploads": "--uploads"}
    require_utf8({"--run": args.run, "--onnx": args.onnx, "--weights": args.weights,
                  **{label: getattr(args, name) for name, label in named.items() if hasattr(args, name)},
                  **{f"query {i + 1}": q for i, q in enumerate(getattr(args, "query", []))}})
    _check_source_args(args)
    device = None if args.onnx else choose_device("cpu" if args.command == "export" else args.device)
    # Bad input is refused before the model loads, which is the slow part.
    params = None
    if args.command == "search":
        _check_search_args(args)
    if args.command == "pairs":
        _check_pairs_args(args)
    if args.command == "index":
        params = _check_index_args(args)
    if args.command == "export":
        config = _check_export_args(args)
    if args.command == "serve":
        return _serve(args, device)

    from retrieval.visual_similarity import VisualSimilarity

    if args.onnx:
        sim = VisualSimilarity.from_onnx(args.onnx)
    else:
        sim = _load_run(args, device)
    if args.command == "export":
        return _export(sim, args, config)
    if args.command == "pair":
        return _pair(sim, args)
    if args.command == "index":
        return _index(sim, args, params)
    if args.command == "pairs":
        return _pairs(sim, args)
    return _search(sim, args)


def _load_run(args, device):
    """The run of `--run` on `device` with the engine `--engine` picks, each note said in one line."""
    from retrieval.visual_similarity import VisualSimilarity
    from toolkit.hardware import resolve_precision

    # auto weighs the onnxruntime graph's one-off build against the images this command encodes.
    n_images = (2 if args.command == "pair" else len(_queries(args.query)) if args.command == "search" and args.index
                else None)
    engine = "torch" if args.command == "export" else args.engine  # the export checks its graph against torch
    sim = VisualSimilarity.from_run(args.run, device=device, weights=args.weights, best=args.best, engine=engine,
                                    n_images=n_images)
    if sim.engine_note:
        print(f"similarity.py: {sim.engine_note}", file=sys.stderr)
    # The extraction's precision is followed; where it is emulated here, say so once.
    warning = resolve_precision(sim.encoder.extractor.precision, device).warning
    if warning:
        print(f"similarity.py: {warning} (the run's features were extracted in it, so queries are too)", file=sys.stderr)
    if sim.provenance_note:
        print(f"note: {sim.provenance_note}", file=sys.stderr)
    return sim


def _serve(args, device) -> int:
    """Check the serve arguments, then serve; the encoder and the index load once the port is bound."""
    from retrieval import index_folder
    from retrieval.serve import ServeConfig, read_api_key, run_server
    from retrieval.visual_similarity import VisualSimilarity

    config = ServeConfig(args.index, args.host, args.port, read_api_key(args.api_key_file) if args.api_key_file else None,
                         args.max_batch, args.max_wait_ms, args.max_upload_mb, args.uploads)
    index_folder.read_manifest(args.index)  # a folder that is no index is refused before the port is bound
    if args.onnx:
        from retrieval.deploy import read_manifest

        read_manifest(args.onnx)
        return run_server(config, lambda: VisualSimilarity.from_onnx(args.onnx))
    return run_server(config, lambda: VisualSimilarity.from_run(args.run, device=device, weights=args.weights,
                                                                best=args.best, engine=args.engine))


def _check_source_args(args) -> None:
    """--onnx takes none of --run's options, and cannot export; export runs on the CPU."""
    from toolkit.utils import UserError

    if args.onnx:
        given = [flag for flag, v in (("--device", args.device), ("--weights", args.weights), ("--best", args.best)) if v]
        if given:
            raise UserError(f"{', '.join(given)} applies to --run only: an ONNX export runs its own graph on the CPU")
        if args.command == "export":
            raise UserError("export is made from a run: similarity.py --run RUN export -o DIR")
    elif args.command == "export" and args.device not in (None, "cpu"):
        raise UserError(f"export runs on the CPU (got --device {args.device}); leave --device out")


def _check_export_args(args):
    """Checks the export's inputs; returns its ExportConfig."""
    from retrieval.deploy import check_target
    from retrieval.export import ExportConfig
    from toolkit.utils import UserError, check_writable

    if not 7 <= args.opset <= 30:
        raise UserError(f"--opset must be an ONNX opset number such as 18 (got {args.opset})")
    if args.check_images is not None and not Path(args.check_images).exists():
        raise UserError(f"--check-images {args.check_images} does not exist")
    check_target(args.out, args.overwrite)
    check_writable(args.out, "-o")
    return ExportConfig(args.opset, args.dynamic_batch, args.check_images, args.overwrite)


def _export(sim, args, config) -> int:
    from retrieval.export import export_run

    manifest = export_run(sim, args.out, config)
    if manifest["opset"] != config.opset:
        print(f"note: --opset {config.opset} asked, but torch's exporter writes no opset below {manifest['opset']}: "
              f"the graph is opset {manifest['opset']} (the manifest says so)", file=sys.stderr)
    check = manifest["check"]
    print(f"check: minimum cosine {check['min_cosine']:.7f} (onnxruntime against torch) on {check['images']} "
          f"{check['source']} image(s), batch {' and '.join(map(str, check['batches']))}")
    print(f"wrote {args.out} ({manifest['identity']['backbone']['arch']}, {manifest['embedding_dim']}-d, opset "
          f"{manifest['opset']}, batch {manifest['batch'] or 'dynamic'})")
    return 0


def _check_search_args(args) -> None:
    from retrieval.visual_similarity import check_source
    from toolkit.utils import UserError

    if args.k < 1:
        raise UserError(f"-k must be at least 1 (got {args.k})")
    for fmt in ("json", "csv"):
        if getattr(args, fmt) and Path(getattr(args, fmt)).suffix.lower() != f".{fmt}":
            raise UserError(f"--{fmt} {getattr(args, fmt)}: the file name must end in .{fmt}")
    _check_outputs({"--json": args.json, "--csv": args.csv, "--html": args.html}, args.overwrite)
    if args.gallery:
        check_source(args.gallery)
    elif not Path(args.index).exists():
        raise UserError(f"index {args.index} does not exist")


def _check_pairs_args(args) -> None:
    from toolkit.utils import UserError

    if args.threshold is not None and not -1 <= args.threshold <= 1:  # NaN fails this too
        raise UserError(f"--threshold must be an adapted cosine, between -1 and 1 (got {args.threshold})")
    if args.top is not None and args.top < 1:
        raise UserError(f"--top must be at least 1 (got {args.top})")
    if args.per_image < 1 or args.html_rows < 0:
        raise UserError("--per-image must be at least 1 and --html-rows at least 0")
    _check_outputs({"-o (CSV)": args.out + ".csv", "-o (HTML)": args.out + ".html"}, args.overwrite)


def _check_index_args(args):
    """Checks the index command's inputs; returns (IndexParams, MilvusTarget or None) of a build, None for an add.

    A Milvus server is reached, and its token tried, before the model loads.
    """
    from retrieval.index import IndexParams
    from retrieval.index_folder import check_target
    from retrieval.visual_similarity import check_source
    from toolkit.utils import check_writable

    check_source(args.gallery)
    if args.index_command != "build":
        check_target(args.index_dir, True, "index folder", existing=True)
        return None
    params = IndexParams(args.kind, args.hnsw_m, args.ef_construction, args.ef_search, args.nlist, args.pq_m,
                         args.nbits, args.nprobe, target_recall=args.target_recall)
    check_target(args.out, args.overwrite, "-o")
    check_writable(args.out, "-o")
    return params, _milvus_target(args, params)


def _milvus_target(args, params):
    """The MilvusTarget of `index build --backend milvus` (reached once, so a bad URI or token is told early)."""
    from toolkit.utils import UserError

    given = [f for f, v in (("--uri", args.uri), ("--collection", args.collection), ("--token-file", args.token_file))
             if v is not None]
    if args.backend == "faiss":
        if given:
            raise UserError(f"{', '.join(given)} applies to --backend milvus only")
        return None
    from retrieval.milvus_index import MILVUS_KINDS, MilvusTarget, connect, default_collection

    if args.uri is None:
        raise UserError("--backend milvus needs --uri, the Milvus server (e.g. http://127.0.0.1:19530)")
    if args.kind not in MILVUS_KINDS:
        raise UserError(f"--backend milvus builds --kind {' or '.join(MILVUS_KINDS)} (got --kind {args.kind})")
    if params.target_recall is not None:
        raise UserError("--target-recall applies to --backend faiss; with Milvus, set --ef-search (hnsw) instead")
    target = MilvusTarget(args.uri, args.collection or default_collection(args.out), args.token_file)
    connect(target).close()
    return target


def _pair(sim, args) -> int:
    import numpy as np

    a, b = _query_image(args.a), _query_image(args.b)
    raw = sim.raw([a, b])
    verdict = sim.verdict(sim.score_raw(raw))
    print(f"adapted similarity  {verdict.score:.4f}")
    if not sim.onnx:  # an export's graph gives adapted vectors only
        cos = float(raw[0] @ raw[1] / max(np.linalg.norm(raw[0]) * np.linalg.norm(raw[1]), 1e-12))
        print(f"raw cosine          {cos:.4f}")
    print(f"threshold           {_threshold_text(sim.threshold)}")
    if verdict.alike is not None:
        print(f"verdict             {'alike' if verdict.alike else 'not alike'}")
    return 0


def _search(sim, args) -> int:
    from toolkit.utils import UserError

    if args.index:
        gallery = sim.load_index(args.index, ef_search=args.ef_search, nprobe=args.nprobe)
    else:
        gallery = sim.gallery(args.gallery, strict=args.strict)
        for name, reason in gallery.skipped.items():
            print(f"skipped unreadable gallery image {name}: {reason}", file=sys.stderr)
    queries = _queries(args.query)
    if not queries:
        raise UserError(f"no query image in {' '.join(args.query)}")
    hits = sim.search(queries, gallery, args.k)
    print(f"threshold: {_threshold_text(sim.threshold)}")
    for h in hits:
        if h.error is None:
            if len(hits) > 1:
                print(f"query: {h.query}")
            _print_matches(h.matches, sim)
    _write_search_outputs(hits, sim.threshold, args)
    failed = [h for h in hits if h.error is not None]
    if failed:  # one error line however many failed; each one's reason is in the outputs too
        shown = "; ".join(f"{h.query}: {h.error}" for h in failed[:3])
        more = f"; and {len(failed) - 3} more" if len(failed) > 3 else ""
        what = "query" if len(failed) == 1 else f"{len(failed)} of {len(hits)} queries:"
        print(f"similarity.py: error: cannot read {what} {shown}{more}", file=sys.stderr)
    return 2 if failed else 0


def _write_search_outputs(hits, threshold, args) -> None:
    # Every output is made before any is written, so one that cannot be made leaves none behind.
    from retrieval.results import search_results_text, write_texts

    texts = {path: search_results_text(hits, path) for path in (args.json, args.csv) if path}
    if args.html:
        from retrieval.pages import search_page

        where = Path(args.index or args.gallery).name
        title = f"{Path(hits[0].query).name}: top {args.k} in {where}" if len(hits) == 1 else \
            f"{len(hits)} queries: top {args.k} in {where}"
        texts[args.html] = search_page(hits, title=title, threshold=None if threshold is None else threshold.max_f1,
                                       threshold_note=_threshold_text(threshold))
    write_texts(texts, args.overwrite)  # all or none; never over a file another run wrote meanwhile
    for path in texts:
        print(f"wrote {path}")


def _index(sim, args, params) -> int:
    if args.index_command == "build":
        params, milvus = params
        index, skipped = sim.build_index(args.gallery, args.out, params, overwrite=args.overwrite,
                                         progress=not args.no_progress, strict=args.strict, milvus=milvus)
        added = len(index)
    else:
        index, added, skipped = sim.add_to_index(args.index_dir, args.gallery, progress=not args.no_progress,
                                                 strict=args.strict)
    for name, reason in skipped.items():
        print(f"skipped unreadable gallery image {name}: {reason}", file=sys.stderr)
    verb = "indexed" if args.index_command == "build" else "added"
    where = f", Milvus collection {index.target.collection} at {index.target.uri}" if index.backend == "milvus" else ""
    print(f"{verb} {added} image(s); {index.path} holds {len(index)} ({index.kind}, {index.dim}-d{where})")
    tuned = index.manifest.get("tuned")
    if tuned:
        print(f"{tuned['param']} {tuned['value']}: recall@{tuned['k']} {tuned['recall']:.4f} against exact search on "
              f"{tuned['queries']} held-out gallery vectors (target {tuned['target']})")
        if not tuned["reached"]:
            print(f"no {tuned['param']} reached recall@{tuned['k']} {tuned['target']}; the best tried is kept: "
                  f"build with a larger --hnsw-m / --ef-construction, or --nlist, or use --kind flat", file=sys.stderr)
    return 0


def _pairs(sim, args) -> int:
    from retrieval.index import look_alike_pairs
    from retrieval.results import pairs_text, write_texts
    from retrieval.pages import pairs_page
    from toolkit.utils import UserError

    index = sim.load_index(args.index)
    if len(index) < 2:
        raise UserError(f"{args.index} holds {len(index)} image(s): pairs need at least 2")
    a, b, s, capped = look_alike_pairs(index, threshold=args.threshold, top=args.top, per_item=args.per_image)
    rows = [(index.names[i], index.names[j], float(x), index.images[i], index.images[j]) for i, j, x in zip(a, b, s)]
    page = pairs_page(rows[:args.html_rows], total=len(rows), title=f"look-alike pairs in {Path(args.index).name}")
    # both or neither; never over a file another run wrote meanwhile
    write_texts({args.out + ".csv": pairs_text(rows), args.out + ".html": page}, args.overwrite)
    for r in rows[:10]:
        print(f"{r[2]:>8.4f}  {r[0]}  {r[1]}")
    if capped:
        print(f"some images have more than {args.per_image} neighbours above {args.threshold}; only their "
              f"{args.per_image} best are listed (raise --per-image)", file=sys.stderr)
    print(f"{len(rows)} pair(s); wrote {args.out}.csv and {args.out}.html")
    return 0


if __name__ == "__main__":
    from toolkit.cli import run_cli

    sys.exit(run_cli(main))
