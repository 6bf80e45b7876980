"""similarity.py: apply a trained adaptation to new images.

    python similarity.py --run RUNS/run1 pair A.jpg B.jpg
    python similarity.py --run RUNS/run1 search QUERY.jpg --gallery DIR_OR_FEATURES.npy -k 5 --html results.html

`pair` prints the adapted similarity of two images and, for comparison, the cosine
of their raw features. `search` ranks a gallery (a folder of images, extracted on
the fly, or a flat features file from extract.py) and can write a self-contained
HTML page of the results. See `adaptation.similarity.VisualSimilarity` for the API.

Example:
    >>> import similarity
    >>> similarity.main(["--run", "runs/run1", "pair", "a.jpg", "b.jpg"])   # doctest: +SKIP
    adapted similarity  0.8123
    raw cosine          0.6543
    0
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

__all__ = ["parse_args", "main"]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse similarity.py's command line (see `python similarity.py -h`)."""
    p = argparse.ArgumentParser(prog="similarity.py", description="Score or search images with a trained adaptation.")
    p.add_argument("--run", required=True, help="a run folder of train.py (holding model_and_optimizer.pt)")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--weights", default=None, help="the backbone checkpoint, if the extraction used --weights and it moved")
    sub = p.add_subparsers(dest="command", required=True)
    pair = sub.add_parser("pair", help="similarity of two images")
    pair.add_argument("a")
    pair.add_argument("b")
    search = sub.add_parser("search", help="rank a gallery against a query image")
    search.add_argument("query")
    search.add_argument("--gallery", required=True, help="folder of images, or a flat features file from extract.py")
    search.add_argument("-k", type=int, default=5, help="how many results")
    search.add_argument("--html", default=None, help="write a self-contained results page here")
    search.add_argument("--overwrite", action="store_true", help="replace an existing --html file")
    return p.parse_args(argv)


def _query_image(path: str):
    from featuresExtractor.transforms import BadImage, load_image
    from toolkit.utils import UserError

    if not Path(path).is_file():
        raise UserError(f"image {path} does not exist")
    try:
        return load_image(path)
    except BadImage as err:
        raise UserError(f"cannot read image {path}: {err}") from None


def main(argv: Sequence[str] | None = None) -> int:
    """Run similarity.py; returns the exit status (0 on success, 2 on bad input)."""
    args = parse_args(argv)
    from toolkit.utils import UserError, atomic_path

    if args.command == "search" and args.k < 1:
        raise UserError(f"-k must be at least 1 (got {args.k})")
    if args.command == "search" and args.html and Path(args.html).exists() and not args.overwrite:
        raise UserError(f"{args.html} already exists; pass --overwrite or choose another --html")
    if args.command == "search" and not Path(args.gallery).exists():
        raise UserError(f"gallery {args.gallery} does not exist")

    import numpy as np

    from adaptation.similarity import VisualSimilarity

    sim = VisualSimilarity.from_run(args.run, device=args.device, weights=args.weights)
    if args.command == "pair":
        a, b = _query_image(args.a), _query_image(args.b)
        raw = sim.raw([a, b])
        cos = float(raw[0] @ raw[1] / max(np.linalg.norm(raw[0]) * np.linalg.norm(raw[1]), 1e-12))
        print(f"adapted similarity  {sim.score_raw(raw):.4f}")
        print(f"raw cosine          {cos:.4f}")
        return 0

    query = _query_image(args.query)
    gallery = sim.gallery(args.gallery)
    for name, reason in gallery.skipped.items():
        print(f"skipped unreadable gallery image {name}: {reason}", file=sys.stderr)
    matches = sim.search(query, gallery, args.k)
    print(f"{'rank':>4}  {'score':>8}  name")
    for i, m in enumerate(matches, start=1):
        print(f"{i:>4}  {m.score:>8.4f}  {m.name}")
    if args.html:
        from adaptation.visualize import results_page

        page = results_page(query, [(m.name, m.image, m.score) for m in matches],
                            title=f"{Path(args.query).name}: top {args.k} in {Path(args.gallery).name}",
                            query_name=Path(args.query).name)
        with atomic_path(args.html) as tmp:
            tmp.write_text(page, encoding="utf-8")
        print(f"wrote {args.html}")
    return 0


if __name__ == "__main__":
    from toolkit.utils import run_cli

    sys.exit(run_cli(main))
