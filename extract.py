"""extract.py: images -> CLIP multi-layer features (and their PCA), for train.py.

Usage (the published recipe):

    python extract.py -d PATH/TO/DATASET -s PATH/WHERE/TO/SAVE -b 2048 --data-aug --processor adapt-pca 256

`DATASET` holds `left/` and `right/` (pairs matched by file name) or just images; or it is a
`PAIRS.csv` (left,right[,name]) or an `IMAGES.txt` list (see `featuresExtractor.dataset`).
Several processes (GPUs, or CPU ranks with gloo) share one extraction under torchrun:

    torchrun --nproc_per_node K extract.py -d DATASET -s SAVE -b 2048 --data-aug --processor adapt-pca 256

(see `toolkit.distributed`; rank 0 writes the outputs and prints the summary).

Outputs land in `SAVE/MODEL/`: `features.npy`, `features_pca256.npy`,
`pca256.npz` (+ `.pkl`) and `manifest.json`. See `featuresExtractor.processor`
for the processors and `featuresExtractor.store` for the file format.

Example:
    >>> import extract
    >>> extract.main(["-d", "demo/tll", "-s", "out", "--model", "tiny_rn",
    ...               "--pretrained", "none", "-p", "adapt"])      # doctest: +SKIP
    0
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Sequence

__all__ = ["build_parser", "parse_args", "main"]


def build_parser() -> argparse.ArgumentParser:
    """extract.py's argument parser; its help is also the command-line reference of the HTML docs."""
    from toolkit.cli import HelpFormatter

    p = argparse.ArgumentParser(
        prog="extract.py", description="Extract CLIP multi-layer image features for the adaptation function.",
        formatter_class=HelpFormatter, allow_abbrev=False)
    # -d/--data as the paper's extract.py spells it; --dataset kept as an alias.
    p.add_argument("-d", "--data", "--dataset", dest="dataset", metavar="PATH",
                   help="folder with left/ and right/ (pairs), a folder of images, a PAIRS.csv (columns "
                        "left,right[,name]) or an IMAGES.txt (one path a line); list paths are relative to the "
                        "list or absolute (required)")
    p.add_argument("-s", "--save-to", help="output folder; files go to SAVE_TO/MODEL/ (required)")
    p.add_argument("--list-models", action="store_true",
                   help="print the backbone registry (the paper's 37 names and more): library, identifier, taps "
                        "with pooled dims, whether the weights are cached; then exit")
    p.add_argument("-b", "--batch-size", type=int, default=2048,
                   help="images per forward pass on CUDA (halved on out-of-memory); the CPU runs slices of at most 32")
    aug = p.add_mutually_exclusive_group()
    aug.add_argument("--data-aug", dest="data_aug", action="store_true", help="also extract horizontally flipped copies")
    aug.add_argument("--no-data-aug", dest="data_aug", action="store_false", help="only the images as they are (the default)")
    p.add_argument("-p", "--processor", nargs="+", default=["adapt-pca", "256"], metavar="NAME [N]",
                   help="adapt | adapt-pca N | pca N | save (default: adapt-pca 256)")
    p.add_argument("--normalize", choices=("none", "layers", "all"), default=None,
                   help="which parts to L2-normalise before concatenation (default: per processor; adapt-pca: layers)")
    p.add_argument("--model", default="clip_rn50x4",
                   help="one of the paper's names (--list-models), an open_clip architecture, or a timm/torchvision "
                        "model (timm:NAME[.TAG], torchvision:NAME)")
    p.add_argument("--pretrained", default="default",
                   help="open_clip/timm pretrained tag or torchvision weights name; 'default' (the default) = the "
                        "model's own weights (openai for the CLIP models); 'none' = random init (tests, offline demo)")
    p.add_argument("--weights", default=None, help="local checkpoint, no download: an open_clip state dict or .safetensors (read without "
                        "pickle), or an OpenAI TorchScript archive (read with torch.jit.load; use files you trust)")
    p.add_argument("--layers", nargs="+", default=None, metavar="MODULE",
                   help="module paths to tap (in model.visual for open_clip, in the model for timm/torchvision), "
                        "overriding the model's defaults ('embedding' = output)")
    p.add_argument("--transform", choices=("library", "paper"), default="library",
                   help="library: each model's own eval transform; paper: the paper's Resize([224, 224]) (a squeeze, no "
                        "crop) with ImageNet mean and std for every non-CLIP model (CLIP models keep CLIP's), for exact "
                        "comparisons; recorded in the manifest, another choice is another configuration")
    p.add_argument("--subset", default=None, metavar="FILE",
                   help="extract only the items this file names: the paper's TLL_obj.csv (index,name rows), a CSV with "
                        "a name column, or one name a line")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="fp32",
                   help="autocast precision; auto: bf16 where it is native (CUDA with bf16, CPUs with AVX512-BF16 or "
                        "AMX), else fp32; bf16/fp16 on a CPU without them are emulated, several times slower (warned)")
    p.add_argument("--engine", choices=("auto", "torch", "folded", "onnxruntime"), default="auto",
                   help="how the CPU runs the model in fp32, all within float rounding of torch: torch (the pinned bytes), "
                        "folded (batch norms folded), onnxruntime (an ONNX graph, cached in the user's cache folder; the "
                        "[export] extra); auto: what bench/engines.py measured 1.2x faster on this kind of CPU, else torch")
    p.add_argument("--device", default=None, help="torch device: cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    # None, not the number: the help (and the HTML docs made from it) must not depend on the machine.
    p.add_argument("--workers", type=int, default=None,
                   help="DataLoader decode workers (default: None = one per CPU core but one, at most 8)")
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false",
                   help="keep the default NCHW memory format")
    p.add_argument("--strict", action="store_true", help="fail on an unreadable image instead of skipping its pair")
    p.add_argument("--overwrite", action="store_true", help="replace results of another configuration in SAVE_TO/MODEL")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse extract.py's command line (see `python extract.py -h`)."""
    p = build_parser()
    args = p.parse_args(argv)
    if not args.list_models and (args.dataset is None or args.save_to is None):
        p.error("the following arguments are required: -d/--data, -s/--save-to")
    return args


def print_models() -> None:
    """Print `featuresExtractor.backbones.list_models()`: one line per name, its taps and pooled dims below it."""
    from featuresExtractor.backbones import list_models

    for row in list_models():
        ident = row["identifier"] + (f" ({row['tag']})" if row["tag"] != "-" else "")
        print(f"{row['name']:<24} {row['library']:<12} {ident:<52} {row['status']:<18} {row['cached']}")
        if row["taps"]:
            print(" " * 25 + "taps: " + ", ".join(f"{t} {d}" for t, d in row["taps"].items()))
        if row["status"] != "available":
            print(" " * 25 + row["note"])


FLAGS = {"batch_size": "-b/--batch-size", "workers": "--workers", "normalize": "--normalize", "strict": "--strict",
         "device": "--device"}
"""Library parameter names as this script's flags, for error messages."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run extract.py; returns the exit status (0 on success, 2 on bad input)."""
    import contextlib
    import io

    from toolkit.distributed import Ranks

    ranks = Ranks.from_env()
    # Under torchrun every rank parses the same command line; rank 0 alone says what is wrong with it.
    with contextlib.redirect_stderr(io.StringIO()) if ranks.rank else contextlib.nullcontext():
        args = parse_args(argv)
    if args.list_models:
        if ranks.rank == 0:
            print_models()
        return 0
    return _run(args, ranks)


def _run(args: argparse.Namespace, ranks) -> int:
    from featuresExtractor.backbones import load_backbone, resolve_spec
    from featuresExtractor.engines import resolve_engine
    from featuresExtractor.pipeline import ExtractConfig, extract
    from toolkit.device import choose_device
    from toolkit.hardware import resolve_precision
    from toolkit.utils import check_writable, default_workers, flag_names, require_utf8

    require_utf8({"-d": args.dataset, "-s": args.save_to, "--weights": args.weights, "--subset": args.subset})

    device = choose_device(args.device, ranks, cpu_hint="--device cpu")  # one GPU per rank
    precision = resolve_precision(args.precision, device)
    for line in (precision.note, precision.warning):
        if line and ranks.rank == 0:
            print(f"extract.py: {line}", file=sys.stderr)
    engine, _ = resolve_engine(args.engine, device, precision.precision)  # an impossible --engine: said before any work
    with flag_names(FLAGS):
        cfg = ExtractConfig(dataset=args.dataset, save_to=args.save_to, processor=tuple(args.processor),
                            normalize=args.normalize, data_aug=args.data_aug, precision=precision.precision,
                            engine=engine, batch_size=args.batch_size,
                            workers=default_workers() if args.workers is None else args.workers, device=str(device),
                            channels_last=args.channels_last, strict=args.strict, overwrite=args.overwrite,
                            progress=args.progress, subset=args.subset)
    # The config has checked its values; the dataset (and subset) are checked too before a large model loads.
    from featuresExtractor.pipeline import dataset_items
    from featuresExtractor.subset import missing_line

    layout, missing = dataset_items(cfg.dataset, cfg.subset)
    if missing and ranks.rank == 0:
        print(f"note: {missing_line(cfg.subset, missing, cfg.dataset)}; extracting the {len(layout)} it names there",
              file=sys.stderr)
    ranks.check_items(len(layout))
    # auto weighs the onnxruntime graph's one-off build against the images this run has.
    n_images = len(layout) * len(layout.sides) * (2 if cfg.data_aug else 1)
    engine, engine_note = resolve_engine(args.engine, device, precision.precision, n_images=n_images)
    cfg = dataclasses.replace(cfg, engine=engine)
    check_writable(cfg.save_to, "-s")
    ranks = ranks.join(device)
    spec = resolve_spec(args.model, args.layers, args.pretrained)
    backbone = load_backbone(spec, weights=args.weights, device=device, transform=args.transform)
    if engine_note and ranks.rank == 0:  # said once the model is there: a refusal before it stays one line
        print(f"extract.py: {engine_note}", file=sys.stderr)
    if backbone.weights["source"] == "random-init" and ranks.rank == 0:
        print("WARNING: the backbone is RANDOMLY INITIALISED (--pretrained none): the features say nothing "
              "about the method", file=sys.stderr)
    try:
        with flag_names(FLAGS):
            report = extract(cfg, backbone, ranks)
    except KeyboardInterrupt as err:  # Ctrl-C, or SIGTERM/SIGHUP (toolkit.utils.Terminated) under run_cli
        if ranks.rank == 0:  # under torchrun every rank is stopped; one line says it
            print("extract.py: interrupted; finished batches are kept: re-run the same command to resume",
                  file=sys.stderr)
        return getattr(err, "exit_code", 130)
    if ranks.rank == 0:  # rank 0 prints the summary
        _print_report(report, ranks)
    return 0


def _print_report(report, ranks) -> None:
    """What an extraction did: the items kept, those skipped and why, the files written."""
    if report.already_done:
        print(f"already done: {report.out_dir} holds this configuration's results (manifest.json); nothing to do")
        return
    print(f"kept {report.n_kept}/{report.n_items} items"
          + (f" (resumed after {report.resumed_items})" if report.resumed_items else "")
          + (f" on {ranks.world_size} ranks" if ranks.distributed else ""))
    if report.skipped:
        print(f"skipped {len(report.skipped)} unreadable item(s), listed in manifest.json:")
        for name, reason in list(report.skipped.items())[:10]:
            print(f"  {name}: {reason}")
        if len(report.skipped) > 10:
            print(f"  ... and {len(report.skipped) - 10} more")
    for path in report.outputs:
        print(f"wrote {path}")


if __name__ == "__main__":
    from toolkit.cli import run_cli

    sys.exit(run_cli(main))
