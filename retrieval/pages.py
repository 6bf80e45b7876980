"""Self-contained HTML pages of an applied run: search results (one row per query) and look-alike pairs.

Images are embedded as JPEG data URIs, so each page opens anywhere on its own.

Example:
    >>> page = pairs_page([("a.jpg", "b.jpg", 0.93, "a.jpg", "b.jpg")], title="look-alikes")   # doctest: +SKIP
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Sequence

from PIL import Image

from adaptation.visualize import ImageLike, thumbnail

__all__ = ["search_page", "pairs_page", "GENERATOR", "TABLE_STYLE"]

GENERATOR = '<meta name="generator" content="adaptation-similarity">'
"""In the head of every page written here: how `retrieval.results.written_here` tells them from a user's pages."""


def _data_uri(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


TABLE_STYLE = """<style>body{font-family:sans-serif;margin:1.5em} table{border-collapse:collapse}
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

    `hits` are `retrieval.visual_similarity.Hits`; a query that failed shows its error instead of results.
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
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">{GENERATOR}<title>{html.escape(title)}</title>'
            f"{TABLE_STYLE}</head>\n<body><h1>{html.escape(title)}</h1>\n"
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
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">{GENERATOR}<title>{html.escape(title)}</title>'
            f"{TABLE_STYLE}</head>\n<body><h1>{html.escape(title)}</h1>\n{note}\n<table>\n" + "\n".join(rows)
            + "\n</table>\n</body></html>\n")
