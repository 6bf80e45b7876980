"""The fast path of the contrastive loss used by the training loop (`adaptation.losses` is the definition).

Same values as `adaptation.losses`, with hand-written backward passes and the N x N matrices
kept in a `Workspace` between calls; tests/test_adaptation_losses.py checks it against the
plain definition and a per-pair loop.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from .losses import EPS, contrastive_loss_from_similarity

__all__ = ["symmetric_cross_entropy", "similarity_and_loss", "row_block_loss", "Workspace", "FUSED_MAX_SCALE"]


def symmetric_cross_entropy(sim: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """`losses.contrastive_loss_from_similarity`, in a few passes over the N x N matrix.

    Above `|logit_scale|` `FUSED_MAX_SCALE` it is the plain definition itself.
    """
    if abs(logit_scale) <= FUSED_MAX_SCALE:
        return _SymmetricCrossEntropy.apply(sim, float(logit_scale))
    return contrastive_loss_from_similarity(sim, logit_scale)


FUSED_MAX_SCALE = 40.0
# exp(t * cos - |t|) lies in [exp(-2|t|), 1]: no overflow, and no underflow to 0 (which would
# make a log(0)) while 2|t| stays well inside fp32's exponent range, about 87.


class _SymmetricCrossEntropy(torch.autograd.Function):
    """The plain loss (`losses.contrastive_loss_from_similarity`) in a few passes over the N x N matrix instead of a dozen.

    The autograd graph of the plain definition runs log-softmax on a transposed (strided) matrix
    and adds transposed gradients. Here one matrix of exponentials serves both directions: with
    `E = exp(t * S - |t|)`, the row and column log-sum-exps are `|t| + log(E.sum(1))` and
    `|t| + log(E.sum(0))`, and the gradient is
    `t / (2N) * (E / rowsum[:, None] + E / colsum[None, :] - 2 I)`.
    The constant shift |t| replaces the usual per-row max because cosines are bounded by 1.
    """

    @staticmethod
    def forward(ctx, sim: torch.Tensor, t: float) -> torch.Tensor:
        e = torch.empty(sim.shape, dtype=torch.promote_types(sim.dtype, torch.float32), device=sim.device)
        loss, row, col = _exp_and_loss(sim, t, e)
        ctx.save_for_backward(e, row, col)
        ctx.t, ctx.dtype = t, sim.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        e, row, col = ctx.saved_tensors
        scale = grad_out.to(e.dtype) * (0.5 * ctx.t / e.shape[0])
        grad = _loss_grad(e, row, col, scale, torch.empty_like(e))
        return grad.to(ctx.dtype), None


def _shifted_exp(sim: torch.Tensor, t: float, e: torch.Tensor) -> torch.Tensor:
    """Fill `e` (fp32 or wider, sim's shape) with `exp(t * sim - |t|)` and return it."""
    if sim.dtype == e.dtype:
        torch.mul(sim, t, out=e)
    else:  # widen first: t * sim must not be rounded to sim's dtype
        e.copy_(sim).mul_(t)
    return e.sub_(abs(t)).exp_()


def _exp_and_loss(sim: torch.Tensor, t: float, e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fill `e` with `exp(t * sim - |t|)` (`_shifted_exp`); return `(loss, row sums, column sums)`."""
    shift = abs(t)
    _shifted_exp(sim, t, e)
    row, col = e.sum(dim=1), e.sum(dim=0)
    diag = sim.diagonal().to(e.dtype) * t
    loss = 0.5 * ((row.log() + shift - diag).mean() + (col.log() + shift - diag).mean())
    return loss, row, col


def _loss_grad(
    e: torch.Tensor, row: torch.Tensor, col: torch.Tensor, scale: torch.Tensor, out: torch.Tensor, diag_offset: int = 0
) -> torch.Tensor:
    """dLoss/dsim into `out`: `scale * (E / row[:, None] + E / col[None, :] - 2 I)`.

    `scale` is `grad_loss * t / (2N)` (times the world size for a rank's rows); `I` is shifted by
    `diag_offset` columns when `e` holds rows `diag_offset ..` of the global matrix.
    """
    r, c = row.reciprocal().mul_(scale), col.reciprocal().mul_(scale)
    grad = torch.add(r[:, None], c[None, :], out=out).mul_(e)
    grad.diagonal(offset=diag_offset).sub_(2 * scale)
    return grad


class Workspace:
    """Scratch tensors kept from one call to the next, by name, dtype and device.

    Why: at TLL scale an N x N fp32 matrix is 81 MB. The C allocator serves blocks that large
    straight from the kernel (mmap) and returns them on free, so every fresh one is paid again
    in page faults; reusing the same few matrices every epoch avoids that. A smaller shape (the
    last, shorter batch of an epoch) is served from the memory of the largest one asked for so
    far under the same name, so an epoch of minibatches holds one set of matrices, not two.

    A tensor handed out by `get` is overwritten by the next user of the same name, whatever the
    shape; see `similarity_and_loss` for what that means for its outputs.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple, torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """An uninitialised, contiguous `shape` tensor kept under `name` (created or grown on first need)."""
        key = (name, dtype, torch.device(device))
        numel = math.prod(shape)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < numel:
            self._buffers.pop(key, None)  # let the smaller block go before the larger one is taken
            buf = self._buffers[key] = torch.empty(numel, dtype=dtype, device=device)
        return buf[:numel].view(shape)


def similarity_and_loss(
    left: torch.Tensor,
    right: torch.Tensor,
    logit_scale: float,
    product_dtype: torch.dtype | None = None,
    workspace: Workspace | None = None,
    eps: float = EPS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`losses.similarity_matrix(left, right)` and its contrastive loss, in one autograd node.

    The same quantities as `contrastive_loss_from_similarity(similarity_matrix(left, right), t)`,
    with the normalisation's backward written out (a handful of passes over the `(N, D)`
    inputs instead of autograd's dozen) and the `N x N` matrices (cosines, exponentials,
    gradient) written into `workspace` instead of being allocated on every call.

    Args:
        left, right: `(N, D)` adapted vectors, row i of each forming pair i; any float dtype.
        logit_scale: multiplies the cosines (as in `contrastive_loss_from_similarity`).
        product_dtype: the dtype of the cosine product and of its two backward products, e.g.
            `torch.bfloat16` for what `torch.autocast` does to `similarity_matrix`; default:
            fp32 (fp64 for fp64 inputs). Normalisation and loss always run in fp32 or wider.
        workspace: where the `N x N` matrices live between calls; default: a fresh one.
        eps: lower bound on each norm (see `similarity_matrix`).

    Returns:
        `(sim, loss)`. `sim` is the `(N, N)` cosine matrix in `product_dtype`, detached; with a
        shared `workspace` it is a workspace tensor, valid until the next call with the same
        shapes. `loss` is a 0-d fp32 tensor (fp64 for fp64 inputs), differentiable with
        respect to `left` and `right`.
        Calling again with the same workspace before this loss's backward makes that backward
        raise (the saved matrix was overwritten) rather than return wrong gradients.

        Above `|logit_scale|` 40 (outside the shifted-exponential form's range) the same values
        come from the plain autograd composition, without the workspace.

    Raises:
        ValueError: `left` and `right` are not two `(N, D)` matrices of one shape.
    """
    if left.ndim != 2 or left.shape != right.shape:
        raise ValueError(f"expected two (N, D) matrices of one shape, got {tuple(left.shape)} and {tuple(right.shape)}")
    if abs(logit_scale) > FUSED_MAX_SCALE:
        product = product_dtype or torch.promote_types(left.dtype, torch.float32)
        with torch.autocast(left.device.type, enabled=False):
            a = F.normalize(left.to(torch.promote_types(left.dtype, torch.float32)), dim=1, eps=eps)
            b = F.normalize(right.to(torch.promote_types(right.dtype, torch.float32)), dim=1, eps=eps)
            sim = a.to(product) @ b.to(product).T
            return sim.detach(), contrastive_loss_from_similarity(sim, logit_scale)
    return _CosineContrastive.apply(left, right, float(logit_scale), product_dtype, workspace or Workspace(), eps)


def _normalize(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`F.normalize(x, dim=1, eps=eps)` (same operations, so the same bits) and the clamped norms."""
    norm = torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min_(eps)
    return x / norm, norm


def _normalize_backward(grad: torch.Tensor, unit: torch.Tensor, norm: torch.Tensor, eps: float) -> torch.Tensor:
    """Gradient of `x / max(|x|, eps)` given `unit` = that output: `(g - u (u . g)) / |x|`.

    Where the norm was clamped the denominator is the constant eps, so only `g / eps` remains.
    """
    proj = torch.bmm(unit.unsqueeze(1), grad.unsqueeze(2)).squeeze(2)  # row-wise u . g, no (N, D) temporary
    proj.masked_fill_(norm <= eps, 0.0)
    return grad.addcmul_(unit, proj, value=-1.0).div_(norm)


class _CosineContrastive(torch.autograd.Function):
    """Forward and backward of `similarity_and_loss`; see `_SymmetricCrossEntropy` for the loss algebra."""

    @staticmethod
    def forward(ctx, left, right, t, product_dtype, workspace, eps):
        n, dev = left.shape[0], left.device
        compute = torch.promote_types(left.dtype, torch.float32)
        product = product_dtype or compute
        # Autocast would re-cast inside; every dtype here is chosen explicitly instead.
        with torch.autocast(dev.type, enabled=False):
            a, a_norm = _normalize(left.to(compute), eps)
            b, b_norm = _normalize(right.to(compute), eps)
            a_p, b_p = a.to(product), b.to(product)
            sim = torch.mm(a_p, b_p.T, out=workspace.get("sim", (n, n), product, dev))
            e = workspace.get("exp", (n, n), compute, dev)
            loss, row, col = _exp_and_loss(sim, t, e)
        ctx.save_for_backward(e, row, col, a, b, a_norm, b_norm, a_p, b_p)
        ctx.t, ctx.eps, ctx.workspace = t, eps, workspace
        ctx.dtypes = (left.dtype, right.dtype)
        ctx.mark_non_differentiable(sim)
        # Otherwise autograd hands backward an N x N matrix of zeros for `sim`, allocated and filled each time.
        ctx.set_materialize_grads(False)
        return sim, loss

    @staticmethod
    def backward(ctx, _grad_sim, grad_loss):
        if grad_loss is None:  # only `sim` was used downstream, and it carries no gradient
            return None, None, None, None, None, None
        e, row, col, a, b, a_norm, b_norm, a_p, b_p = ctx.saved_tensors
        n, dev = e.shape[0], e.device
        with torch.autocast(dev.type, enabled=False):
            scale = grad_loss.to(e.dtype) * (0.5 * ctx.t / n)
            grad = _loss_grad(e, row, col, scale, ctx.workspace.get("grad", (n, n), e.dtype, dev))
            if a_p.dtype != grad.dtype:
                grad = ctx.workspace.get("grad_product", (n, n), a_p.dtype, dev).copy_(grad)
            grad_a = _normalize_backward(torch.mm(grad, b_p).to(a.dtype), a, a_norm, ctx.eps)
            grad_b = _normalize_backward(torch.mm(grad.T, a_p).to(b.dtype), b, b_norm, ctx.eps)
        return grad_a.to(ctx.dtypes[0]), grad_b.to(ctx.dtypes[1]), None, None, None, None


def row_block_loss(
    sim: torch.Tensor, start: int, n: int, logit_scale: float, world_size: int,
    reduce_sum: Callable[[torch.Tensor], torch.Tensor], workspace: Workspace | None = None,
) -> torch.Tensor:
    """One rank's part of the symmetric contrastive loss of a global batch, from its rows of the cosine matrix.

    The ranks of a data-parallel group each hold rows `start .. start + m` of the global
    `(n, n)` cosine matrix `S` (their left vectors against every right vector). The row
    log-sum-exps are local; the column ones need every rank's rows, so the columns' sums of
    exponentials are added over the ranks with `reduce_sum` (one collective of `n` values).
    Each rank thus computes `m x n` cosines, not the `2 m x n` of scoring both directions'
    rows, and the group does the work of one process.

    Args:
        sim: `(m, n)` this rank's rows of `S`, any float dtype (e.g. a bf16 product).
        start: the global index of its first row; its pairs' partners sit at columns
            `start .. start + m`.
        n: the global batch size.
        logit_scale: multiplies the cosines; at most `FUSED_MAX_SCALE` in absolute value
            (callers take the plain composition above it).
        world_size: the number of ranks.
        reduce_sum: sums a tensor over the ranks (every rank calls it at the same point).
        workspace: where the `(m, n)` exponentials and gradient live between calls.

    Returns:
        A 0-d fp32 tensor: this rank's share of the global loss times `world_size`, so that the
        mean over the ranks is the loss of `losses.contrastive_loss_from_similarity(S, t)`. Its
        backward gives `world_size * dLoss/dS` for these rows: averaged over the ranks (as
        DistributedDataParallel averages gradients) it is the gradient of the global loss.
    """
    if abs(logit_scale) > FUSED_MAX_SCALE:
        raise ValueError(f"|logit_scale| {logit_scale} is above {FUSED_MAX_SCALE}; use the plain composition")
    return _RowBlockCrossEntropy.apply(sim, float(logit_scale), start, n, world_size, reduce_sum,
                                       workspace or Workspace())


class _RowBlockCrossEntropy(torch.autograd.Function):
    """`row_block_loss`: `_SymmetricCrossEntropy`'s algebra on a block of rows, column sums reduced over the ranks."""

    @staticmethod
    def forward(ctx, sim, t, start, n, world_size, reduce_sum, workspace):
        m, dev = sim.shape[0], sim.device
        compute = torch.promote_types(sim.dtype, torch.float32)
        shift = abs(t)
        with torch.autocast(dev.type, enabled=False):
            e = _shifted_exp(sim, t, workspace.get("exp", tuple(sim.shape), compute, dev))
            row = e.sum(dim=1)
            col = reduce_sum(e.sum(dim=0))
            diag = sim.diagonal(offset=start).to(compute) * t  # each local pair's own cosine, times t
            own_col = col[start:start + m]
            partial = (row.log() + shift - diag).sum() + (own_col.log() + shift - diag).sum()
            loss = partial * (0.5 * world_size / n)
        ctx.save_for_backward(e, row, col)
        ctx.t, ctx.start, ctx.n, ctx.world_size, ctx.dtype, ctx.workspace = t, start, n, world_size, sim.dtype, workspace
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        e, row, col = ctx.saved_tensors
        with torch.autocast(e.device.type, enabled=False):
            # world_size * dL/dS[i, j] = world_size * t / (2n) * (E / row_i + E / col_j - 2 [j == start + i])
            scale = grad_loss.to(e.dtype) * (0.5 * ctx.t * ctx.world_size / ctx.n)
            grad = _loss_grad(e, row, col, scale, ctx.workspace.get("grad", tuple(e.shape), e.dtype, e.device),
                              ctx.start)
        return grad.to(ctx.dtype), None, None, None, None, None, None
