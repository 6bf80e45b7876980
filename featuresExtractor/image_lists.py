"""Datasets given as lists: `PAIRS.csv` (left,right[,name]) and `IMAGES.txt` (one path a line).

This module reads and checks both list formats and returns a `featuresExtractor.dataset.Layout`
whose items carry their own paths; `featuresExtractor.dataset.discover` calls it for a `-d`
that is a `.csv` or `.txt` file.

Paths are relative to the list's folder, or absolute. A file that is missing or unreadable is
not an error here: its item is skipped at extraction and listed in the manifest, as an
unreadable image is. Refused, with the line numbers: an empty list, a CSV without a `left` or
`right` column, a line with an empty path, a path that is a folder, two items with one name
(a CSV can name its pairs in a `name` column), the same pair twice, and a list none of whose
paths exists.

Example:
    >>> layout = read_list("pairs.csv")           # doctest: +SKIP
    >>> layout.kind, layout.sides, layout.names[:2]
    ('pairs', ('left', 'right'), ('a.jpg', 'b.jpg'))
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

from toolkit.utils import UserError

__all__ = ["read_list"]


def _lines_text(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise UserError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror or err}") from None
    return text.splitlines()


def _resolve(base: Path, text: str) -> Path:
    p = Path(os.path.expanduser(text))
    return p if p.is_absolute() else base / p


def _check_path(path: Path, where: str) -> None:
    if path.is_dir():
        raise UserError(f"{where}: {path} is a folder, not an image; list image files")


def _refuse_duplicates(keys: dict, what: str, source: Path, hint: str) -> None:
    repeated = {k: lines for k, lines in keys.items() if len(lines) > 1}
    if repeated:
        shown = "; ".join(f"{k!r} on lines {', '.join(map(str, v))}" for k, v in list(repeated.items())[:3])
        more = f" (and {len(repeated) - 3} more)" if len(repeated) > 3 else ""
        raise UserError(f"{source}: {what}: {shown}{more}; {hint}")


def _read_csv(path: Path) -> tuple[list[tuple[str, tuple[str, ...], int]], tuple[str, ...]]:
    lines = _lines_text(path)
    if not any(ln.strip() for ln in lines):
        raise UserError(f"{path} is empty; a pair list has a header line left,right[,name] and one pair a line")
    reader = csv.reader(lines)
    header = [h.strip() for h in next(reader)]
    missing = [c for c in ("left", "right") if c not in header]
    if missing:
        raise UserError(f"{path} has no column {' or '.join(repr(c) for c in missing)} (header: {','.join(header)}); "
                        f"the first line must name the columns left,right[,name]")
    col = {c: header.index(c) for c in ("left", "right", "name") if c in header}
    items = []
    for lineno, row in enumerate(reader, start=2):
        if not any(cell.strip() for cell in row):
            continue
        cells = {c: (row[i].strip() if i < len(row) else "") for c, i in col.items()}
        empty = [c for c in ("left", "right") if not cells[c]]
        if empty:
            raise UserError(f"{path} line {lineno}: no {' and no '.join(empty)} path")
        paths = tuple(str(_resolve(path.parent, cells[c])) for c in ("left", "right"))
        for p in paths:
            _check_path(Path(p), f"{path} line {lineno}")
        items.append((cells.get("name") or Path(cells["left"]).name, paths, lineno))
    if not items:
        raise UserError(f"{path} has a header but no pairs")
    same: dict[tuple[str, ...], list[int]] = {}
    for _, paths, lineno in items:
        same.setdefault(tuple(os.path.normpath(p) for p in paths), []).append(lineno)
    _refuse_duplicates({" , ".join(k): v for k, v in same.items()}, "the same pair twice", path, "keep one line each")
    return items, ("left", "right")


def _read_txt(path: Path) -> tuple[list[tuple[str, tuple[str, ...], int]], tuple[str, ...]]:
    items = []
    for lineno, line in enumerate(_lines_text(path), start=1):
        if not line.strip():
            continue
        p = _resolve(path.parent, line.strip())
        _check_path(p, f"{path} line {lineno}")
        items.append((p.name, (str(p),), lineno))
    if not items:
        raise UserError(f"{path} is empty; a gallery list has one image path a line")
    return items, ("feature",)


def read_list(path: str | os.PathLike):
    """Read `PAIRS.csv` or `IMAGES.txt` into a `Layout` (items sorted by name), or raise `UserError`."""
    from .dataset import Layout

    path = Path(path)
    items, sides = _read_csv(path) if path.suffix.lower() == ".csv" else _read_txt(path)
    names: dict[str, list[int]] = {}
    for name, _, lineno in items:
        names.setdefault(name, []).append(lineno)
    hint = "give each pair its own name in a 'name' column" if len(sides) == 2 else "rename the files"
    _refuse_duplicates(names, "duplicate names", path, hint)
    if not any(os.path.exists(p) for _, paths, _ in items for p in paths):
        raise UserError(f"none of the {sum(len(p) for _, p, _ in items)} paths in {path} exists (relative paths "
                        f"are taken from {path.parent.resolve()}); check the paths")
    items.sort(key=lambda item: item[0])
    return Layout(path, "pairs" if len(sides) == 2 else "flat", sides, tuple(n for n, _, _ in items),
                  paths=tuple(p for _, p, _ in items), source=path.suffix.lower()[1:])
