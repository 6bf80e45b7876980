"""Dataset discovery and the image dataset fed to the DataLoader.

Four ways to give the images (`-d`):

* pairs (Totally-Looks-Like style): `DIR/left/` and `DIR/right/`, pairs matched by
  identical file name, never by listing order;
* flat: images directly in `DIR`, one vector per image (galleries);
* a pair list, `PAIRS.csv`: a header with `left` and `right` (and optionally `name`), one pair
  a line; paths relative to the CSV's folder or absolute; the name defaults to the left file's;
* a gallery list, `IMAGES.txt`: one image path a line (relative to the file's folder or
  absolute), named by file name.

In folders, hidden files and files without an image extension are ignored (and counted). In
lists, a missing or unreadable file skips its item and is reported like an unreadable image;
a duplicate name, the same pair twice, a path that is a folder, a missing column or no usable
line at all is refused with the line numbers (`read_list`). Items are sorted by name.

Example:
    >>> layout = discover("TLL")                      # doctest: +SKIP
    >>> layout.kind, layout.sides, len(layout)
    ('pairs', ('left', 'right'), 6016)
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

from .transforms import BadImage, is_image_file, load_image
from toolkit.utils import UserError, decode_text

__all__ = ["Layout", "discover", "read_list", "ImageItems"]


@dataclass(frozen=True)
class Layout:
    """A dataset folder: its kind, the sides of each item and the sorted item names."""

    root: Path
    kind: str  # "pairs" or "flat"
    sides: tuple[str, ...]  # ("left", "right") or ("feature",)
    names: tuple[str, ...]
    ignored: tuple[str, ...] = ()
    paths: tuple[tuple[str, ...], ...] | None = None  # lists only: each item's path per side
    source: str = "folder"  # "folder", "csv" (pair list) or "txt" (gallery list)

    def __len__(self) -> int:
        return len(self.names)

    def select(self, indices: Sequence[int]) -> "Layout":
        """This layout with only the items at `indices` (kept in the order given; pass them sorted)."""
        return replace(self, names=tuple(self.names[i] for i in indices),
                       paths=None if self.paths is None else tuple(self.paths[i] for i in indices))

    def path(self, index: int, side: str) -> Path:
        if self.paths is not None:
            return Path(self.paths[index][self.sides.index(side)])
        name = self.names[index]
        return self.root / name if self.kind == "flat" else self.root / side / name


def _listing(folder: Path) -> tuple[list[str], list[str]]:
    images, ignored = [], []
    for p in sorted(folder.iterdir()):
        try:
            p.name.encode("utf-8")
        except UnicodeEncodeError:
            # Names are stored in JSON and .npy files and printed: they must be text.
            raise UserError(f"the file name {ascii(os.fsencode(p.name))[2:-1]!s} in {folder} is not valid UTF-8; "
                            f"rename it (e.g. with convmv) and re-run") from None
        (images if is_image_file(p) else ignored).append(p.name)
    return images, ignored


def discover(root: str | Path) -> Layout:
    """Inspect `root` and return its `Layout`, or raise `UserError` saying what is wrong."""
    root = Path(root)
    if root.is_file() and root.suffix.lower() in (".csv", ".txt"):
        return read_list(root)
    if root.is_file():
        raise UserError(f"dataset {root} is a file; give a folder, a .csv of pairs (left,right[,name]) or a .txt list "
                        f"of images")
    if root.exists() and not root.is_dir():  # a FIFO, socket or device: never opened (a read would block)
        raise UserError(f"dataset {root} is not a regular file (a FIFO, socket or device); give a folder, a .csv of "
                        f"pairs (left,right[,name]) or a .txt list of images")
    if not root.is_dir():
        raise UserError(f"dataset folder {root} does not exist (expected DIR/left + DIR/right, or a folder of images)")
    left, right = root / "left", root / "right"
    if left.is_dir() and right.is_dir():
        lnames, lign = _listing(left)
        rnames, rign = _listing(right)
        only_left, only_right = sorted(set(lnames) - set(rnames)), sorted(set(rnames) - set(lnames))
        if only_left or only_right:
            orphans = [f"left/{n}" for n in only_left] + [f"right/{n}" for n in only_right]
            raise UserError(
                f"{len(orphans)} image(s) have no partner with the same file name, e.g. {', '.join(orphans[:5])}; "
                f"pairs are matched by name: rename or remove them"
            )
        if not lnames:
            raise UserError(f"no images in {left} and {right} (extensions: .jpg, .png, ...)")
        ignored = tuple([f"left/{n}" for n in lign] + [f"right/{n}" for n in rign])
        return Layout(root, "pairs", ("left", "right"), tuple(lnames), ignored)
    if left.is_dir() != right.is_dir():
        raise UserError(f"{root} has only one of left/ and right/; a pair dataset needs both")
    names, ignored = _listing(root)
    if not names:
        raise UserError(f"no images in {root} (expected DIR/left + DIR/right, or a folder of .jpg/.png images)")
    return Layout(root, "flat", ("feature",), tuple(names), tuple(ignored))


# ---------------------------------------------------------------- lists: PAIRS.csv and IMAGES.txt

def _lines_text(path: Path) -> list[str]:
    try:
        data = path.read_bytes()
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror or err}") from None
    return decode_text(data, str(path), "give a text file: a pair list (left,right[,name]) or an image list "
                                        "(one path a line)").splitlines()


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


def read_list(path: str | os.PathLike) -> Layout:
    """Read `PAIRS.csv` or `IMAGES.txt` into a `Layout` (items sorted by name), or raise `UserError`."""
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


class ImageItems:
    """Items of a layout, decoded and preprocessed: one (sides, 3, H, W) tensor each (a map-style dataset
    for torch's DataLoader; torch is imported by its items, so `discover` works without torch).

    An unreadable image does not raise: the item comes back as zeros with `error`
    set to the reason, so the caller can skip the whole pair and report it.
    """

    def __init__(self, layout: Layout, transform: Callable, indices: Sequence[int], image_shape: tuple[int, ...]):
        self.layout, self.transform = layout, transform
        self.indices, self.image_shape = list(indices), tuple(image_shape)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> dict:
        import torch

        index = self.indices[k]
        images, errors = [], []
        for side in self.layout.sides:
            try:
                images.append(self.transform(load_image(self.layout.path(index, side))))
            except BadImage as err:
                errors.append(f"{side}: {err}" if self.layout.kind == "pairs" else str(err))
                images.append(torch.zeros(self.image_shape))
        return {"index": index, "images": torch.stack(images), "error": "; ".join(errors)}
