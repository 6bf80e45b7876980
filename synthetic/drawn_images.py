"""Synthetic look-alike pairs drawn with Pillow: an offline stand-in for Totally-Looks-Like.

Each pair starts from one *composition*, its identity: 2 to 4 large shapes (ellipses,
rectangles, triangles, stars, hexagons, crosses) with strong colours, textures (solid,
stripes, dots, checker) and an arrangement, all drawn from the seed. Each side renders it
in its own *style*, the nuisance that varies within a pair: a grey background pattern,
the outline width and grey, the texture scale, where the whole arrangement sits and how
large it is, and per-pixel noise; the right side's shapes are also slightly moved and
turned. What partners share (shapes, colours, arrangement) is what a learned adaptation
can pick out of the features; what changes within a pair is large enough that raw
features confuse pairs (see `demo` for the measured difference).

Everything is a function of `(seed, index)`: the same seed gives byte-identical
files on the same Pillow build, and pair `i` does not depend on how many pairs are
made. Files are written atomically (`toolkit.utils.atomic_path`).

Used by the offline demo (`make demo`), the tests and the benchmarks (`bench/`).

Example:
    >>> names = make_pairs("demo_out/tll", n_pairs=48, seed=0)       # doctest: +SKIP
    >>> names[:2]                                                     # doctest: +SKIP
    ['synth_00000.jpg', 'synth_00001.jpg']
    >>> left, right = render_pair(seed=0, index=0)    # two PIL images, nothing written
    >>> left.size, left.mode, left.tobytes() != right.tobytes()
    ((200, 250), 'RGB', True)

From the shell (refuses a non-empty OUT_DIR unless `--overwrite`):

    python -m synthetic.drawn_images demo_out/tll --pairs 48 --seed 0
"""

from __future__ import annotations

import argparse
import colorsys
import math
import os
import re
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from toolkit.utils import UserError, atomic_path
from toolkit.cli import run_cli

__all__ = [
    "Shape", "Composition", "Style", "FORMATS", "compose", "styles", "jitter", "render", "render_pair", "name_of",
    "make_pairs", "make_images", "parse_args", "main",
]

#: Accepted `fmt` values -> (Pillow format, save options). Options are fixed so output bytes are stable.
FORMATS = {
    "jpg": ("JPEG", {"quality": 90, "optimize": False, "progressive": False, "subsampling": 2}),
    "png": ("PNG", {"optimize": False, "compress_level": 6}),
}
KINDS = ("ellipse", "rectangle", "triangle", "star", "hexagon", "cross")
TEXTURES = ("solid", "stripes", "dots", "checker")
BACKGROUNDS = ("flat", "vgradient", "hgradient", "radial")
PREFIX = "synth_"
#: What earlier runs of the generator wrote: `--overwrite` removes only these.
_OWN_FILE = re.compile(rf"^{PREFIX}\d{{5,}}\.({'|'.join(FORMATS)})$")
_MIN_SIDE, _MAX_SIDE = 16, 4096


@dataclass(frozen=True)
class Shape:
    """One shape of a composition, in coordinates relative to the image (0..1)."""

    kind: str
    cx: float
    cy: float
    radius: float  # relative to the shorter image side
    aspect: float  # height / width before rotation
    angle: float  # degrees
    colour: tuple[int, int, int]
    texture: str
    period: float  # texture period, relative to the shorter image side
    texture_angle: float  # degrees


@dataclass(frozen=True)
class Composition:
    """What the two sides of a pair share: the shapes, back to front."""

    shapes: tuple[Shape, ...]


@dataclass(frozen=True)
class Style:
    """How one side draws a composition: the nuisance that varies within a pair.

    Background (a grey pattern), outlines, texture scale, where the whole arrangement sits
    (`offset`, relative to the image) and how large it is (`scale`), and per-pixel noise
    (std `noise` in grey levels, drawn from `noise_seed`).
    """

    background: str
    bg_colours: tuple[tuple[int, int, int], tuple[int, int, int]]
    outline_width: int  # relative to 200 px; scaled with the image
    outline_colour: tuple[int, int, int]
    texture_scale: float
    offset: tuple[float, float] = (0.0, 0.0)
    scale: float = 1.0
    noise: float = 0.0
    noise_seed: int = 0


def _rng(seed: int, index: int, stream: int) -> np.random.Generator:
    # One independent stream per (seed, pair, purpose): pair i never depends on n_pairs,
    # and changing how a style is drawn does not reshuffle the compositions.
    return np.random.default_rng(np.random.SeedSequence([seed, index, stream]))


def _saturated(rng: np.random.Generator) -> tuple[int, int, int]:
    # Strong colours, kept apart from the grey backgrounds: the identity lives in the hue.
    hue, sat, val = rng.uniform(0, 1), rng.uniform(0.75, 1.0), rng.uniform(0.7, 1.0)
    rgb = colorsys.hsv_to_rgb(hue, sat, val)
    return tuple(int(round(255 * c)) for c in rgb)


def _grey(rng: np.random.Generator) -> tuple[int, int, int]:
    level = int(rng.integers(30, 226))
    return (level, level, level)


def compose(seed: int, index: int) -> Composition:
    """The identity of pair `index` under `seed`: 2 to 4 large shapes, their strong colours,
    textures and arrangement."""
    rng = _rng(seed, index, 0)
    shapes = []
    for _ in range(int(rng.integers(2, 5))):
        shapes.append(Shape(
            kind=KINDS[int(rng.integers(len(KINDS)))],
            cx=float(rng.uniform(0.25, 0.75)), cy=float(rng.uniform(0.25, 0.75)),
            radius=float(rng.uniform(0.15, 0.28)), aspect=float(rng.uniform(0.6, 1.6)),
            angle=float(rng.uniform(0, 360)), colour=_saturated(rng),
            texture=TEXTURES[int(rng.integers(len(TEXTURES)))],
            period=float(rng.uniform(0.04, 0.1)), texture_angle=float(rng.uniform(0, 180)),
        ))
    return Composition(tuple(shapes))


def styles(seed: int, index: int) -> tuple[Style, Style]:
    """The left and right styles of pair `index`: each side draws its own background (grey
    pattern), outline, texture scale, position, scale and noise."""
    rng = _rng(seed, index, 1)
    kinds = rng.permutation(len(BACKGROUNDS))[:2]  # two different background patterns
    # Left: thin or no outline; right: a thick one, so stroke width always differs.
    widths = (int(rng.integers(0, 3)), int(rng.integers(4, 8)))
    scales = (1.0, float(rng.choice([0.7, 1.4])))
    return tuple(
        Style(background=BACKGROUNDS[int(k)], bg_colours=(_grey(rng), _grey(rng)), outline_width=w,
              outline_colour=_grey(rng), texture_scale=s,
              offset=(float(rng.uniform(-0.12, 0.12)), float(rng.uniform(-0.12, 0.12))),
              scale=float(rng.uniform(0.7, 1.2)), noise=float(rng.uniform(0, 40)),
              noise_seed=int(rng.integers(2**31)))
        for k, w, s in zip(kinds, widths, scales)
    )


def jitter(comp: Composition, seed: int, index: int) -> Composition:
    """The same shapes, slightly moved, resized and turned (the right side's layout)."""
    rng = _rng(seed, index, 2)
    return Composition(tuple(
        replace(s, cx=float(np.clip(s.cx + rng.uniform(-0.04, 0.04), 0.1, 0.9)),
                cy=float(np.clip(s.cy + rng.uniform(-0.04, 0.04), 0.1, 0.9)),
                radius=s.radius * float(rng.uniform(0.9, 1.1)), angle=s.angle + float(rng.uniform(-12, 12)))
        for s in comp.shapes
    ))


def _placed(shape: Shape, style: Style) -> Shape:
    """`shape` moved and scaled with the whole arrangement (about the image centre)."""
    dx, dy = style.offset
    return replace(shape, cx=0.5 + (shape.cx - 0.5) * style.scale + dx, cy=0.5 + (shape.cy - 0.5) * style.scale + dy,
                   radius=shape.radius * style.scale)


def _outline(shape: Shape, size: tuple[int, int]) -> list[tuple[float, float]]:
    """The shape's polygon in pixels (ellipses as 48-gons, so every kind can rotate)."""
    w, h = size
    r = shape.radius * min(w, h)
    if shape.kind == "ellipse":
        pts = [(math.cos(t), math.sin(t)) for t in np.linspace(0, 2 * math.pi, 48, endpoint=False)]
    elif shape.kind == "rectangle":
        pts = [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)]
    elif shape.kind == "triangle":
        pts = [(math.cos(t), math.sin(t)) for t in np.linspace(-math.pi / 2, 1.5 * math.pi, 3, endpoint=False)]
    elif shape.kind == "hexagon":
        pts = [(math.cos(t), math.sin(t)) for t in np.linspace(0, 2 * math.pi, 6, endpoint=False)]
    elif shape.kind == "star":
        pts = [((1.0 if k % 2 == 0 else 0.45) * math.cos(t), (1.0 if k % 2 == 0 else 0.45) * math.sin(t))
               for k, t in enumerate(np.linspace(-math.pi / 2, 1.5 * math.pi, 10, endpoint=False))]
    elif shape.kind == "cross":
        a, b = 0.3, 1.0
        pts = [(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b), (-a, a), (-b, a), (-b, -a), (-a, -a)]
    else:
        raise ValueError(f"unknown shape kind {shape.kind!r}")
    c, s = math.cos(math.radians(shape.angle)), math.sin(math.radians(shape.angle))
    cx, cy = shape.cx * w, shape.cy * h
    out = []
    for x, y in pts:
        x, y = x * r, y * r * shape.aspect
        out.append((cx + c * x - s * y, cy + s * x + c * y))
    return out


def _grid(box: tuple[int, int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates (x, y) of the image region `box` = (left, top, right, bottom)."""
    x0, y0, x1, y1 = box
    return np.meshgrid(np.arange(x0, x1, dtype=np.float32), np.arange(y0, y1, dtype=np.float32))


def _texture(shape: Shape, scale: float, size: tuple[int, int], box: tuple[int, int, int, int]) -> Image.Image:
    """The shape's colour and pattern over `box` of the image (cut out later by the mask).

    Patterns use image coordinates, so a texture does not depend on the box it is drawn in.
    """
    base = np.asarray(shape.colour, dtype=np.float32)
    if shape.texture == "solid":
        return Image.new("RGB", (box[2] - box[0], box[3] - box[1]), shape.colour)
    # The second colour: the fill pushed towards black or white, whichever is further.
    other = base * 0.35 if base.mean() > 127 else base + (255 - base) * 0.65
    xx, yy = _grid(box)
    period = max(3.0, shape.period * scale * min(size))
    t = math.radians(shape.texture_angle)
    u, v = xx * math.cos(t) + yy * math.sin(t), -xx * math.sin(t) + yy * math.cos(t)
    if shape.texture == "stripes":
        on = (u // (period / 2)) % 2 == 0
    elif shape.texture == "checker":
        on = ((u // period) + (v // period)) % 2 == 0
    elif shape.texture == "dots":
        du, dv = (u % period) - period / 2, (v % period) - period / 2
        on = du * du + dv * dv > (period * 0.3) ** 2
    else:
        raise ValueError(f"unknown texture {shape.texture!r}")
    rgb = np.where(on[..., None], base, other)
    return Image.fromarray(np.clip(rgb + 0.5, 0, 255).astype(np.uint8), mode="RGB")


def _background(style: Style, size: tuple[int, int]) -> Image.Image:
    a, b = (np.asarray(c, dtype=np.float32) for c in style.bg_colours)
    if style.background == "flat":
        return Image.new("RGB", size, style.bg_colours[0])
    w, h = size
    xx, yy = _grid((0, 0, w, h))
    if style.background == "vgradient":
        t = yy / max(h - 1, 1)
    elif style.background == "hgradient":
        t = xx / max(w - 1, 1)
    elif style.background == "radial":
        t = np.minimum(1.0, np.hypot(xx - w / 2, yy - h / 2) / (0.6 * max(w, h)))
    else:
        raise ValueError(f"unknown background {style.background!r}")
    rgb = a + (b - a) * t[..., None]
    return Image.fromarray(np.clip(rgb + 0.5, 0, 255).astype(np.uint8), mode="RGB")


def render(comp: Composition, style: Style, size: tuple[int, int] = (200, 250)) -> Image.Image:
    """Draw `comp` in `style` as an RGB image of `size` (width, height). Pure: no I/O."""
    img = _background(style, size)
    stroke = round(style.outline_width * min(size) / 200) if style.outline_width else 0
    for shape in comp.shapes:
        shape = _placed(shape, style)
        poly = _outline(shape, size)
        mask = Image.new("L", size, 0)
        ImageDraw.Draw(mask).polygon(poly, fill=255)
        box = mask.getbbox()
        if box is None:  # entirely off the canvas
            continue
        # Texture only the shape's bounding box: a full-size layer per shape costs 5x more.
        img.paste(_texture(shape, style.texture_scale, size, box), box, mask.crop(box))
        if stroke:
            ImageDraw.Draw(img).polygon(poly, outline=style.outline_colour, width=stroke)
    if style.noise > 0:
        noise = np.random.default_rng(style.noise_seed).normal(0.0, style.noise, (size[1], size[0], 1))
        img = Image.fromarray(np.clip(np.asarray(img, dtype=np.float32) + noise + 0.5, 0, 255).astype(np.uint8))
    return img


def render_pair(seed: int = 0, index: int = 0, size: tuple[int, int] = (200, 250)) -> tuple[Image.Image, Image.Image]:
    """The left and right images of pair `index` under `seed` (PIL RGB images, nothing written)."""
    comp = compose(seed, index)
    left_style, right_style = styles(seed, index)
    return render(comp, left_style, size), render(jitter(comp, seed, index), right_style, size)


def _check(n: int, seed: int, size: Sequence[int], fmt: str, what: str) -> tuple[int, int]:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise UserError(f"{what} must be a positive integer (got {n!r})")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise UserError(f"seed must be a non-negative integer (got {seed!r})")
    if fmt not in FORMATS:
        raise UserError(f"unknown image format {fmt!r}; use one of {', '.join(FORMATS)}")
    size = tuple(size)
    if len(size) != 2 or not all(isinstance(v, int) and _MIN_SIDE <= v <= _MAX_SIDE for v in size):
        raise UserError(f"size must be (width, height) with each side from {_MIN_SIDE} to {_MAX_SIDE} px (got {size!r})")
    return size


def _save(img: Image.Image, path: Path, fmt: str) -> None:
    pil_format, options = FORMATS[fmt]
    with atomic_path(path, suffix=path.suffix) as tmp:
        img.save(tmp, format=pil_format, **options)


def name_of(index: int, fmt: str = "jpg") -> str:
    """The file name of pair (or image) `index`, e.g. `synth_00007.jpg`."""
    return f"{PREFIX}{index:05d}.{fmt}"


def make_pairs(out_dir: str | os.PathLike, n_pairs: int = 48, seed: int = 0,
               size: tuple[int, int] = (200, 250), fmt: str = "jpg") -> list[str]:
    """Write `n_pairs` look-alike pairs in the Totally-Looks-Like layout and return their file names.

    Takes the output folder, the number of pairs, a non-negative seed, the image
    size as (width, height) in pixels and the format ("jpg" or "png"). Writes
    `out_dir/left/NAME` and `out_dir/right/NAME` (the same NAME for both sides of a
    pair), replacing files of the same name, and returns the sorted NAMEs.
    Raises `UserError` for bad arguments, before writing anything.
    """
    size = _check(n_pairs, seed, size, fmt, "n_pairs")
    root = Path(out_dir)
    names = []
    for i in range(n_pairs):
        left, right = render_pair(seed, i, size)
        name = name_of(i, fmt)
        _save(left, root / "left" / name, fmt)
        _save(right, root / "right" / name, fmt)
        names.append(name)
    return names


def make_images(out_dir: str | os.PathLike, n: int, seed: int = 0,
                size: tuple[int, int] = (200, 250), fmt: str = "jpg") -> list[str]:
    """Write `n` images in a flat folder (a gallery) and return their sorted file names.

    Image `i` is byte-identical to the left image of pair `i` from `make_pairs`
    with the same seed, size and format. Raises `UserError` for bad arguments.
    """
    size = _check(n, seed, size, fmt, "n")
    root = Path(out_dir)
    names = []
    for i in range(n):
        comp = compose(seed, i)
        name = name_of(i, fmt)
        _save(render(comp, styles(seed, i)[0], size), root / name, fmt)
        names.append(name)
    return names


def _parse_size(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+)x(\d+)", text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT such as 200x250, not {text!r}")
    return int(m.group(1)), int(m.group(2))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line of `python -m synthetic.drawn_images`."""
    p = argparse.ArgumentParser(
        prog="python -m synthetic.drawn_images",
        description="Draw a deterministic set of look-alike image pairs (TLL layout: OUT_DIR/left, OUT_DIR/right).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("out_dir", metavar="OUT_DIR", help="folder to write; must be empty or absent unless --overwrite")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--pairs", type=int, default=48, help="number of pairs (left/NAME, right/NAME)")
    group.add_argument("--images", type=int, default=None, help="write N images in a flat folder instead of pairs")
    p.add_argument("--seed", type=int, default=0, help="the same seed gives byte-identical files")
    p.add_argument("--size", type=_parse_size, default=(200, 250), metavar="WxH", help="image size in pixels")
    p.add_argument("--format", dest="fmt", choices=sorted(FORMATS), default="jpg", help="image format")
    p.add_argument("--overwrite", action="store_true",
                   help="write into a non-empty OUT_DIR, first removing earlier output of this generator "
                        f"({PREFIX}NNNNN.* in OUT_DIR, left/ and right/); other files are left alone")
    return p.parse_args(argv)


def _own_files(root: Path) -> list[Path]:
    return [p for d in (root, root / "left", root / "right") if d.is_dir()
            for p in sorted(d.iterdir()) if p.is_file() and _OWN_FILE.match(p.name)]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the generator from the command line; returns 0, or raises `UserError` (exit 2 via `run_cli`)."""
    args = parse_args(argv)
    root = Path(args.out_dir)
    n = args.images if args.images is not None else args.pairs
    _check(n, args.seed, args.size, args.fmt, "--images" if args.images is not None else "--pairs")
    if root.exists() and not root.is_dir():
        raise UserError(f"{root} exists and is not a folder")
    if root.is_dir() and any(root.iterdir()):
        if not args.overwrite:
            raise UserError(f"{root} is not empty; pass --overwrite to replace earlier generated images, "
                            f"or choose another folder")
        # Stale files from a larger earlier run would otherwise join the dataset.
        for path in _own_files(root):
            path.unlink()
    if args.images is not None:
        names = make_images(root, n, args.seed, args.size, args.fmt)
        print(f"wrote {len(names)} images to {root}/ (seed {args.seed}, {args.size[0]}x{args.size[1]} {args.fmt})")
    else:
        names = make_pairs(root, n, args.seed, args.size, args.fmt)
        print(f"wrote {len(names)} pairs to {root}/left and {root}/right "
              f"(seed {args.seed}, {args.size[0]}x{args.size[1]} {args.fmt})")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
