"""-d PAIRS.csv and -d IMAGES.txt: the same features as folders, skipped files, refused lists."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import extract
from conftest import TINY, draw_image, script_cli
from featuresExtractor.dataset import discover
from toolkit.utils import UserError


cli = script_cli(extract)


def test_pair_csv_gives_the_folder_features_and_skips_missing_files(tmp_path, capsys, pairs_dir):
    names = sorted(p.name for p in (pairs_dir / "left").iterdir())
    # Relative and absolute paths, the right files moved elsewhere, one pair's right file missing.
    other = tmp_path / "elsewhere"
    shutil.copytree(pairs_dir / "right", other)
    lines = ["left,right"] + [f"{pairs_dir / 'left' / n},{'../elsewhere/' + n}" for n in names]
    lines.append(f"{pairs_dir / 'left' / names[0]},../elsewhere/gone.png,extra")  # named after its left file: refused
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "pairs.csv").write_text("\n".join(lines) + "\n")
    code, _, err = cli(["-d", str(lists / "pairs.csv"), "-s", str(tmp_path / "x"), "-p", "adapt", *TINY], capsys)
    assert code == 2 and "duplicate names" in err and "lines 2, 7" in err

    lines = ["name,left,right"] + [f"{n},{pairs_dir / 'left' / n},../elsewhere/{n}" for n in names]
    lines.append(f"lost.png,{pairs_dir / 'left' / names[0]},../elsewhere/gone.png")
    (lists / "pairs.csv").write_text("\n".join(lines) + "\n")
    code, out, err = cli(["-d", str(lists / "pairs.csv"), "-s", str(tmp_path / "o"), "-p", "adapt", *TINY], capsys)
    assert code == 0, err
    assert "skipped 1 unreadable item(s)" in out and "lost.png: right: FileNotFoundError" in out
    code, _, err = cli(["-d", str(pairs_dir), "-s", str(tmp_path / "ref"), "-p", "adapt", *TINY], capsys)
    assert code == 0, err
    got = np.load(tmp_path / "o" / "tiny_rn" / "features.npy")
    ref = np.load(tmp_path / "ref" / "tiny_rn" / "features.npy")
    assert list(got["name"]) == names
    assert got["left"].tobytes() == ref["left"].tobytes() and got["right"].tobytes() == ref["right"].tobytes()
    manifest = json.loads((tmp_path / "o" / "tiny_rn" / "manifest.json").read_text())
    assert manifest["dataset"]["source"] == "csv" and manifest["counts"]["items_skipped"] == 1
    assert manifest["skipped"][0]["name"] == "lost.png"


def test_gallery_txt_named_by_file_sorted_missing_skipped(tmp_path, capsys):
    for i in (2, 0, 1):
        draw_image(tmp_path / "imgs" / f"img{i}.jpg", i)
    (tmp_path / "images.txt").write_text("imgs/img2.jpg\n\n" + f"{tmp_path / 'imgs' / 'img0.jpg'}\nimgs/img1.jpg\n"
                                         "imgs/nope.jpg\n")
    layout = discover(tmp_path / "images.txt")
    assert layout.names == ("img0.jpg", "img1.jpg", "img2.jpg", "nope.jpg") and layout.sides == ("feature",)
    code, out, err = cli(["-d", str(tmp_path / "images.txt"), "-s", str(tmp_path / "o"), "-p", "adapt", *TINY],
                         capsys)
    assert code == 0, err
    rec = np.load(tmp_path / "o" / "tiny_rn" / "features.npy")
    assert list(rec["name"]) == ["img0.jpg", "img1.jpg", "img2.jpg"] and "nope.jpg" in out


@pytest.mark.parametrize("name, text, message", [
    ("pairs.csv", "", "is empty"),
    ("pairs.csv", "left,name\na.png,x\n", "no column 'right'"),
    ("pairs.csv", "left,right\n", "no pairs"),
    ("pairs.csv", "left,right\nimgs/a.png,\n", "line 2: no right path"),
    ("pairs.csv", "left,right\nimgs,imgs/b.png\n", "line 2: {tmp}/imgs is a folder"),
    ("pairs.csv", "left,right\nimgs/a.png,imgs/b.png\nimgs/b.png,imgs/a.png\n./imgs/a.png,imgs/b.png\n",
     "the same pair twice"),
    ("pairs.csv", "left,right\nnowhere/a.png,nowhere/b.png\n", "none of the 2 paths"),
    ("images.txt", "imgs/a.png\nother/a.png\n", "duplicate names: 'a.png' on lines 1, 2"),
    ("images.txt", "\n\n", "is empty"),
    ("images.txt", "imgs\n", "line 1: {tmp}/imgs is a folder"),
    ("list.json", "{}", "is a file"),
])
def test_bad_lists_one_line_exit_2_nothing_written(tmp_path, capsys, name, text, message):
    draw_image(tmp_path / "imgs" / "a.png", 0)
    draw_image(tmp_path / "imgs" / "b.png", 1)
    draw_image(tmp_path / "other" / "a.png", 2)
    (tmp_path / name).write_text(text)
    code, out, err = cli(["-d", str(tmp_path / name), "-s", str(tmp_path / "o"), *TINY], capsys)
    assert code == 2, err
    errors = [line for line in err.splitlines() if line.startswith("extract.py: error:")]
    assert len(errors) == 1 and message.replace("{tmp}", str(tmp_path)) in errors[0], err
    assert "Traceback" not in err and not (tmp_path / "o").exists()


def test_same_pair_twice_names_the_lines(tmp_path):
    draw_image(tmp_path / "a.png", 0)
    draw_image(tmp_path / "b.png", 1)
    (tmp_path / "p.csv").write_text("name,left,right\nx,a.png,b.png\ny,a.png,b.png\n")
    with pytest.raises(UserError, match="lines 2, 3"):
        discover(tmp_path / "p.csv")
