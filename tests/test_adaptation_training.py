"""The epoch loop on planted pairs: it learns, it is deterministic, bf16 follows fp32."""

import pytest
import torch

from adaptation.split import split_data, split_indices
from adaptation.models import build_model
from synthetic.planted import planted_pairs
from adaptation.training import TrainConfig, make_optimizer, train


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # These problems are tiny: one thread is as fast, and spares a busy 2-core machine from
    # OpenMP oversubscription, which slows such small ops tenfold.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data():
    pairs = planted_pairs(200, 32, signal_dim=8, nuisance=2.0, seed=0)
    return split_data(pairs, *split_indices(len(pairs), 0.25, seed=0))


def fit(name, data, epochs=40, precision="fp32", seed=0, callback=None):
    torch.manual_seed(seed)
    model = build_model(name, 32)
    cfg = TrainConfig(epochs=epochs, temperature=15.0, lr=1e-2, topk=(1, 5), precision=precision)
    return train(model, data, cfg, make_optimizer(model, cfg), on_epoch=callback)


def test_adaptation_beats_raw_features(data):
    dummy = fit("dummy", data)[-1]["Test/top 1"]
    original = fit("original", data)[-1]["Test/top 1"]
    peterson = fit("peterson", data)[-1]["Test/top 1"]
    assert dummy < 0.1
    assert original > dummy + 0.2
    assert peterson > dummy + 0.15


def test_history_shape_and_callback(data):
    seen = []
    history = fit("original", data, epochs=3, callback=lambda e, m: seen.append((e, m)))
    assert [h["epoch"] for h in history] == [1, 2, 3] and [e for e, _ in seen] == [1, 2, 3]
    expected = {"Train/Loss", "Test/Loss", "Test/top 1", "Test/top 5", "Train/top 1", "Test/left2right top 5",
                "Test/right2left top 1", "Test/MRR", "Train/MRR"}
    assert expected <= set(history[0])
    assert history[2]["Train/Loss"] < history[0]["Train/Loss"]


def test_dummy_is_flat(data):
    history = fit("dummy", data, epochs=3)
    assert history[0] | {"epoch": 3} == history[2]


def test_same_seed_same_history(data):
    assert fit("original", data, epochs=5, seed=3) == fit("original", data, epochs=5, seed=3)
    assert fit("original", data, epochs=5, seed=3) != fit("original", data, epochs=5, seed=4)


def test_bf16_follows_fp32(data):
    fp32 = fit("original", data, precision="fp32")[-1]
    bf16 = fit("original", data, precision="bf16")[-1]
    assert bf16["Test/top 1"] == pytest.approx(fp32["Test/top 1"], abs=0.1)
    assert bf16["Train/Loss"] == pytest.approx(fp32["Train/Loss"], rel=0.2)


def test_config_rejects_bad_values():
    with pytest.raises(ValueError):
        TrainConfig(precision="fp16")
    with pytest.raises(ValueError):
        TrainConfig(topk=(0,))
