"""Subset files: which items of a dataset or a features file to keep (`--subset FILE`).

`read_subset(path)` reads the names a subset file lists, in the file's order, each once.
Three forms are accepted:

* the paper's `TLL_obj.csv`, exactly as published: a header line, then `index,name` rows
  (an integer, then the name; the published file lists each name twice);
* a CSV whose header has a `name` column (other columns are ignored), read with the csv module's
  quoting, so `"a, b.jpg"` is the name `a, b.jpg`, also when `name` is the only column;
* a plain list: one name a line, taken as it is (a name called `name` on the first line is a header).

`match_subset(available, wanted)` says which of the available names the subset keeps and
which of its names are missing; `describe_subset(path, names)` is the record that goes into a
manifest or a run's config (the file, its sha256 and the count). An empty file, a binary file
or one that is not text is refused with a one-line `UserError`; UTF-16 with a byte-order mark is read
(`toolkit.utils.decode_text`).

Example:
    >>> names = read_subset("TLL_obj.csv")                         # doctest: +SKIP
    >>> len(names)                                                  # doctest: +SKIP
    4199
    >>> match_subset(["a.jpg", "b.jpg", "c.jpg"], ["c.jpg", "a", "z.jpg"])
    ([0, 2], ['z.jpg'])
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Sequence

from toolkit.hashing import file_sha256
from toolkit.utils import UserError, decode_text, require_regular_file

__all__ = ["read_subset", "match_subset", "describe_subset", "missing_line"]


def _text(path: Path) -> str:
    if path.exists() and not path.is_dir():
        require_regular_file(path, "subset file")  # a FIFO would block the read forever
    try:
        data = path.read_bytes()
    except IsADirectoryError:
        raise UserError(f"subset file {path} is a folder; give a file of names (one a line, or a CSV)") from None
    except OSError as err:
        raise UserError(f"cannot read subset file {path}: {err.strerror or err}") from None
    return decode_text(data, f"subset file {path}", "give a list of names (one a line, or a CSV with a name column)")


def _is_index(cell: str) -> bool:
    return cell.strip().isdigit()


def read_subset(path: str | os.PathLike) -> list[str]:
    """The names a subset file lists, in file order, each once; a `UserError` for a file that cannot be one."""
    path = Path(path)
    lines = [ln for ln in _text(path).splitlines() if ln.strip()]
    if not lines:
        raise UserError(f"subset file {path} is empty; list one name a line, or give the paper's TLL_obj.csv")
    rows = list(csv.reader(lines))
    header = [c.strip().lower() for c in rows[0]]
    if "name" in header:  # a CSV with a name column, the only one or among others: its quoting is the csv module's
        col = header.index("name")
        names = [r[col].strip() for r in rows[1:] if col < len(r) and r[col].strip()]
    elif len(rows) > 1 and all(len(r) >= 2 and _is_index(r[0]) for r in rows[1:]):
        # index,name rows (the paper's TLL_obj.csv); the first line is a header unless it is a row too
        body = rows if len(rows[0]) >= 2 and _is_index(rows[0][0]) else rows[1:]
        names = [r[1].strip() for r in body if r[1].strip()]
    else:
        names = [ln.strip() for ln in lines]
    if not names:
        raise UserError(f"subset file {path} names no item (a header and no rows)")
    return list(dict.fromkeys(names))


def match_subset(available: Sequence[str], wanted: Sequence[str]) -> tuple[list[int], list[str]]:
    """(positions in `available` the subset keeps, in `available`'s order; the wanted names not found).

    A wanted name matches an available name equal to it, or equal to it without its file extension
    (a subset may list `00001` for the image `00001.jpg`).
    """
    index: dict[str, int] = {}
    stems: dict[str, list[int]] = {}
    for i, name in enumerate(available):
        index[name] = i
        stems.setdefault(os.path.splitext(name)[0], []).append(i)
    kept: set[int] = set()
    missing = []
    for name in wanted:
        if name in index:
            kept.add(index[name])
        elif len(stems.get(name, ())) == 1:
            kept.add(stems[name][0])
        else:
            missing.append(name)
    return sorted(kept), missing


def missing_line(path: str | os.PathLike, missing: Sequence[str], where: str, shown: int = 5) -> str:
    """One line naming the subset's names that `where` lacks: their count, then the first few."""
    more = f" (and {len(missing) - shown} more)" if len(missing) > shown else ""
    return (f"{len(missing)} name(s) in subset file {path} are not in {where}: "
            f"{', '.join(missing[:shown])}{more}")


def describe_subset(path: str | os.PathLike, names: Sequence[str]) -> dict:
    """The record of a subset for a manifest or a run's config: the file, its sha256 and how many names it lists."""
    return {"file": str(Path(path).resolve()), "sha256": file_sha256(path), "count": len(names)}
