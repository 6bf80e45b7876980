"""Pictures of retrieval during training: thumbnails and a retrieval grid for TensorBoard.

The HTML pages of applied runs (search and look-alike pairs) are `retrieval.pages`.

Example:
    >>> grid = retrieval_grid([["q.jpg", "a.jpg", "b.jpg"]], [[False, True, False]])   # doctest: +SKIP
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw, ImageOps

from featuresExtractor.transforms import BadImage, load_image, to_rgb

__all__ = ["thumbnail", "retrieval_grid", "pair_retrieval_grid"]

ImageLike = str | os.PathLike | Image.Image


def thumbnail(image: ImageLike | None, size: int = 128) -> Image.Image:
    """A `size` x `size` RGB thumbnail, letterboxed; a grey "missing" tile when unreadable or None."""
    try:
        img = to_rgb(image) if isinstance(image, Image.Image) else (load_image(image) if image is not None else None)
    except BadImage:
        img = None
    if img is None:
        tile = Image.new("RGB", (size, size), (200, 200, 200))
        ImageDraw.Draw(tile).text((8, size // 2 - 6), "missing", fill=(90, 90, 90))
        return tile
    return ImageOps.pad(img, (size, size), color=(255, 255, 255))


def retrieval_grid(rows: Sequence[Sequence[ImageLike | None]], marks: Sequence[Sequence[bool]],
                   size: int = 96, border: int = 4) -> Image.Image:
    """One row per query: the query, then its ranked results; marked cells get a green frame.

    The query's own cell is framed blue. Returns an RGB image.
    """
    cols = max(len(r) for r in rows)
    cell = size + 2 * border
    grid = Image.new("RGB", (cols * cell, len(rows) * cell), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for r, (row, row_marks) in enumerate(zip(rows, marks)):
        for c, (image, marked) in enumerate(zip(row, row_marks)):
            x, y = c * cell, r * cell
            colour = (40, 90, 220) if c == 0 else ((30, 170, 60) if marked else None)
            if colour:
                draw.rectangle((x, y, x + cell - 1, y + cell - 1), fill=colour)
            grid.paste(thumbnail(image, size), (x + border, y + border))
    return grid


def pair_retrieval_grid(sim, names: Sequence[str], dataset_root: str | os.PathLike, n_queries: int = 4,
                        k: int = 5, size: int = 96) -> Image.Image:
    """Left-to-right retrieval of the first `n_queries` pairs, as a grid for TensorBoard.

    `sim` is the (N, N) similarity of left i to right j (true pairs on the diagonal)
    and `names[i]` pair i's file name in `dataset_root/left` and `dataset_root/right`.
    Each row shows the left query, then its top-k right images; the true partner,
    when among them, is framed green.
    """
    import torch

    sim = torch.as_tensor(sim).float().cpu()
    root = Path(dataset_root)
    rows, marks = [], []
    for i in range(min(n_queries, len(names))):
        top = torch.sort(sim[i], descending=True, stable=True).indices[:k].tolist()
        rows.append([root / "left" / names[i]] + [root / "right" / names[j] for j in top])
        marks.append([False] + [j == i for j in top])
    return retrieval_grid(rows, marks, size=size)
