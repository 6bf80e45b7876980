"""featuresExtractor.processor: a processor name becomes a type in one place, and the type answers the rest."""

from __future__ import annotations

import numpy as np
import pytest

from featuresExtractor.pca import PCAParams
from featuresExtractor.processor import KINDS, Adapt, AdaptPCA, PerTapPCA, Processor, Save, parse_processor
from toolkit.utils import UserError

DIMS = {"layer1": 6, "layer4": 10, "attnpool": 8}


def _pooled(n: int = 5, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {tap: rng.normal(size=(n, d)).astype(np.float32) for tap, d in DIMS.items()}


def _pcas(proc: Processor) -> dict[str, PCAParams]:
    rng = np.random.default_rng(1)
    out = {}
    for stem, tap in proc.pca_stems(list(DIMS)).items():
        d = sum(DIMS.values()) if tap is None else DIMS[tap]
        k = proc.n_components
        out[stem] = PCAParams(np.linalg.qr(rng.normal(size=(d, k)))[0].T.astype(np.float32),
                              np.zeros(d, np.float32), np.ones(k, np.float32), np.full(k, 1 / k, np.float32))
    return out


@pytest.mark.parametrize("tokens, kind, normalize", [
    (["adapt"], Adapt, "all"), (["adapt-pca", "3"], AdaptPCA, "layers"), (["pca", "2"], PerTapPCA, "none"),
    (["save"], Save, "none")])
def test_tokens_become_a_type_and_a_manifest_record_the_same_one(tokens, kind, normalize):
    proc = parse_processor(tokens)
    assert type(proc) is kind and proc.normalize == normalize and proc.label == " ".join(tokens)
    assert Processor.from_record(proc.record()) == proc and KINDS[proc.record()["name"]] is kind
    assert parse_processor(tokens, "all").normalize == "all"


@pytest.mark.parametrize("tokens", [["adapt"], ["adapt-pca", "3"], ["pca", "2"]])
def test_files_name_exactly_what_project_writes(tokens):
    proc = parse_processor(tokens)
    out = proc.project(_pooled(), "attnpool", _pcas(proc))
    assert {f: v.shape[-1] for f, v in out.items()} == proc.files(DIMS)
    for file, dim in proc.files(DIMS).items():
        parts = proc.parts(file, DIMS)
        if file == "features_pca3.npy":  # adapt-pca's one PCA mixes the taps: no part is a tap's
            assert parts == {}
        else:
            assert max(stop for _, stop in parts.values()) == dim


def test_adapt_pca_projects_its_own_concatenation():
    proc = parse_processor(["adapt-pca", "3"])
    pcas = _pcas(proc)
    out = proc.project(_pooled(), "attnpool", pcas)
    np.testing.assert_array_equal(out[proc.reduced_file], pcas["pca3"].transform(out["features.npy"]))
    assert proc.concatenates and not parse_processor(["pca", "3"]).concatenates and not Save().pooled


@pytest.mark.parametrize("tokens, message", [
    (["zoom"], "unknown processor"), (["adapt-pca"], "needs one positive integer N"),
    (["pca", "0"], "needs one positive integer N"), (["adapt", "4"], "takes no argument"), ([], "unknown processor")])
def test_errors_name_the_flag(tokens, message):
    with pytest.raises(UserError) as err:
        parse_processor(tokens)
    assert str(err.value).startswith("-p/--processor") and message in str(err.value)


def test_a_pca_larger_than_its_data_is_refused_naming_the_flag():
    with pytest.raises(UserError, match=r"^-p/--processor pca 7: .*above the 6 dimensions of the smallest tap"):
        parse_processor(["pca", "7"]).check_components(100, DIMS)
    with pytest.raises(UserError, match=r"^-p/--processor adapt-pca 30: .*above the 20 vectors.*N <= 20"):
        parse_processor(["adapt-pca", "30"]).check_components(20, DIMS)
    parse_processor(["adapt-pca", "20"]).check_components(20, DIMS)
