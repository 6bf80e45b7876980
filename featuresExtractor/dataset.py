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
line at all is refused with the line numbers. Items are sorted by name.

Example:
    >>> layout = discover("TLL")                      # doctest: +SKIP
    >>> layout.kind, layout.sides, len(layout)
    ('pairs', ('left', 'right'), 6016)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from .transforms import BadImage, is_image_file, load_image
from toolkit.utils import UserError

__all__ = ["Layout", "discover", "ImageItems"]


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
        from .image_lists import read_list

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
