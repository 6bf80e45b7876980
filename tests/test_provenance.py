"""Issue 30 §2: every file a run's scores depend on (features, extraction manifest, PCA) is hashed in its
checkpoint when trained and checked when used; a checkpoint lacking an entry its format must have is damaged."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from adaptation.checkpoint import CHECKPOINT, FORMAT_VERSION
from test_index import cli, one_error_line
from test_similarity import run  # noqa: F401  (the module-scoped tiny run fixture)


@pytest.fixture()
def copy(run, tmp_path):  # noqa: F811
    """A copy of the tiny run and of its extraction, the checkpoint pointed at the copy; returns helpers."""
    feats = tmp_path / "feats"
    shutil.copytree(run["features"].parent, feats)
    (tmp_path / "run").mkdir()
    ckpt = torch.load(run["run"] / CHECKPOINT, weights_only=True)
    ckpt["config"]["data"] = str(feats / run["features"].name)
    images = [str(run["root"] / "tll" / side / "pair000.png") for side in ("left", "right")]

    def save(change=lambda c: None):
        c = {**ckpt, "provenance": json.loads(json.dumps(ckpt["provenance"]))}
        change(c)
        torch.save(c, tmp_path / "run" / CHECKPOINT)
        return ["--run", str(tmp_path / "run"), "pair", *images]

    return {"feats": feats, "save": save, "ckpt": ckpt}


def test_a_new_checkpoint_records_the_manifest(copy):
    assert copy["ckpt"]["format_version"] == FORMAT_VERSION == 3
    assert set(copy["ckpt"]["provenance"]) == {"features_sha256", "pca_sha256", "manifest_sha256"}
    assert list(copy["ckpt"]["provenance"]["pca_sha256"]) == ["pca8.npz"]


@pytest.mark.parametrize("version", [2, 3])
def test_a_checkpoint_of_format_2_or_later_without_provenance_is_damaged(copy, capsys, version):
    def drop(c):
        del c["provenance"]
        c["format_version"] = version

    code, _, err = cli(copy["save"](drop), capsys)
    assert code == 2 and f"is damaged: a format-{version} checkpoint records the sha256" in one_error_line(err), err
    assert "no provenance entry" in err


def test_a_checkpoint_whose_pca_entry_was_removed_is_damaged(copy, capsys):
    # The PCA's entry gone, and the PCA replaced: the run would score through it without a word.
    (copy["feats"] / "pca8.npz").write_bytes((copy["feats"] / "pca8.npz").read_bytes()[:-1] + b"\0")
    code, _, err = cli(copy["save"](lambda c: c["provenance"]["pca_sha256"].clear()), capsys)
    assert code == 2 and f"records no sha256 of {copy['feats'] / 'pca8.npz'}, a PCA" in one_error_line(err), err


def test_an_edited_extraction_manifest_is_refused(copy, capsys):
    argv = copy["save"]()
    code, before, err = cli(argv, capsys)
    assert code == 0 and "note:" not in err, err
    manifest = copy["feats"] / "manifest.json"
    m = json.loads(manifest.read_text())
    assert m["processor"]["normalize"] != "none"
    m["processor"]["normalize"] = "none"  # the layers' normalisation switched off after training
    manifest.write_text(json.dumps(m, indent=2))
    code, _, err = cli(argv, capsys)
    assert code == 2 and f"{manifest} is not the extraction manifest" in one_error_line(err) and "restore it" in err
    manifest.unlink()
    code, _, err = cli(argv, capsys)
    assert code == 2 and f"{manifest}, the extraction manifest" in one_error_line(err) and "is missing" in err


def test_a_format_3_checkpoint_without_the_manifest_entry_is_damaged(copy, capsys):
    code, _, err = cli(copy["save"](lambda c: c["provenance"].pop("manifest_sha256")), capsys)
    assert code == 2 and "records no sha256 of the extraction manifest" in one_error_line(err), err


def test_older_formats_load_with_a_note_saying_what_is_not_checked(copy, capsys):
    code, before, err = cli(copy["save"](), capsys)
    assert code == 0 and "note:" not in err

    def format2(c):
        c["provenance"].pop("manifest_sha256")
        c["format_version"] = 2

    code, out, err = cli(copy["save"](format2), capsys)
    assert code == 0 and out == before and "no sha256 of its extraction manifest" in err and "format 3" in err, err

    def format1(c):
        del c["provenance"]
        c["format_version"] = 1

    code, out, err = cli(copy["save"](format1), capsys)
    assert code == 0 and out == before and "records no sha256 of its features file, manifest and PCA" in err, err


# ---------------------------------------------------------------- further members of the class (issue 30's search)

def _nudge(path):
    """Rewrite a .npy or .npz with one value changed: still a valid file, other bytes."""
    import numpy as np

    if path.suffix == ".npy":
        a = np.load(path, allow_pickle=False)
        field = next(f for f in ("feature", "left") if f in a.dtype.names)  # a flat or a pairs features file
        a[field][0, 0] += 0.5
        np.save(path, a)
    else:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        arrays["mean_"] = arrays["mean_"] + 0.5
        np.savez(path, **arrays)


def test_train_refuses_features_edited_after_extraction(copy, tmp_path, capsys):
    # Provenance records what is there at training; what is there must first be what extract.py wrote.
    import train
    from conftest import run_script

    features = copy["feats"] / "features_pca8.npy"
    _nudge(features)
    code, _, err = run_script(train, ["-d", features, "-s", tmp_path / "runs", "-e", "1", "-k", "1", "--no-images"],
                              capsys)
    assert code == 2 and f"{features} is not the file extract.py wrote" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()


def test_a_pca_edited_after_extraction_is_refused_even_for_a_format_1_run(copy, capsys):
    def format1(c):
        del c["provenance"]
        c["format_version"] = 1

    _nudge(copy["feats"] / "pca8.npz")
    code, _, err = cli(copy["save"](format1), capsys)
    assert code == 2 and f"{copy['feats'] / 'pca8.npz'} is not the file extract.py wrote" in one_error_line(err), err


def test_a_gallery_features_file_edited_after_extraction_is_refused(run, tmp_path, capsys):  # noqa: F811
    import extract
    from test_similarity import TINY

    assert extract.main(["-d", str(run["gallery"]), "-s", str(tmp_path / "g"), "-p", "adapt", "--normalize", "layers",
                         *TINY]) == 0
    gallery = tmp_path / "g" / "tiny_rn" / "features.npy"
    _nudge(gallery)
    q = str(run["gallery"] / "g0.png")
    code, _, err = cli(["--run", str(run["run"]), "search", q, "--gallery", str(gallery)], capsys)
    assert code == 2 and f"{gallery} is not the file extract.py wrote" in one_error_line(err), err
