"""The offline demo behind `make demo`: draw look-alike pairs, extract, train, compare, search.

Runs the README's own commands, printed before each runs, on a deterministic set of
synthetic look-alike pairs (`synthetic.drawn_images`: partners share shapes, colours
and arrangement; background, position, scale, outlines and pixel noise change within each
pair). It trains the `original` adaptation with a validation split, fits the closed-form
shared CCA (`--model cca`, k chosen on the validation pairs, about a second) and scores the
untrained `dummy` baseline (raw features) on the same split, prints their test top-1/3/5 and MRR,
scores one held-out pair with the calibrated threshold, searches the held-out pairs' right
images with a held-out left one, and says where the TensorBoard logs, checkpoints and the
search page are.

The CLIP RN50x4 weights are used when they are already in the Hugging Face cache;
otherwise the backbone is randomly initialised, and the demo says so. What it then shows
is that the adaptation learns, from training pairs, to ignore what changes within a pair
and rank held-out partners above the raw features; it says nothing about CLIP features or
the paper's figures on Totally-Looks-Like (see `WHAT_IT_SHOWS`).

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

__all__ = ["build_parser", "parse_args", "main", "comparison_table"]

ROOT = Path(__file__).resolve().parent
BANNER = """
##########################################################################
#  The CLIP RN50x4 weights are not in the Hugging Face cache, so this    #
#  demo runs on a RANDOMLY INITIALISED backbone (--pretrained none).     #
#  It shows the adaptation learning on drawn pairs, nothing about CLIP   #
#  or the paper's figures. Run `python extract.py ...` once while online #
#  to cache the weights, or pass --weights FILE, to use the real ones.   #
##########################################################################
"""
WHAT_IT_SHOWS = """\
What this shows: the pairs are drawn so that partners share shapes, colours and arrangement
while background, position, scale, outlines and pixel noise change within each pair. The
raw features (dummy) mix both; the adaptation, trained on {n_train} pairs, learns to weigh
what partners share and ranks the {n_test} held-out partners better. cca is one linear map
fitted in closed form on the same pairs (the directions along which partners agree, weighed
against how much they differ), its k chosen on the validation pairs.
What it cannot show: how the method does on real look-alikes (Totally-Looks-Like) or with
CLIP's trained weights; the drawn pairs follow one simple rule, the same in training and
test, and with {n_test} test pairs one pair is {step:.1f} points of top-1."""


MODELS = ("original", "cca", "dummy")
"""The demo's train.py runs, in the table's order."""
ONE_EVALUATION = ("dummy", "cca")
"""Models evaluated once (nothing trained over epochs): their best validation row is their only row."""


def build_parser() -> argparse.ArgumentParser:
    """demo.py's argument parser (all options have demo-sized defaults); its help is also the
    command-line reference of the HTML docs."""
    from toolkit.cli import HelpFormatter

    p = argparse.ArgumentParser(prog="demo.py", description="Run the whole pipeline offline.",
                                formatter_class=HelpFormatter)
    p.add_argument("--out", default="demo_out", help="folder for everything the demo writes (replaced on each run)")
    p.add_argument("--pairs", type=int, default=96, help="synthetic look-alike pairs to draw")
    p.add_argument("--epochs", type=int, default=150, help="training epochs, as the paper's recipe")
    p.add_argument("--model", default="clip_rn50x4", help="backbone; tiny_rn runs in seconds (used by the tests)")
    p.add_argument("--pca", type=int, default=64, help="PCA size (at most 2 x pairs)")
    p.add_argument("--val-split", default="0.2", help="share of the training pairs held out for validation")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                   help="extraction precision; auto: bf16 where it is native (AVX512-BF16 or AMX, CUDA), else fp32")
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the demo's options (see `python demo.py -h`)."""
    return build_parser().parse_args(argv)


def _run(cmd: list[str]) -> None:
    shown = " ".join(shlex.quote(c) for c in cmd[1:])
    print(f"\n$ python {shown}", flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def comparison_table(summaries: dict[str, dict], topk: Sequence[int]) -> str:
    """A table of test top-k and MRR (mean over runs, %) for each labelled train.py summary.json.

    Each summary gives its last-epoch row; one with a validation split (`best_val`) also a
    row at its best validation epoch, labelled `LABEL@val`, except `ONE_EVALUATION`'s (the same row).
    """
    head = f"{'model':<14}" + "".join(f"{f'top {k}':>9}" for k in topk) + f"{'MRR':>9}"
    rows = [head]
    for label, summary in summaries.items():
        for name, key in ((label, "final"), (f"{label}@val", "best_val")):
            if key not in summary or (key == "best_val" and label in ONE_EVALUATION):
                continue
            fig = summary[key]
            cells = [fig[f"Test/top {k}"]["mean"] * 100 for k in topk] + [fig["Test/MRR"]["mean"] * 100]
            rows.append(f"{name:<14}" + "".join(f"{c:>9.2f}" for c in cells))
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; returns 0, or the failing step's exit status."""
    args = parse_args(argv)
    from featuresExtractor.backbones import resolve_spec
    from featuresExtractor.clip_models import cached_weights
    from featuresExtractor.processor import AdaptPCA

    out = Path(args.out).resolve()
    _check_gallery(out)
    py = sys.executable
    pretrained = "default" if args.model == "clip_rn50x4" and cached_weights(resolve_spec(args.model)) else "none"
    if pretrained == "none":
        print(BANNER, flush=True)
    features = out / "features" / args.model / AdaptPCA(args.pca).reduced_file
    topk = (1, 3, 5)
    try:
        _run([py, "-m", "synthetic.drawn_images", str(out / "tll"), "--pairs", str(args.pairs), "--seed", "0",
              "--overwrite"])
        # No --data-aug: the time goes to twice as many pairs instead of flipped copies.
        _run([py, "extract.py", "-d", str(out / "tll"), "-s", str(out / "features"), "-b", "64",
              "--processor", "adapt-pca", str(args.pca), "--model", args.model, "--pretrained", pretrained,
              "--precision", args.precision, "--overwrite"])
        for model in MODELS:
            epochs = [] if model == "cca" else ["-e", str(args.epochs)]  # cca: a closed form, no epochs
            _run([py, "train.py", "-d", str(features), "--model", model, "-s", str(out / "runs" / model), *epochs,
                  "-r", "1", "-t", "15", "--test-split", "0.25", "--val-split", args.val_split,
                  "-k", *map(str, topk), "--seed", "0", "--overwrite"])
        run = out / "runs" / "original" / "run1"
        query, gallery = _held_out_gallery(out, run)
        _run([py, "similarity.py", "--run", str(run), "pair", str(query), str(out / "tll" / "right" / query.name)])
        _run([py, "similarity.py", "--run", str(run), "search", str(query), "--gallery", str(gallery),
              "-k", "5", "--html", str(out / "search.html"), "--overwrite"])
    except subprocess.CalledProcessError as err:
        print(f"demo: step failed with exit status {err.returncode}", file=sys.stderr)
        return err.returncode or 1
    summaries = {m: json.loads((out / "runs" / m / "summary.json").read_text()) for m in MODELS}
    config = summaries["original"]["config"]
    print("\nTest retrieval (%; 'top k' = partner found within k, either direction; "
          "@val = at the best validation epoch, the others at the last):")
    print(comparison_table(summaries, topk))
    cca = json.loads((out / "runs" / "cca" / "run1" / "config.json").read_text())
    print(f"(cca kept {cca['cca']['k']} of {cca['in_dim']} directions, k chosen on validation top-1)")
    print(WHAT_IT_SHOWS.format(n_train=config["n_train"], n_test=config["n_test"], step=100 / config["n_test"]))
    if pretrained == "none":
        print("(random-init backbone: nothing here is about CLIP features or the paper's figures)")
    print(f"\nTensorBoard logs:  tensorboard --logdir {out / 'runs'}")
    print(f"checkpoints:       {run / 'model_and_optimizer.pt'} (last epoch), {run / 'best.pt'} (best validation)")
    print(f"search results:    {out / 'search.html'}")
    return 0


def _check_gallery(out: Path) -> None:
    """Before any work: OUT/gallery, which the demo replaces, must be missing or the demo's own (byte-identical copies
    of OUT/tll/right images, nothing else): a user's folder there is refused, never deleted."""
    import filecmp

    from toolkit.utils import UserError

    gallery, source = out / "gallery", out / "tll" / "right"
    if not (gallery.exists() or gallery.is_symlink()):
        return
    own = gallery.is_dir() and not gallery.is_symlink() and all(
        e.is_file() and not e.is_symlink() and (source / e.name).is_file()
        and filecmp.cmp(e, source / e.name, shallow=False) for e in gallery.iterdir())
    if not own:
        raise UserError(f"--out {out} holds gallery, which is not the demo's (copies of {source}'s images only); it is "
                        f"left alone: move it away or choose another --out")


def _held_out_gallery(out: Path, run: Path) -> tuple[Path, Path]:
    """A test pair's left image, and a folder of the test pairs' right images (never seen in training)."""
    import shutil

    from adaptation.checkpoint import load_checkpoint

    names = load_checkpoint(run / "model_and_optimizer.pt")[1]["test_names"]
    gallery = out / "gallery"
    shutil.rmtree(gallery, ignore_errors=True)  # an earlier demo's copies (`_check_gallery`): nothing is lost
    gallery.mkdir(parents=True)
    for name in names:
        shutil.copyfile(out / "tll" / "right" / name, gallery / name)
    return out / "tll" / "left" / names[0], gallery


if __name__ == "__main__":
    from toolkit.cli import run_cli

    sys.exit(run_cli(main, prog="demo"))
