"""The synthetic look-alike pair generator: determinism, layout, pair structure, bad input."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from synthetic import drawn_images as synthetic
from featuresExtractor.dataset import discover
from synthetic.drawn_images import make_images, make_pairs, render_pair
from toolkit.utils import UserError
from toolkit.cli import run_cli

SMALL = (48, 60)


def files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("fmt", ["jpg", "png"])
def test_same_seed_gives_byte_identical_files(tmp_path, fmt):
    a = make_pairs(tmp_path / "a", n_pairs=3, seed=5, size=SMALL, fmt=fmt)
    b = make_pairs(tmp_path / "b", n_pairs=3, seed=5, size=SMALL, fmt=fmt)
    assert a == b
    assert files(tmp_path / "a") == files(tmp_path / "b")
    make_pairs(tmp_path / "c", n_pairs=3, seed=6, size=SMALL, fmt=fmt)
    assert files(tmp_path / "c") != files(tmp_path / "a")


def test_pair_i_does_not_depend_on_the_number_of_pairs(tmp_path):
    make_pairs(tmp_path / "few", n_pairs=2, size=SMALL)
    make_pairs(tmp_path / "many", n_pairs=4, size=SMALL)
    few, many = files(tmp_path / "few"), files(tmp_path / "many")
    assert few == {k: many[k] for k in few}


def test_tll_layout_that_discover_reads(tmp_path):
    names = make_pairs(tmp_path, n_pairs=3, size=SMALL)
    assert names == ["synth_00000.jpg", "synth_00001.jpg", "synth_00002.jpg"]
    assert sorted(p.name for p in (tmp_path / "left").iterdir()) == names
    assert sorted(p.name for p in (tmp_path / "right").iterdir()) == names
    layout = discover(tmp_path)
    assert (layout.kind, layout.names, layout.ignored) == ("pairs", tuple(names), ())
    with Image.open(tmp_path / "right" / names[0]) as img:
        assert (img.format, img.mode, img.size) == ("JPEG", "RGB", SMALL)
    assert not [p for p in tmp_path.rglob(".*")]  # no temporary files left behind


def test_flat_images_are_the_left_sides(tmp_path):
    names = make_images(tmp_path / "flat", 2, seed=3, size=SMALL, fmt="png")
    make_pairs(tmp_path / "pairs", 2, seed=3, size=SMALL, fmt="png")
    assert discover(tmp_path / "flat").kind == "flat"
    for name in names:
        assert (tmp_path / "flat" / name).read_bytes() == (tmp_path / "pairs" / "left" / name).read_bytes()


def test_partners_share_the_composition_but_not_the_style():
    comp = synthetic.compose(0, 1)
    left_style, right_style = synthetic.styles(0, 1)
    jittered = synthetic.jitter(comp, 0, 1)
    assert [s.kind for s in jittered.shapes] == [s.kind for s in comp.shapes]
    assert [s.colour for s in jittered.shapes] == [s.colour for s in comp.shapes]
    assert left_style.background != right_style.background
    assert left_style.outline_width != right_style.outline_width
    for i in range(4):
        left, right = (np.asarray(im, dtype=np.float64) for im in render_pair(seed=0, index=i, size=(64, 80)))
        assert not np.array_equal(left, right)
        assert np.abs(left.mean(axis=(0, 1)) - right.mean(axis=(0, 1))).max() > 1.0


def test_partners_look_more_alike_than_strangers():
    # A crude check that pairing is possible: colour histograms of partners are closer
    # than those of other pairs' images, for most pairs.
    def hist(img):
        h, _ = np.histogramdd(np.asarray(img).reshape(-1, 3), bins=(4, 4, 4), range=[(0, 256)] * 3)
        return h.ravel() / h.sum()

    pairs = [render_pair(seed=0, index=i, size=(64, 80)) for i in range(8)]
    lefts = np.stack([hist(a) for a, _ in pairs])
    rights = np.stack([hist(b) for _, b in pairs])
    dist = np.abs(lefts[:, None] - rights[None]).sum(-1)
    assert (dist.argmin(axis=1) == np.arange(8)).mean() >= 0.5


@pytest.mark.parametrize("kwargs, match", [
    ({"n_pairs": 0}, "n_pairs"),
    ({"seed": -1}, "seed"),
    ({"fmt": "gif"}, "format"),
    ({"size": (5, 60)}, "size"),
    ({"size": (48,)}, "size"),
])
def test_bad_arguments_raise_before_writing(tmp_path, kwargs, match):
    with pytest.raises(UserError, match=match):
        make_pairs(tmp_path / "out", **{"n_pairs": 2, "size": SMALL, **kwargs})
    assert not (tmp_path / "out").exists()


def test_cli_writes_then_refuses_a_non_empty_folder(tmp_path, capsys):
    out = tmp_path / "out"
    args = [str(out), "--pairs", "2", "--size", "40x50"]
    assert run_cli(synthetic.main, args) == 0
    assert len(list((out / "left").iterdir())) == 2
    capsys.readouterr()
    assert run_cli(synthetic.main, args) == 2
    err = capsys.readouterr().err
    assert "not empty" in err and "--overwrite" in err and err.count("\n") == 1

    mine = out / "notes.txt"
    mine.write_text("keep me")
    # --overwrite replaces earlier generated images (stale ones too) and leaves other files alone.
    assert run_cli(synthetic.main, [str(out), "--pairs", "1", "--size", "40x50", "--overwrite"]) == 0
    assert [p.name for p in (out / "left").iterdir()] == ["synth_00000.jpg"]
    assert mine.read_text() == "keep me"


def test_cli_flat_folder_and_bad_input(tmp_path, capsys):
    assert run_cli(synthetic.main, [str(tmp_path / "flat"), "--images", "2", "--size", "40x50",
                                    "--format", "png"]) == 0
    assert sorted(p.name for p in (tmp_path / "flat").iterdir()) == ["synth_00000.png", "synth_00001.png"]
    assert run_cli(synthetic.main, [str(tmp_path / "x"), "--pairs", "0"]) == 2
    assert "--pairs must be a positive integer" in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    assert run_cli(synthetic.main, [str(tmp_path / "file")]) == 2
    assert "not a folder" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:  # argparse's own usage errors exit 2 as well
        synthetic.parse_args([str(tmp_path / "y"), "--size", "big"])
    assert exc.value.code == 2


def test_nuisance_varies_within_a_pair_and_identity_does_not():
    for i in range(6):
        left_style, right_style = synthetic.styles(0, i)
        assert left_style.offset != right_style.offset and left_style.scale != right_style.scale
        assert left_style.noise != right_style.noise
        # Backgrounds are grey and shape colours strong: nuisance and identity live apart.
        for style in (left_style, right_style):
            assert all(len(set(c)) == 1 for c in style.bg_colours)
        for shape in synthetic.compose(0, i).shapes:
            assert max(shape.colour) - min(shape.colour) >= 0.75 * 0.7 * 255 - 1
    comp = synthetic.compose(0, 0)
    plain = synthetic.Style("flat", ((128,) * 3, (128,) * 3), 0, (0, 0, 0), 1.0)
    moved = synthetic.replace(plain, offset=(0.1, 0.0))
    a, b = (np.asarray(synthetic.render(comp, st, (64, 80)), dtype=np.float64) for st in (plain, moved))
    # The same colours, placed elsewhere: the colour histogram hardly changes, the pixels do.
    assert np.abs(a - b).mean() > 5 and np.abs(a.mean(axis=(0, 1)) - b.mean(axis=(0, 1))).max() < 5
    noisy = synthetic.render(comp, synthetic.replace(plain, noise=30.0, noise_seed=1), (64, 80))
    assert noisy.tobytes() == synthetic.render(comp, synthetic.replace(plain, noise=30.0, noise_seed=1), (64, 80)).tobytes()
    assert np.asarray(noisy, dtype=np.float64).std() > a.std()
