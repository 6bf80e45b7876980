"""The training objective: a symmetric, temperature-scaled contrastive loss over cosine similarities.

For N pairs with adapted left vectors `l_i` and right vectors `r_j`, let
`S[i, j] = cos(l_i, r_j)`. The loss is

    0.5 * CE(t * S, arange(N)) + 0.5 * CE(t * S.T, arange(N))

where CE is the mean cross-entropy over rows and `t` is the temperature. As in the seed, the
temperature *multiplies* the cosines (the seed's `-t 15` sharpens the softmax), it does not
divide them.

`similarity_matrix` and `contrastive_loss_from_similarity` are split so that the training
loop computes the N x N matrix once and reads both the loss and the retrieval metrics from it.

Example:
    >>> import torch
    >>> left, right = torch.randn(5, 8), torch.randn(5, 8)
    >>> loss = contrastive_loss(left, right, temperature=15.0)
    >>> loss.shape
    torch.Size([])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["similarity_matrix", "contrastive_loss_from_similarity", "contrastive_loss", "EPS"]

EPS = 1e-8
"""Norms are clamped to at least this before dividing, as the seed did: a ReLU output can be all zeros."""


def similarity_matrix(left: torch.Tensor, right: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Cosine similarities `S[i, j] = cos(left[i], right[j])`.

    Args:
        left: `(N, D)`; right: `(M, D)`.
        eps: lower bound on each norm, so an all-zero row gives cosines of 0 rather than NaN.

    Returns:
        `(N, M)`. The normalisation runs in fp32; inside `torch.autocast` the product itself runs
        in the autocast dtype (that product is where the time goes).
    """
    # Normalising in fp32 keeps bf16 rounding out of the norms; only the product is lowered.
    a = F.normalize(left.float(), dim=1, eps=eps)
    b = F.normalize(right.float(), dim=1, eps=eps)
    return a @ b.T


def contrastive_loss_from_similarity(sim: torch.Tensor, temperature: float) -> torch.Tensor:
    """The symmetric contrastive loss of a square cosine-similarity matrix whose diagonal holds the true pairs.

    Args:
        sim: `(N, N)` cosine similarities (values in [-1, 1]), any float dtype; the loss is
            computed in fp32 (fp64 for fp64 input).
        temperature: multiplies the similarities before the softmax.

    Returns:
        A 0-d tensor: the mean of the left-to-right (rows) and right-to-left (columns)
        cross-entropies with labels `arange(N)`. Differentiable with respect to `sim`.
    """
    if abs(temperature) <= _FUSED_MAX_TEMPERATURE:
        return _SymmetricCrossEntropy.apply(sim, float(temperature))
    return _reference_loss(sim, temperature)


_FUSED_MAX_TEMPERATURE = 40.0
# exp(t * cos - |t|) lies in [exp(-2|t|), 1]: no overflow, and no underflow to 0 (which would
# make a log(0)) while 2|t| stays well inside fp32's exponent range, about 87.


def _reference_loss(sim: torch.Tensor, temperature: float) -> torch.Tensor:
    logits = sim.to(torch.promote_types(sim.dtype, torch.float32)) * temperature
    labels = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * F.cross_entropy(logits, labels) + 0.5 * F.cross_entropy(logits.T, labels)


class _SymmetricCrossEntropy(torch.autograd.Function):
    """`_reference_loss` in a few passes over the N x N matrix instead of a dozen.

    The autograd graph of the reference runs log-softmax on a transposed (strided) matrix and
    adds transposed gradients; at N = 4512 that cost more than a third of a CPU epoch beside
    the matrix products. Here one matrix of exponentials serves both directions: with
    `E = exp(t * S - |t|)`, the row and column log-sum-exps are `|t| + log(E.sum(1))` and
    `|t| + log(E.sum(0))`, and the gradient is
    `t / (2N) * (E / rowsum[:, None] + E / colsum[None, :] - 2 I)`.
    The constant shift |t| replaces the usual per-row max because cosines are bounded by 1.
    """

    @staticmethod
    def forward(ctx, sim: torch.Tensor, t: float) -> torch.Tensor:
        shift = abs(t)
        e = sim.to(torch.promote_types(sim.dtype, torch.float32)).mul(t).sub_(shift).exp_()
        row, col = e.sum(dim=1), e.sum(dim=0)
        diag = sim.diagonal().to(e.dtype) * t
        loss = 0.5 * ((row.log() + shift - diag).mean() + (col.log() + shift - diag).mean())
        ctx.save_for_backward(e, row, col)
        ctx.t, ctx.dtype = t, sim.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        e, row, col = ctx.saved_tensors
        scale = grad_out * (0.5 * ctx.t / e.shape[0])
        r, c = row.reciprocal().mul_(scale), col.reciprocal().mul_(scale)
        grad = torch.addcmul(e * r[:, None], e, c[None, :])
        grad.diagonal().sub_(2 * scale)
        return grad.to(ctx.dtype), None


def contrastive_loss(left: torch.Tensor, right: torch.Tensor, temperature: float) -> torch.Tensor:
    """`contrastive_loss_from_similarity(similarity_matrix(left, right), temperature)`.

    Args:
        left, right: `(N, D)` adapted vectors; row i of each forms pair i.
        temperature: multiplies the cosines.

    Returns:
        A 0-d fp32 tensor.
    """
    return contrastive_loss_from_similarity(similarity_matrix(left, right), temperature)
