"""The contrastive loss against a naive per-pair loop."""

import math

import pytest
import torch

from adaptation.losses import _reference_loss, contrastive_loss, contrastive_loss_from_similarity, similarity_matrix


def naive_loss(left, right, temperature):
    """Symmetric cross-entropy written out pair by pair, in float64 Python arithmetic."""
    n = len(left)
    cos = [[0.0] * n for _ in range(n)]
    for i in range(n):
        for j in range(n):
            a, b = left[i].double(), right[j].double()
            cos[i][j] = float(a @ b) / (max(float(a.norm()), 1e-8) * max(float(b.norm()), 1e-8))
    l2r = r2l = 0.0
    for i in range(n):
        row = [temperature * cos[i][j] for j in range(n)]
        col = [temperature * cos[j][i] for j in range(n)]
        l2r += -row[i] + math.log(sum(math.exp(v) for v in row))
        r2l += -col[i] + math.log(sum(math.exp(v) for v in col))
    return 0.5 * l2r / n + 0.5 * r2l / n


# 50 and -3 take the plain autograd path, the others the fused one.
@pytest.mark.parametrize("n,d,temperature", [(1, 3, 1.0), (5, 4, 1.0), (7, 16, 15.0), (12, 2, 0.5), (6, 3, 50.0), (5, 4, -3.0)])
def test_loss_matches_naive_loop(n, d, temperature):
    g = torch.Generator().manual_seed(n * 100 + d)
    left, right = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    got = contrastive_loss(left, right, temperature)
    assert got.dtype == torch.float32 and got.shape == ()
    assert got.item() == pytest.approx(naive_loss(left, right, temperature), rel=1e-5, abs=1e-6)


def test_loss_is_symmetric_in_left_and_right():
    g = torch.Generator().manual_seed(0)
    left, right = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    assert contrastive_loss(left, right, 3.0).item() == pytest.approx(contrastive_loss(right, left, 3.0).item(), rel=1e-6)


def test_all_zero_vectors_give_zero_cosines_not_nan():
    # A ReLU adaptation can output an all-zero vector; the seed clamped the norm for this.
    left = torch.zeros(3, 4)
    right = torch.randn(3, 4)
    sim = similarity_matrix(left, right)
    assert torch.equal(sim, torch.zeros(3, 3))
    assert contrastive_loss(left, right, 15.0).item() == pytest.approx(math.log(3))


def test_bf16_similarity_gives_fp32_loss_close_to_fp32():
    g = torch.Generator().manual_seed(1)
    left, right = torch.randn(32, 64, generator=g), torch.randn(32, 64, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sim = similarity_matrix(left, right)
    assert sim.dtype == torch.bfloat16
    loss = contrastive_loss_from_similarity(sim, 15.0)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(contrastive_loss(left, right, 15.0).item(), rel=2e-2)


def test_gradient_flows_to_both_sides():
    left = torch.randn(4, 3, requires_grad=True)
    right = torch.randn(4, 3, requires_grad=True)
    contrastive_loss(left, right, 2.0).backward()
    assert left.grad.abs().sum() > 0 and right.grad.abs().sum() > 0


@pytest.mark.parametrize("temperature", [1.0, 15.0, 40.0])
def test_fused_gradient_matches_plain_autograd(temperature):
    g = torch.Generator().manual_seed(2)
    sim = similarity_matrix(torch.randn(9, 5, generator=g), torch.randn(9, 5, generator=g)).detach()
    a = sim.clone().requires_grad_()
    b = sim.clone().requires_grad_()
    contrastive_loss_from_similarity(a, temperature).backward()
    _reference_loss(b, temperature).backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-7)


def test_fused_loss_gradcheck_in_double():
    g = torch.Generator().manual_seed(3)
    sim = torch.rand(6, 6, generator=g, dtype=torch.float64).mul(2).sub(1).requires_grad_()
    assert torch.autograd.gradcheck(lambda s: contrastive_loss_from_similarity(s, 7.0), (sim,))
