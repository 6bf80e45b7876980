"""Test figures without an N x N matrix: exact partner ranks and loss over blocks of queries.

`evaluate_vectors` gives what `adaptation.metrics.retrieval_metrics` and the contrastive loss
give on the full cosine matrix (same definitions, ties counting against the query), holding
only `block_rows x N` similarities at a time:

- left-to-right: each block of left vectors is scored against every right vector; the rank of
  pair i is the number of its row's entries at least as high as its own partner's, read from
  that same row (so an exact tie is a tie here as it is in the full matrix).
- right-to-left: the same with the roles swapped (blocks of right vectors against every left).
- the loss: each direction's cross-entropy is `logsumexp(t * row) - t * partner`, exact per row.

When one block holds every query (the paper's test set) it is the full-matrix computation itself.
Under `torchrun`, the ranks split the query blocks and sum their counts.

Example:
    >>> import torch
    >>> a, b = torch.randn(50, 8), torch.randn(50, 8)
    >>> full = evaluate_vectors(a, b, 15.0, (1, 5))
    >>> blocks = evaluate_vectors(a, b, 15.0, (1, 5), block_rows=7)
    >>> all(torch.isclose(full[k], blocks[k], atol=1e-5) for k in full)
    True
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ._fused import symmetric_cross_entropy
from toolkit.distributed import Ranks

from .distributed import all_reduce_sum
from .losses import EPS, similarity_matrix
from .metrics import block_partner_ranks, metrics_from_ranks, retrieval_metrics

__all__ = ["BLOCK_BYTES", "block_rows_for", "evaluate_vectors"]

BLOCK_BYTES = 256 * 2**20
"""Default bytes of similarities (and their temporaries) held at once."""
_TEMPORARIES = 3  # the block, its comparisons and logsumexp's scaled copy


def block_rows_for(n: int, budget_bytes: int = BLOCK_BYTES) -> int:
    """Query rows per block so that `block x n` fp32 matrices and their temporaries fit in `budget_bytes`."""
    return max(1, min(n, budget_bytes // (4 * _TEMPORARIES * max(n, 1))))


def _one_direction(
    queries: torch.Tensor, keys: torch.Tensor, logit_scale: float, block_rows: int, dist: Ranks
) -> tuple[torch.Tensor, torch.Tensor]:
    """Partner ranks (int64) and cross-entropies (fp64) of `queries[i]` against all `keys`, partner `keys[i]`.

    Each rank fills the rows of its blocks (block b goes to rank b % world_size); the sums over
    ranks are returned to every rank.
    """
    n = queries.shape[0]
    ranks = torch.zeros(n, dtype=torch.int64, device=queries.device)
    ce = torch.zeros(n, dtype=torch.float64, device=queries.device)
    for b, start in enumerate(range(0, n, block_rows)):
        if b % dist.world_size != dist.rank:
            continue
        stop = min(n, start + block_rows)
        sim = queries[start:stop] @ keys.T
        cols = torch.arange(start, stop, device=sim.device)
        ranks[start:stop] = block_partner_ranks(sim, cols, n)
        partner = sim[cols - start, cols]
        logits = sim.mul_(logit_scale)
        ce[start:stop] = (torch.logsumexp(logits, dim=1) - partner * logit_scale).double()
    return all_reduce_sum(ranks, dist), all_reduce_sum(ce, dist)


@torch.no_grad()
def evaluate_vectors(
    left: torch.Tensor,
    right: torch.Tensor,
    logit_scale: float,
    topk: Sequence[int],
    block_rows: int | None = None,
    dist: Ranks = Ranks(),
    eps: float = EPS,
) -> dict[str, torch.Tensor]:
    """Contrastive loss and retrieval metrics of adapted pairs `(left[i], right[i])`, in fp32.

    Args:
        left, right: `(N, D)` adapted vectors.
        logit_scale: the loss's multiplier (`train.py -t`).
        topk: the k values.
        block_rows: queries scored at once; default `block_rows_for(N)` (256 MiB of similarities).
        dist: under torchrun, the group that shares the blocks (every rank gets the figures).
        eps: lower bound on each norm (see `adaptation.losses.similarity_matrix`).

    Returns:
        `{"Loss": ..., "top k": ..., ...}`, 0-d fp32 tensors on the vectors' device: the names
        and values of `retrieval_metrics` and of the loss on the full matrix.
    """
    n = left.shape[0]
    rows = block_rows or block_rows_for(n)
    if rows >= n and not dist.distributed:
        sim = similarity_matrix(left, right, eps)
        return {"Loss": symmetric_cross_entropy(sim, logit_scale), **retrieval_metrics(sim, topk)}
    a = F.normalize(left.float(), dim=1, eps=eps)
    b = F.normalize(right.float(), dim=1, eps=eps)
    l2r, ce_l2r = _one_direction(a, b, logit_scale, rows, dist)
    r2l, ce_r2l = _one_direction(b, a, logit_scale, rows, dist)
    loss = (0.5 * (ce_l2r.mean() + ce_r2l.mean())).float()
    return {"Loss": loss, **metrics_from_ranks(l2r, r2l, topk)}
