"""Subset files (`--subset FILE`): the paper's TLL_obj.csv as published, a name column, a plain list, bad files."""

from __future__ import annotations

import pytest

from featuresExtractor.subset import describe_subset, match_subset, missing_line, read_subset
from toolkit.hashing import file_sha256
from toolkit.utils import UserError

# The paper's format: a header line, then index,name rows, each name listed twice.
PAPER = ",name\n0,b.png\n1,a.png\n2,b.png\n3,a.png\n"


@pytest.mark.parametrize("text,want", [
    (PAPER, ["b.png", "a.png"]),
    ("index,name\n0,b.png\n1,b.png\n", ["b.png"]),
    ("left,name,right\nx,c.png,y\nx,a.png,y\n", ["c.png", "a.png"]),
    ("c.png\n\na.png\nc.png\n", ["c.png", "a.png"]),
    ("\ufeffa, with comma.png\n", ["a, with comma.png"]),
    # A one-column CSV: its header is not a name, and its quotes are the csv module's (issue 30 §4).
    ('name\n"a, b.jpg"\nc.jpg\n"say ""hi"".png"\n', ["a, b.jpg", "c.jpg", 'say "hi".png']),
    ('"name"\n"a, b.jpg"\n', ["a, b.jpg"]),
])
def test_read_subset_forms(tmp_path, text, want):
    path = tmp_path / "subset.csv"
    path.write_text(text, encoding="utf-8")
    assert read_subset(path) == want
    assert describe_subset(path, want) == {"file": str(path.resolve()), "sha256": file_sha256(path), "count": len(want)}


@pytest.mark.parametrize("content,said", [
    (b"", "is empty"), (b"\n \n", "is empty"), (b"PK\x03\x04\x00\x00", "is binary"),
    (b"caf\xe9.png\n", "not UTF-8"), (b"name,x\n", "names no item"),
])
def test_bad_subset_files_are_one_line_errors(tmp_path, content, said):
    path = tmp_path / "subset.txt"
    path.write_bytes(content)
    with pytest.raises(UserError, match=said) as err:
        read_subset(path)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("codec", ["utf-16", "utf-32", "utf-8-sig"])
def test_a_subset_saved_as_unicode_with_a_byte_order_mark_is_read(tmp_path, codec):
    path = tmp_path / "subset.csv"
    path.write_bytes('name\n"a, b.jpg"\ncafé.png\n'.encode(codec))  # utf-16/32 put the byte-order mark first
    assert read_subset(path) == ["a, b.jpg", "café.png"]


@pytest.mark.parametrize("codec", ["utf-16-le", "utf-16-be"])
def test_utf16_without_a_byte_order_mark_is_called_utf16(tmp_path, codec):
    path = tmp_path / "subset.txt"
    path.write_bytes("a.png\nb.png\n".encode(codec))
    with pytest.raises(UserError, match="is UTF-16 text without a byte-order mark; save it as UTF-8") as err:
        read_subset(path)
    assert "binary" not in str(err.value)


def test_every_list_reader_reads_utf16(tmp_path):
    # The other readers of a user's lists: an extraction's image list and a gallery's list file.
    from featuresExtractor.dataset import read_list
    from retrieval.visual_similarity import gallery_items
    from conftest import draw_image

    for name in ("a.png", "b.png"):
        draw_image(tmp_path / name, len(name))
    (tmp_path / "images.txt").write_bytes("a.png\nb.png\n".encode("utf-16"))
    assert read_list(tmp_path / "images.txt").names == ("a.png", "b.png")
    assert [n for n, _ in gallery_items(tmp_path / "images.txt")] == ["a.png", "b.png"]
    (tmp_path / "bare.txt").write_bytes("a.png\n".encode("utf-16-le"))
    for read in (read_list, gallery_items):
        with pytest.raises(UserError, match="bare.txt is UTF-16 text without a byte-order mark"):
            read(tmp_path / "bare.txt")


def test_match_subset_by_name_or_stem_and_missing_line():
    kept, missing = match_subset(["a.jpg", "b.jpg", "c.jpg", "d.png", "d.jpg"], ["c.jpg", "a", "z", "d"])
    assert kept == [0, 2] and missing == ["z", "d"]  # "d" is ambiguous: two files share the stem
    line = missing_line("s.csv", [f"n{i}" for i in range(8)], "the dataset")
    assert line == "8 name(s) in subset file s.csv are not in the dataset: n0, n1, n2, n3, n4 (and 3 more)"


def test_extract_subset_in_the_papers_format(tmp_path, capsys):
    import json

    import numpy as np

    import extract
    from conftest import make_pairs, run_script

    names = make_pairs(tmp_path / "tll", 4)
    subset = tmp_path / "TLL_obj.csv"
    rows = [names[2], names[0], "absent.png"] * 2
    subset.write_text(",name\n" + "".join(f"{i},{n}\n" for i, n in enumerate(rows)))
    argv = ["-d", tmp_path / "tll", "-s", tmp_path / "o", "-p", "adapt", "--subset", subset, "--model", "tiny_rn",
            "--pretrained", "none", "--workers", "0", "--no-progress"]
    code, out, err = run_script(extract, argv, capsys)
    assert code == 0, err
    assert "1 name(s) in subset file" in err and "absent.png" in err
    rec = np.load(tmp_path / "o" / "tiny_rn" / "features.npy")
    assert sorted(rec["name"]) == sorted([names[0], names[2]])
    manifest = json.loads((tmp_path / "o" / "tiny_rn" / "manifest.json").read_text())
    assert manifest["dataset"]["subset"] == {**describe_subset(subset, read_subset(subset)), "items_kept": 2}
    assert manifest["config"]["items"]["count"] == 2
    (tmp_path / "none.txt").write_text("zzz.png\n")
    code, out, err = run_script(extract, argv[:7] + [tmp_path / "none.txt"] + argv[8:], capsys)
    assert code == 2 and err.count("\n") == 1 and "none of the 1 names in subset file" in err
