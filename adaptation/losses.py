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
    """The symmetric contrastive loss of a square similarity matrix whose diagonal holds the true pairs.

    Args:
        sim: `(N, N)` similarities, any float dtype; the loss is computed in fp32.
        temperature: multiplies the similarities before the softmax.

    Returns:
        A 0-d fp32 tensor: the mean of the left-to-right (rows) and right-to-left (columns)
        cross-entropies with labels `arange(N)`.
    """
    logits = sim.float() * temperature
    labels = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * F.cross_entropy(logits, labels) + 0.5 * F.cross_entropy(logits.T, labels)


def contrastive_loss(left: torch.Tensor, right: torch.Tensor, temperature: float) -> torch.Tensor:
    """`contrastive_loss_from_similarity(similarity_matrix(left, right), temperature)`.

    Args:
        left, right: `(N, D)` adapted vectors; row i of each forms pair i.
        temperature: multiplies the cosines.

    Returns:
        A 0-d fp32 tensor.
    """
    return contrastive_loss_from_similarity(similarity_matrix(left, right), temperature)
