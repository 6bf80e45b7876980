"""Positive-pair objectives: SimSiam and BYOL losses, the stop-gradient, the EMA target, collapse."""

import copy
import math

import pytest
import torch

from adaptation.models import build_model
from adaptation.objectives import (
    BYOL,
    COLLAPSE_RATIO,
    SimSiam,
    build_objective,
    byol_loss,
    byol_tau,
    ema_update,
    is_collapsed,
    output_std,
    simsiam_loss,
)
from synthetic.planted import planted_pairs
from adaptation.positive_training import OUTPUT_STD, train_positive
from adaptation.split import split_data, split_indices
from adaptation.training import TrainConfig, make_optimizer, train
from test_adaptation_training import one_thread  # noqa: F401  (autouse fixture shared with that module)
from toolkit.utils import UserError


def naive_simsiam(p1, p2, z1, z2):
    """SimSiam's Algorithm 1, one row at a time, with the stop-gradient spelled out."""
    def D(p, z):
        z = z.detach()
        total = 0.0
        for i in range(p.shape[0]):
            total = total - (p[i] / p[i].norm()) @ (z[i] / z[i].norm())
        return total / p.shape[0]
    return D(p1, z2) / 2 + D(p2, z1) / 2


def naive_byol(p1, p2, t1, t2):
    def L(p, t):
        t = t.detach()
        return sum(((p[i] / p[i].norm() - t[i] / t[i].norm()) ** 2).sum() for i in range(p.shape[0])) / p.shape[0]
    return (L(p1, t2) + L(p2, t1)) / 2


def leaves(n=6, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, d, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(4)]


@pytest.mark.parametrize("loss, naive", [(simsiam_loss, naive_simsiam), (byol_loss, naive_byol)])
def test_loss_value_and_gradient_match_naive(loss, naive):
    fast = leaves()
    slow = [t.detach().clone().requires_grad_(True) for t in fast]
    a, b = loss(*fast), naive(*slow)
    assert a.item() == pytest.approx(b.item(), rel=1e-10)
    a.backward()
    b.backward()
    for f, s in zip(fast[:2], slow[:2]):
        torch.testing.assert_close(f.grad, s.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("loss", [simsiam_loss, byol_loss])
def test_stop_gradient_on_the_target_branch(loss):
    p1, p2, z1, z2 = leaves()
    loss(p1, p2, z1, z2).backward()
    assert p1.grad is not None and p1.grad.abs().sum() > 0 and p2.grad.abs().sum() > 0
    assert z1.grad is None and z2.grad is None


def test_simsiam_encoder_gets_gradient_only_through_the_predictor():
    """Remove the predictor's path and the encoder gets nothing: the z branch is stopped."""
    torch.manual_seed(0)
    obj = build_objective("simsiam", build_model("original", 8, out_dim=16))
    x1, x2 = torch.randn(10, 8), torch.randn(10, 8)
    z1, z2 = obj.encoder(x1), obj.encoder(x2)
    # Predictions from a detached copy: every gradient the encoder could get must come from z.
    p1, p2 = obj.predictor(z1.detach()), obj.predictor(z2.detach())
    simsiam_loss(p1, p2, z1, z2).backward()
    assert obj.encoder.weight_matrix.weight.grad is None
    loss, _ = obj(x1, x2)
    loss.backward()
    assert obj.encoder.weight_matrix.weight.grad.abs().sum() > 0


def test_byol_target_gets_no_gradient_and_follows_by_ema():
    torch.manual_seed(0)
    obj = build_objective("byol", build_model("original", 8, out_dim=16), ema=0.9)
    assert isinstance(obj, BYOL) and all(not p.requires_grad for p in obj.target.parameters())
    loss, _ = obj(torch.randn(10, 8), torch.randn(10, 8))
    loss.backward()
    assert all(p.grad is None for p in obj.target.parameters())
    before_t = obj.target.weight_matrix.weight.detach().clone()
    with torch.no_grad():
        obj.encoder.weight_matrix.weight.add_(1.0)
    online = obj.encoder.weight_matrix.weight.detach().clone()
    obj.after_step(3, 10)
    tau = 1 - (1 - 0.9) * (math.cos(math.pi * 3 / 10) + 1) / 2
    assert obj.tau == pytest.approx(tau)
    torch.testing.assert_close(obj.target.weight_matrix.weight, tau * before_t + (1 - tau) * online)


def test_ema_update_against_hand_computation():
    target, online = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    with torch.no_grad():
        target.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
        target.bias.copy_(torch.tensor([0.0, 10.0]))
        online.weight.copy_(torch.tensor([[5.0, 6.0], [7.0, 8.0]]))
        online.bias.copy_(torch.tensor([2.0, 0.0]))
    ema_update(target, online, 0.75)
    # 0.75 * target + 0.25 * online, by hand
    assert target.weight.tolist() == [[2.0, 3.0], [4.0, 5.0]]
    assert target.bias.tolist() == [0.5, 7.5]
    assert online.weight.tolist() == [[5.0, 6.0], [7.0, 8.0]]


def test_tau_schedule_ends():
    assert byol_tau(0.99, 0, 100) == pytest.approx(0.99)
    assert byol_tau(0.99, 50, 100) == pytest.approx(0.995)
    assert byol_tau(0.99, 100, 100) == pytest.approx(1.0)
    taus = [byol_tau(0.99, k, 100) for k in range(101)]
    assert taus == sorted(taus)


def test_output_std_against_definition_and_bounds():
    z = torch.randn(50, 7, dtype=torch.float64)
    n = z / z.norm(dim=1, keepdim=True)
    mean = n.mean(0)
    slow = (((n - mean) ** 2).sum(0) / (len(n) - 1)).sqrt().mean()
    assert output_std(z).item() == pytest.approx(slow.item(), rel=1e-6)
    # Gaussian rows spread over the sphere: close to 1/sqrt(d).
    big = torch.randn(4000, 64)
    assert output_std(big).item() * 8 == pytest.approx(1.0, abs=0.05)


def test_collapse_detector_fires_on_a_constant_model():
    class Constant(torch.nn.Module):
        out_dim = 32

        def forward(self, x):
            return torch.ones(len(x), 32) + 0 * x.sum()

    std = output_std(Constant()(torch.randn(100, 8))).item()
    assert std < 1e-6 and is_collapsed(std, 32)
    # Nearly constant, with a little noise, is collapsed too.
    near = torch.ones(100, 32) + 1e-3 * torch.randn(100, 32)
    assert is_collapsed(output_std(near).item(), 32)
    assert is_collapsed(float("nan"), 32)


@pytest.fixture(scope="module")
def data():
    pairs = planted_pairs(200, 32, signal_dim=8, nuisance=2.0, seed=0)
    return split_data(pairs, *split_indices(len(pairs), 0.25, seed=0))


def test_collapse_detector_silent_on_trained_models(data):
    """A contrastively trained model is not flagged, with a wide margin."""
    torch.manual_seed(0)
    model = build_model("original", 32)
    cfg = TrainConfig(epochs=40, temperature=15.0, lr=1e-2, topk=(1,))
    train(model, data, cfg, make_optimizer(model, cfg))
    with torch.no_grad():
        std = output_std(torch.cat([model(data.test[0]), model(data.test[1])])).item()
    assert not is_collapsed(std, model.out_dim)
    assert std * math.sqrt(model.out_dim) > 5 * COLLAPSE_RATIO


def fit(name, data, epochs=20, batch_size=64, seed=0, **kw):
    torch.manual_seed(seed)
    obj = build_objective(name, build_model("original", 32), **kw)
    cfg = TrainConfig(epochs=epochs, temperature=15.0, lr=1e-3, topk=(1, 3), batch_size=batch_size, seed=seed)
    return obj, train_positive(obj, data, cfg, make_optimizer(obj, cfg))


@pytest.mark.parametrize("name", ["simsiam", "byol"])
def test_train_positive_reports_the_contrastive_test_figures(data, name):
    obj, history = fit(name, data, epochs=3)
    contrastive = train(build_model("original", 32), data, TrainConfig(epochs=1, topk=(1, 3)))
    test_keys = {k for k in contrastive[0] if k.startswith("Test/")}
    assert test_keys == {k for k in history[0] if k.startswith("Test/")}
    assert set(contrastive[0]) | {OUTPUT_STD} == set(history[0])
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert all(math.isfinite(v) for h in history for v in h.values())


@pytest.mark.parametrize("name", ["simsiam", "byol"])
def test_train_positive_is_deterministic_and_lowers_its_loss(data, name):
    _, a = fit(name, data, epochs=15)
    _, b = fit(name, data, epochs=15)
    assert a == b
    assert a[-1]["Train/Loss"] < a[0]["Train/Loss"]
    _, c = fit(name, data, epochs=3, seed=1)
    assert c != a[:3]


def test_byol_target_moves_during_training(data):
    obj, _ = fit("byol", data, epochs=2)
    assert not torch.equal(obj.target.weight_matrix.weight, obj.encoder.weight_matrix.weight)
    fresh = copy.deepcopy(obj.target)
    obj2, _ = fit("byol", data, epochs=3)
    assert not torch.equal(fresh.weight_matrix.weight, obj2.target.weight_matrix.weight)


def test_single_row_batches_are_left_out(data):
    """A last batch of one row (BatchNorm cannot train on it) is skipped, not an error."""
    n = len(data.train[0])
    _, history = fit("simsiam", data, epochs=2, batch_size=n - 1)
    assert all(math.isfinite(h["Train/Loss"]) for h in history)


def test_dummy_and_unknown_objective_refused():
    with pytest.raises(UserError, match="no parameters"):
        build_objective("simsiam", build_model("dummy", 8))
    with pytest.raises(UserError, match="choose from"):
        build_objective("contrastive", build_model("original", 8))
    with pytest.raises(UserError, match="ema"):
        build_objective("byol", build_model("original", 8), ema=1.5)
    assert isinstance(build_objective("simsiam", build_model("peterson", 8)), SimSiam)


def test_bf16_runs_and_stays_finite(data):
    torch.manual_seed(0)
    obj = build_objective("byol", build_model("original", 32))
    cfg = TrainConfig(epochs=2, temperature=15.0, topk=(1,), precision="bf16", batch_size=64)
    history = train_positive(obj, data, cfg, make_optimizer(obj, cfg))
    assert all(math.isfinite(v) for h in history for v in h.values())


def test_on_epoch_can_stop_a_run(data):
    torch.manual_seed(0)
    obj = build_objective("simsiam", build_model("original", 32))
    cfg = TrainConfig(epochs=10, temperature=15.0, topk=(1,))
    history = train_positive(obj, data, cfg, make_optimizer(obj, cfg), on_epoch=lambda epoch, row: epoch == 3)
    assert [h["epoch"] for h in history] == [1, 2, 3]
