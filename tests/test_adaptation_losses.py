"""The contrastive loss against a naive per-pair loop."""

import math

import pytest
import torch

from adaptation.fused import Workspace, similarity_and_loss, symmetric_cross_entropy
from adaptation.losses import contrastive_loss, contrastive_loss_from_similarity, similarity_matrix


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


# The plain definition and the fused path (which falls back to the plain one above |scale| 40).
@pytest.mark.parametrize("n,d,temperature", [(1, 3, 1.0), (5, 4, 1.0), (7, 16, 15.0), (12, 2, 0.5), (6, 3, 50.0), (5, 4, -3.0)])
def test_loss_matches_naive_loop(n, d, temperature):
    g = torch.Generator().manual_seed(n * 100 + d)
    left, right = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    got = contrastive_loss(left, right, temperature)
    fused = symmetric_cross_entropy(similarity_matrix(left, right), temperature)
    assert got.dtype == torch.float32 and got.shape == () and fused.dtype == torch.float32
    assert got.item() == pytest.approx(naive_loss(left, right, temperature), rel=1e-5, abs=1e-6)
    assert fused.item() == pytest.approx(naive_loss(left, right, temperature), rel=1e-5, abs=1e-6)


def test_loss_is_symmetric_in_left_and_right():
    g = torch.Generator().manual_seed(0)
    left, right = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    assert contrastive_loss(left, right, 3.0).item() == pytest.approx(contrastive_loss(right, left, 3.0).item(), rel=1e-6)


def test_all_zero_vectors_give_zero_cosines_not_nan():
    # A ReLU adaptation can output an all-zero vector; the paper's code clamped the norm for this.
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
    symmetric_cross_entropy(a, temperature).backward()
    contrastive_loss_from_similarity(b, temperature).backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-7)


def test_fused_loss_gradcheck_in_double():
    g = torch.Generator().manual_seed(3)
    sim = torch.rand(6, 6, generator=g, dtype=torch.float64).mul(2).sub(1).requires_grad_()
    assert torch.autograd.gradcheck(lambda s: symmetric_cross_entropy(s, 7.0), (sim,))


# The fused node used by training: same values as the two-step composition, under autocast too.
@pytest.mark.parametrize("temperature", [15.0, -3.0, 50.0])
@pytest.mark.parametrize("product_dtype", [None, torch.bfloat16])
def test_similarity_and_loss_matches_composition(temperature, product_dtype):
    g = torch.Generator().manual_seed(4)
    left, right = torch.randn(40, 16, generator=g), torch.randn(40, 16, generator=g)
    left[3] = 0.0  # a dead ReLU output: the clamped norm's gradient path
    l1, r1 = left.clone().requires_grad_(), right.clone().requires_grad_()
    sim, loss = similarity_and_loss(l1, r1, temperature, product_dtype, Workspace())
    loss.backward()
    l2, r2 = left.clone().requires_grad_(), right.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=product_dtype is not None):
        want_sim = similarity_matrix(l2, r2)
    want = contrastive_loss_from_similarity(want_sim, temperature)
    want.backward()
    assert sim.dtype == want_sim.dtype and not sim.requires_grad and loss.dtype == torch.float32
    torch.testing.assert_close(sim, want_sim.detach(), rtol=0, atol=0)
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)
    torch.testing.assert_close(l1.grad, l2.grad, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(r1.grad, r2.grad, rtol=1e-4, atol=1e-7)


def test_similarity_and_loss_matches_naive_loop():
    g = torch.Generator().manual_seed(5)
    left, right = torch.randn(7, 16, generator=g), torch.randn(7, 16, generator=g)
    _, loss = similarity_and_loss(left, right, 15.0)
    assert loss.item() == pytest.approx(naive_loss(left, right, 15.0), rel=1e-5, abs=1e-6)


def test_similarity_and_loss_gradcheck_in_double():
    g = torch.Generator().manual_seed(6)
    left = torch.randn(6, 4, generator=g, dtype=torch.float64).requires_grad_()
    right = torch.randn(6, 4, generator=g, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: similarity_and_loss(a, b, 7.0)[1], (left, right))


def test_workspace_is_reused_and_a_clobbered_graph_refuses_backward():
    ws = Workspace()
    g = torch.Generator().manual_seed(7)
    left = torch.randn(5, 3, generator=g, requires_grad=True)
    right = torch.randn(5, 3, generator=g, requires_grad=True)
    sim1, loss1 = similarity_and_loss(left, right, 2.0, workspace=ws)
    sim2, loss2 = similarity_and_loss(right, left, 2.0, workspace=ws)
    assert sim1.data_ptr() == sim2.data_ptr()  # the same N x N matrix, not a new one
    loss2.backward()
    with pytest.raises(RuntimeError, match="inplace"):
        loss1.backward()  # its saved exponentials were overwritten by the second call


def test_workspace_serves_a_smaller_batch_from_the_largest_buffer():
    ws = Workspace()
    big = ws.get("sim", (6, 6), torch.float32, "cpu")
    small = ws.get("sim", (4, 5), torch.float32, "cpu")
    assert small.shape == (4, 5) and small.is_contiguous() and small.data_ptr() == big.data_ptr()
    assert ws.get("sim", (6, 6), torch.float64, "cpu").data_ptr() != big.data_ptr()  # another dtype, another block
    grown = ws.get("sim", (7, 7), torch.float32, "cpu")
    assert grown.shape == (7, 7) and ws.get("sim", (6, 6), torch.float32, "cpu").data_ptr() == grown.data_ptr()
    # The last, smaller batch of an epoch gives the full batch's values and gradients, and a graph
    # whose matrices a smaller call overwrote still refuses its backward.
    g = torch.Generator().manual_seed(8)
    left = torch.randn(7, 3, generator=g, dtype=torch.float64, requires_grad=True)
    right = torch.randn(7, 3, generator=g, dtype=torch.float64, requires_grad=True)
    _, expected = similarity_and_loss(left[:4], right[:4], 2.0, workspace=Workspace())
    _, first = similarity_and_loss(left, right, 2.0, workspace=ws)
    _, second = similarity_and_loss(left[:4], right[:4], 2.0, workspace=ws)
    assert torch.equal(second, expected)
    with pytest.raises(RuntimeError, match="inplace"):
        first.backward()


def test_similarity_and_loss_rejects_mismatched_shapes():
    with pytest.raises(ValueError):
        similarity_and_loss(torch.zeros(3, 2), torch.zeros(4, 2), 1.0)


@pytest.mark.parametrize("bounds", [[(0, 3), (3, 7)], [(0, 4), (4, 5), (5, 7)], [(0, 7), (7, 7)]],
                         ids=["two", "three-uneven", "one-empty"])
@pytest.mark.parametrize("temperature", [15.0, -3.0])
def test_row_block_loss_over_the_ranks_is_the_plain_loss_and_its_gradient(bounds, temperature):
    from adaptation.fused import row_block_loss
    from adaptation.losses import contrastive_loss_from_similarity

    g = torch.Generator().manual_seed(9)
    n, world = 7, len(bounds)
    sim = torch.nn.functional.normalize(torch.randn(n, 5, generator=g, dtype=torch.float64), dim=1)
    sim = (sim @ torch.nn.functional.normalize(torch.randn(n, 5, generator=g, dtype=torch.float64), dim=1).T)
    plain = sim.clone().requires_grad_()
    expected = contrastive_loss_from_similarity(plain, temperature)
    expected.backward()
    # Each simulated rank adds the other ranks' column sums, as the all-reduce would.
    col_part = [torch.exp(temperature * sim[a:b] - abs(temperature)).sum(0) for a, b in bounds]
    losses, grads = [], []
    for r, (a, b) in enumerate(bounds):
        block = sim[a:b].clone().requires_grad_()
        others = sum(p for q, p in enumerate(col_part) if q != r)
        loss = row_block_loss(block, a, n, temperature, world, lambda x: x + others)
        loss.backward()
        losses.append(loss.detach())
        grads.append(block.grad)
    assert torch.stack(losses).mean().item() == pytest.approx(expected.item(), rel=1e-12)
    # Averaged over the ranks (as DDP does), each rank's rows get the plain loss's gradient.
    assert torch.allclose(torch.cat(grads) / world, plain.grad, atol=1e-12)


def test_row_block_loss_refuses_a_scale_outside_its_range():
    from adaptation.fused import FUSED_MAX_SCALE, row_block_loss

    with pytest.raises(ValueError, match="plain"):
        row_block_loss(torch.zeros(2, 2), 0, 2, FUSED_MAX_SCALE + 1, 1, lambda x: x)
