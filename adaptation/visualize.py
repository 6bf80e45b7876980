"""Pictures of retrieval: thumbnails, a retrieval grid for TensorBoard, a results page.

Example:
    >>> grid = retrieval_grid([["q.jpg", "a.jpg", "b.jpg"]], [[False, True, False]])   # doctest: +SKIP
    >>> page = results_page("q.jpg", [("a.jpg", "a.jpg", 0.93)], title="query")         # doctest: +SKIP
"""

from __future__ import annotations

import base64
import html
import io
import os
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw, ImageOps

from featuresExtractor.transforms import BadImage, load_image, to_rgb

__all__ = ["thumbnail", "retrieval_grid", "pair_retrieval_grid", "results_page", "search_page", "pairs_page"]

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


def _data_uri(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def results_page(query: ImageLike, results: Sequence[tuple[str, ImageLike | None, float]],
                 title: str = "", size: int = 160, query_name: str | None = None) -> str:
    """A self-contained HTML page: the query, then each (name, image, score) result.

    Images are embedded as JPEG data URIs, so the page opens anywhere on its own.
    `query_name` labels the query (default: its file name).
    """
    default = Path(query).name if not isinstance(query, Image.Image) else "query"
    qname = html.escape(query_name or default)
    cards = "\n".join(
        f'<figure><img src="{_data_uri(thumbnail(img, size))}" alt="{html.escape(name)}">'
        f"<figcaption>#{i} {html.escape(name)}<br>score {score:.4f}</figcaption></figure>"
        for i, (name, img, score) in enumerate(results, start=1))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title or 'search results')}</title>
<style>body{{font-family:sans-serif;margin:1.5em}} figure{{display:inline-block;margin:6px;text-align:center;
font-size:12px;vertical-align:top}} .query img{{outline:4px solid #2858dc}}</style></head>
<body><h1>{html.escape(title or 'search results')}</h1>
<figure class="query"><img src="{_data_uri(thumbnail(query, size))}" alt="{qname}"><figcaption>query: {qname}</figcaption></figure>
<h2>top {len(results)}</h2>
{cards}
</body></html>
"""


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


_TABLE_STYLE = """<style>body{font-family:sans-serif;margin:1.5em} table{border-collapse:collapse}
td{padding:4px;vertical-align:top;text-align:center;font-size:12px;border-bottom:1px solid #ddd}
td.query img{outline:4px solid #2858dc} td.alike img{outline:4px solid #1eaa3c}
.error{color:#b00020;text-align:left}</style>"""


def _cell(image: ImageLike | None, caption: str, size: int, cls: str = "") -> str:
    cls = f' class="{cls}"' if cls else ""
    return (f'<td{cls}><img src="{_data_uri(thumbnail(image, size))}" alt="{html.escape(caption)}"><br>'
            f"{html.escape(caption)}</td>")


def search_page(hits: Sequence, title: str = "search results", size: int = 128,
                threshold: float | None = None, threshold_note: str = "") -> str:
    """A self-contained HTML page with one row per query: the query, then its top-k thumbnails and scores.

    `hits` are `adaptation.similarity.Hits`; a query that failed shows its error instead of results.
    Results scoring at least `threshold` (the run's calibrated one) are framed green and
    labelled "alike"; `threshold_note` says what the threshold is, or that there is none.
    """
    def result(r: int, m) -> str:
        alike = threshold is not None and m.score >= threshold
        return _cell(m.image, f"#{r} {m.name} {m.score:.4f}" + (" alike" if alike else ""), size,
                     "alike" if alike else "")

    rows = []
    for h in hits:
        cells = [_cell(h.image, f"query: {Path(h.query).name}", size, "query")]
        if h.error is not None:
            cells.append(f'<td class="error">cannot read: {html.escape(h.error)}</td>')
        cells += [result(r, m) for r, m in enumerate(h.matches, start=1)]
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"{_TABLE_STYLE}</head>\n<body><h1>{html.escape(title)}</h1>\n"
            + (f"<p>threshold: {html.escape(threshold_note)}</p>\n" if threshold_note else "")
            + "<table>\n" + "\n".join(rows) + "\n</table>\n</body></html>\n")


def pairs_page(pairs: Sequence[tuple[str, str, float, ImageLike | None, ImageLike | None]], total: int | None = None,
               title: str = "look-alike pairs", size: int = 128) -> str:
    """A self-contained HTML page with one row per pair: both thumbnails and the score.

    `total` is how many pairs were found, when `pairs` shows only the first of them.
    """
    rows = [f"<tr><td>#{i}<br>{s:.4f}</td>{_cell(ia, a, size)}{_cell(ib, b, size)}</tr>"
            for i, (a, b, s, ia, ib) in enumerate(pairs, start=1)]
    note = f"<p>showing the best {len(pairs)} of {total} pairs; the CSV lists all.</p>" \
        if total is not None and total > len(pairs) else f"<p>{len(pairs)} pairs.</p>"
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"{_TABLE_STYLE}</head>\n<body><h1>{html.escape(title)}</h1>\n{note}\n<table>\n" + "\n".join(rows)
            + "\n</table>\n</body></html>\n")
