"""The training objective: a symmetric contrastive loss over scaled cosine similarities.

For N pairs with adapted left vectors `l_i` and right vectors `r_j`, let
`S[i, j] = cos(l_i, r_j)`. The loss is

    0.5 * CE(logit_scale * S, arange(N)) + 0.5 * CE(logit_scale * S.T, arange(N))

where CE is the mean cross-entropy over rows (as open_clip's `ClipLoss`). The paper's code calls
the multiplier the temperature (`train.py -t 15`): it *multiplies* the cosines, sharpening the
softmax; it does not divide them.

`similarity_matrix` and `contrastive_loss_from_similarity` are split so that a caller computes
the N x N matrix once and reads both the loss and the retrieval metrics from it. The training
loop uses a fused version of the same computation (`adaptation.fused`), tested against this one.

Example:
    >>> import torch
    >>> left, right = torch.randn(5, 8), torch.randn(5, 8)
    >>> loss = contrastive_loss(left, right, logit_scale=15.0)
    >>> loss.shape
    torch.Size([])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["similarity_matrix", "contrastive_loss_from_similarity", "contrastive_loss", "EPS"]

EPS = 1e-8
"""Norms are clamped to at least this before dividing, as the paper's code did: a ReLU output can be all zeros."""


def similarity_matrix(left: torch.Tensor, right: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Cosine similarities `S[i, j] = cos(left[i], right[j])`.

    Args:
        left: `(N, D)`; right: `(M, D)`.
        eps: lower bound on each norm, so an all-zero row gives cosines of 0 rather than NaN.

    Returns:
        `(N, M)`. The normalisation runs in fp32; inside `torch.autocast` the product itself runs
        in the autocast dtype.
    """
    # Normalising in fp32 keeps bf16 rounding out of the norms; only the product is lowered.
    a = F.normalize(left.float(), dim=1, eps=eps)
    b = F.normalize(right.float(), dim=1, eps=eps)
    return a @ b.T


def contrastive_loss_from_similarity(sim: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """The symmetric contrastive loss of a square cosine-similarity matrix whose diagonal holds the true pairs.

    Args:
        sim: `(N, N)` cosine similarities, any float dtype; the loss is computed in fp32 (fp64
            for fp64 input).
        logit_scale: multiplies the similarities before the softmax (`train.py -t`).

    Returns:
        A 0-d tensor: the mean of the left-to-right (rows) and right-to-left (columns)
        cross-entropies with labels `arange(N)`.
    """
    logits = sim.to(torch.promote_types(sim.dtype, torch.float32)) * logit_scale
    labels = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * F.cross_entropy(logits, labels) + 0.5 * F.cross_entropy(logits.T, labels)


def contrastive_loss(left: torch.Tensor, right: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """`contrastive_loss_from_similarity(similarity_matrix(left, right), logit_scale)`.

    Args:
        left, right: `(N, D)` adapted vectors; row i of each forms pair i.
        logit_scale: multiplies the cosines.

    Returns:
        A 0-d fp32 tensor.
    """
    return contrastive_loss_from_similarity(similarity_matrix(left, right), logit_scale)
