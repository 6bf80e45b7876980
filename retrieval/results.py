"""Search results and look-alike pairs as JSON / CSV files: written by similarity.py, read back here.

Search results, one entry per query:

- JSON: `[{"query", "image", "error", "matches": [{"rank", "name", "score", "image"}, ...]}, ...]`
- CSV: columns `query, rank, name, score, image, error`; a query that failed has one row with
  empty rank/name/score and its `error`.

Pairs CSV: columns `name_a, name_b, score, image_a, image_b`, best first, each pair once.

Example:
    >>> from retrieval.visual_similarity import Hits, Match
    >>> hits = [Hits("q.jpg", "q.jpg", [Match("a.jpg", 0.9, "a.jpg")])]
    >>> write_text("out.json", search_results_text(hits, "out.json"))   # doctest: +SKIP
    >>> read_search_results("out.json") == hits                         # doctest: +SKIP
    True
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Mapping, Sequence

from toolkit.utils import UserError, atomic_paths, first_line

from .pages import GENERATOR, TABLE_STYLE
from .visual_similarity import Hits, Match

__all__ = ["written_here", "write_text", "write_texts", "search_results_text", "read_search_results",
           "write_pairs", "pairs_text", "read_pairs", "SEARCH_COLUMNS", "PAIR_COLUMNS"]

SEARCH_COLUMNS = ("query", "rank", "name", "score", "image", "error")
PAIR_COLUMNS = ("name_a", "name_b", "score", "image_a", "image_b")


def written_here(path: str | os.PathLike) -> bool:
    """Whether the file at `path` is one similarity.py writes (by its suffix: search results as JSON, results
    or pairs as CSV, a page as HTML), so that `--overwrite` may replace it; a user's file of the same name
    is never replaced."""
    suffix = Path(path).suffix.lower()
    try:
        with open(path, "rb") as fh:
            head = fh.read(4096) if suffix != ".json" else fh.read()
    except OSError:
        return False
    text = head.decode("utf-8", errors="replace")
    if suffix == ".csv":
        first = text.split("\n", 1)[0].strip()
        return first in (",".join(SEARCH_COLUMNS), ",".join(PAIR_COLUMNS))
    if suffix in (".html", ".htm"):  # pages from before the generator tag carry the same style block
        head = text.split("</head>", 1)[0]
        return GENERATOR in head or TABLE_STYLE in head
    try:
        rows = json.loads(text)
    except ValueError:
        return False
    return isinstance(rows, list) and all(isinstance(r, dict) and set(r) == {"query", "image", "error", "matches"}
                                          for r in rows)


def write_text(path: str | os.PathLike, text: str, overwrite: bool = True) -> None:
    """Write `text` as UTF-8 atomically; a failure is one `UserError` line and leaves `path` as it was.

    With `overwrite=False` a file at `path` is never replaced, even one another process wrote since the
    caller checked (`UserError`).
    """
    write_texts({path: text}, overwrite)


def write_texts(texts: Mapping[str | os.PathLike, str], overwrite: bool = True) -> None:
    """Write several files that belong together (`write_text` for each): all of them, or none changed."""
    paths = list(texts)
    try:
        with atomic_paths(paths, replace=overwrite) as tmps:
            for path, tmp in zip(paths, tmps):
                try:
                    tmp.write_text(texts[path], encoding="utf-8")
                except OSError as err:  # a write through a file object does not say which file
                    raise OSError(err.errno, err.strerror, str(path)) from None
    except FileExistsError as err:
        raise UserError(f"{err.filename} appeared while this run was working (another run writing it?); it is left "
                        f"as it is, and nothing else was written: pass --overwrite or choose another name") from None
    except (OSError, UnicodeEncodeError) as err:
        where = getattr(err, "filename", None) or ", ".join(map(str, paths))
        raise UserError(f"cannot write {where} ({first_line(err)}); choose a writable place") from None


def _format(path: str | os.PathLike) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in (".json", ".csv"):
        raise UserError(f"{path}: results are written as .json or .csv")
    return suffix[1:]


def search_results_text(hits: Sequence[Hits], path: str | os.PathLike) -> str:
    """Search results as the text of `path` (JSON or CSV, by its suffix), for `write_text`/`write_texts`."""
    if _format(path) == "json":
        rows = [{"query": h.query, "image": h.image, "error": h.error,
                 "matches": [{"rank": r, "name": m.name, "score": m.score, "image": m.image}
                             for r, m in enumerate(h.matches, start=1)]} for h in hits]
        return json.dumps(rows, indent=1) + "\n"
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(SEARCH_COLUMNS)
    for h in hits:
        if h.error is not None:
            w.writerow([h.query, "", "", "", h.image or "", h.error])
        for r, m in enumerate(h.matches, start=1):
            w.writerow([h.query, r, m.name, repr(m.score), m.image or "", ""])
    return buf.getvalue()


def read_search_results(path: str | os.PathLike) -> list[Hits]:
    """Read search results `search_results_text` made (JSON or CSV) back into `Hits`."""
    fmt = _format(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
        if fmt == "json":
            return [Hits(e["query"], e["image"], [Match(m["name"], float(m["score"]), m["image"]) for m in e["matches"]],
                         e["error"]) for e in json.loads(text)]
        rows = list(csv.DictReader(io.StringIO(text)))
        hits: dict[str, Hits] = {}
        for row in rows:
            h = hits.setdefault(row["query"], Hits(row["query"], None, [], None))
            if row["error"]:
                hits[row["query"]] = Hits(h.query, row["image"] or None, h.matches, row["error"])
            else:
                h.matches.append(Match(row["name"], float(row["score"]), row["image"] or None))
        return list(hits.values())
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"cannot read results file {path} ({first_line(err)})") from None


def write_pairs(rows: Sequence[tuple[str, str, float, str | None, str | None]], path: str | os.PathLike,
                overwrite: bool = True) -> None:
    """Write look-alike pairs (name_a, name_b, score, image_a, image_b) atomically as CSV (see `write_text`)."""
    write_text(path, pairs_text(rows), overwrite)


def pairs_text(rows: Sequence[tuple[str, str, float, str | None, str | None]]) -> str:
    """The CSV `write_pairs` writes, as text."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(PAIR_COLUMNS)
    for a, b, s, ia, ib in rows:
        w.writerow([a, b, repr(float(s)), ia or "", ib or ""])
    return buf.getvalue()


def read_pairs(path: str | os.PathLike) -> list[tuple[str, str, float, str | None, str | None]]:
    """Read a pairs CSV written by `write_pairs`."""
    try:
        reader = csv.DictReader(io.StringIO(Path(path).read_text(encoding="utf-8")))
        missing = [c for c in PAIR_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise UserError(f"{path} is not a pairs file: no column {', '.join(missing)} (expected {', '.join(PAIR_COLUMNS)})")
        # A short row reads None for its last fields (float(None): TypeError).
        return [(r["name_a"], r["name_b"], float(r["score"]), r["image_a"] or None, r["image_b"] or None) for r in reader]
    except (OSError, ValueError, TypeError) as err:
        raise UserError(f"cannot read pairs file {path} ({first_line(err)})") from None
