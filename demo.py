"""The offline demo behind `make demo`: draw look-alike pairs, extract, train, compare, search.

Runs the README's own commands, printed before each runs, on a small deterministic
set of synthetic look-alike pairs (`featuresExtractor.drawn_images`), then prints test
top-1/3/5 for the trained `original` adaptation next to the untrained `dummy`
baseline, and says where the TensorBoard logs, checkpoint and a search page are.

The CLIP RN50x4 weights are used when they are already in the Hugging Face cache;
otherwise the backbone is randomly initialised, and the demo says so loudly: the
pipeline then runs end to end, but its numbers say nothing about the method.

Example:
    python demo.py --out demo_out          # what `make demo` runs
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Sequence

__all__ = ["parse_args", "main", "comparison_table"]

ROOT = Path(__file__).resolve().parent
BANNER = """
##########################################################################
#  The CLIP RN50x4 weights are not in the Hugging Face cache, so this    #
#  demo runs on a RANDOMLY INITIALISED backbone (--pretrained none).     #
#  The pipeline runs end to end, but the numbers say NOTHING about the   #
#  method. Run `python extract.py ...` once while online to cache the    #
#  weights, or pass --weights FILE, to see real figures.                 #
##########################################################################
"""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the demo's options (all have demo-sized defaults)."""
    p = argparse.ArgumentParser(prog="python demo.py", description="Run the whole pipeline offline.")
    p.add_argument("--out", default="demo_out", help="folder for everything the demo writes (replaced on each run)")
    p.add_argument("--pairs", type=int, default=48, help="synthetic look-alike pairs to draw")
    p.add_argument("--epochs", type=int, default=150)
    p.add_argument("--model", default="clip_rn50x4", help="backbone; tiny_rn runs in seconds (used by the tests)")
    p.add_argument("--pca", type=int, default=64, help="PCA size (at most 4 x pairs with flips)")
    p.add_argument("--precision", default="bf16", choices=("fp32", "bf16"), help="extraction precision")
    return p.parse_args(argv)


def _run(cmd: list[str]) -> None:
    shown = " ".join(shlex.quote(c) for c in cmd[1:])
    print(f"\n$ python {shown}", flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def comparison_table(summaries: dict[str, dict], topk: Sequence[int]) -> str:
    """A table of final test top-k (mean over runs, %) for each labelled train.py summary.json."""
    head = f"{'model':<10}" + "".join(f"{f'top {k}':>9}" for k in topk) + f"{'MRR':>9}"
    rows = [head]
    for label, summary in summaries.items():
        final = summary["final"]
        cells = [final[f"Test/top {k}"]["mean"] * 100 for k in topk] + [final["Test/MRR"]["mean"] * 100]
        rows.append(f"{label:<10}" + "".join(f"{c:>9.2f}" for c in cells))
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; returns 0, or the failing step's exit status."""
    args = parse_args(argv)
    from featuresExtractor.backbones import cached_weights, resolve_spec

    out = Path(args.out).resolve()
    py = sys.executable
    pretrained = "default" if args.model == "clip_rn50x4" and cached_weights(resolve_spec(args.model)) else "none"
    if pretrained == "none":
        print(BANNER, flush=True)
    features = out / "features" / args.model / f"features_pca{args.pca}.npy"
    topk = (1, 3, 5)
    try:
        _run([py, "-m", "featuresExtractor.drawn_images", str(out / "tll"), "--pairs", str(args.pairs), "--seed", "0",
              "--overwrite"])
        _run([py, "extract.py", "-d", str(out / "tll"), "-s", str(out / "features"), "-b", "64", "--data-aug",
              "--processor", "adapt-pca", str(args.pca), "--model", args.model, "--pretrained", pretrained,
              "--precision", args.precision, "--overwrite"])
        for model in ("original", "dummy"):
            _run([py, "train.py", "-d", str(features), "--model", model, "-s", str(out / "runs" / model),
                  "-e", str(args.epochs), "-r", "1", "-t", "15", "--test-split", "0.25",
                  "-k", *map(str, topk), "--seed", "0", "--overwrite"])
        some_left = sorted((out / "tll" / "left").iterdir())[0]
        _run([py, "similarity.py", "--run", str(out / "runs" / "original" / "run1"), "search", str(some_left),
              "--gallery", str(out / "tll" / "right"), "-k", "5", "--html", str(out / "search.html"), "--overwrite"])
    except subprocess.CalledProcessError as err:
        print(f"demo: step failed with exit status {err.returncode}", file=sys.stderr)
        return err.returncode or 1
    summaries = {m: json.loads((out / "runs" / m / "summary.json").read_text()) for m in ("original", "dummy")}
    print("\nTest retrieval after training (%; 'top k' = partner found within k, either direction):")
    print(comparison_table(summaries, topk))
    if pretrained == "none":
        print("(random-init backbone: these numbers say nothing about the method)")
    print(f"\nTensorBoard logs:  tensorboard --logdir {out / 'runs'}")
    print(f"checkpoint:        {out / 'runs' / 'original' / 'run1' / 'model_and_optimizer.pt'}")
    print(f"search results:    {out / 'search.html'}")
    return 0


if __name__ == "__main__":
    from toolkit.utils import run_cli

    sys.exit(run_cli(main, prog="demo"))
