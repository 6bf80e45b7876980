"""Retrieval metrics over a square similarity matrix whose diagonal holds the true pairs.

Definitions, for N pairs and `S[i, j]` the similarity of left i and right j:

- The **left-to-right rank** of pair i is `#{j : S[i, j] >= S[i, i]}`: 1 when its partner
  strictly beats every other right image. **Ties count against the query**: an other image
  scoring exactly as high as the partner is ranked before it.
- The **right-to-left rank** of pair j is `#{i : S[i, j] >= S[j, j]}`, the same over a column.
- **`top k`** is the fraction of pairs whose partner ranks within the first k in *either*
  direction: `mean(min(rank_l2r, rank_r2l) <= k)`. This is exactly what the paper's code computed
  (its `AsymmetricRecall` ORs the two directions) and what the paper's "39.39% average top-1"
  means. It is higher than either one-directional figure.
- **`left2right top k`** = `mean(rank_l2r <= k)`; **`right2left top k`** = `mean(rank_r2l <= k)`.
- **`MRR`**, mean reciprocal rank over both directions:
  `(mean(1 / rank_l2r) + mean(1 / rank_r2l)) / 2`.

All values are fractions in [0, 1]. Everything runs with torch on the matrix's device: a rank
is one comparison against the diagonal and a sum, O(N^2), with no sort. The paper's code's ranking
broke ties in sort order instead, so on data with exact ties our figures can only be lower.

Example:
    >>> import torch
    >>> sim = torch.tensor([[0.9, 0.1], [0.9, 0.2]])
    >>> {k: round(v.item(), 3) for k, v in retrieval_metrics(sim, topk=(1,)).items()}
    {'top 1': 1.0, 'left2right top 1': 0.5, 'right2left top 1': 0.5, 'MRR': 0.75}
"""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["partner_ranks", "block_partner_ranks", "column_counts", "retrieval_metrics", "metrics_from_ranks",
           "metric_names"]


def partner_ranks(sim: torch.Tensor, scratch: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The 1-based rank of each pair's partner, ties counting against the query.

    Args:
        sim: `(N, N)` similarities, true pairs on the diagonal.
        scratch: optional `(N, N)` fp32 tensor to hold the comparisons (overwritten), so that a
            caller ranking the same size every epoch allocates nothing of size N x N.

    Returns:
        `(rank_l2r, rank_r2l)`, two int64 tensors of shape `(N,)` on `sim`'s device. A pair
        whose own similarity is NaN (a diverged model) gets the worst rank, N.
    """
    if sim.ndim != 2 or sim.shape[0] != sim.shape[1]:
        raise ValueError(f"expected a square similarity matrix, got shape {tuple(sim.shape)}")
    if scratch is None:
        scratch = torch.empty(sim.shape, dtype=torch.float32, device=sim.device)
    elif scratch.shape != sim.shape or scratch.dtype != torch.float32:
        raise ValueError(f"scratch must be fp32 of shape {tuple(sim.shape)}, got {scratch.dtype} {tuple(scratch.shape)}")
    # A copy: compared along the rows, the diagonal view's stride of N + 1 made that pass 10x slower.
    diag = sim.diagonal().contiguous()
    # `>=` counts the partner itself, so ranks start at 1 and ties fall against the query.
    # The comparisons go to fp32 (0/1, exact counts up to 2**24) rather than bool: summing a
    # bool matrix first widens it to an int64 copy, 8 bytes per entry, the slowest step here.
    l2r = torch.ge(sim, diag[:, None], out=scratch).sum(dim=1)
    r2l = torch.ge(sim, diag[None, :], out=scratch).sum(dim=0)
    l2r, r2l = l2r.long(), r2l.long()
    # A NaN partner compares False with everything, which would read as a perfect rank.
    worst = torch.full_like(l2r, sim.shape[0])
    nan = torch.isnan(diag)
    return torch.where(nan, worst, l2r), torch.where(nan, worst, r2l)


def block_partner_ranks(sim: torch.Tensor, partner_cols: torch.Tensor, n_worst: int) -> torch.Tensor:
    """Ranks of the rows of a block of queries, as `partner_ranks` counts them along rows.

    Args:
        sim: `(R, M)` similarities of R queries against all M candidates.
        partner_cols: `(R,)` the column of each query's partner.
        n_worst: the rank given to a query whose partner similarity is NaN (the number of candidates).

    Returns:
        `(R,)` int64: `#{j : sim[r, j] >= sim[r, partner_cols[r]]}`, ties counting against the query.
    """
    partner = sim[torch.arange(len(sim), device=sim.device), partner_cols]
    count = torch.ge(sim, partner[:, None]).sum(dim=1)
    # A NaN partner compares False with everything, which would read as a perfect rank.
    return torch.where(torch.isnan(partner), torch.full_like(count, n_worst), count)


def column_counts(sim: torch.Tensor, partner: torch.Tensor, scratch: torch.Tensor | None = None) -> torch.Tensor:
    """For each column j of a block of rows, `#{i : sim[i, j] >= partner[j]}`: a part of the right-to-left ranks.

    Args:
        sim: `(R, M)` some rows of a similarity matrix.
        partner: `(M,)` each column's partner similarity (the matrix's diagonal).
        scratch: optional fp32 tensor of `sim`'s shape for the comparisons (overwritten).

    Returns:
        `(M,)` fp32 counts (exact up to 2**24 rows). Summed over blocks that cover every row, a
        column's count is its right-to-left rank as `partner_ranks` gives it (NaN partners aside,
        which the caller sets to the worst rank).
    """
    if scratch is None:
        scratch = torch.empty(sim.shape, dtype=torch.float32, device=sim.device)
    return torch.ge(sim, partner[None, :], out=scratch).sum(dim=0)


def metric_names(topk: Sequence[int]) -> list[str]:
    """The keys `retrieval_metrics` returns, in its order: all `top k`, then each direction, then `MRR`."""
    return (
        [f"top {k}" for k in topk]
        + [f"left2right top {k}" for k in topk]
        + [f"right2left top {k}" for k in topk]
        + ["MRR"]
    )


@torch.no_grad()
def retrieval_metrics(
    sim: torch.Tensor, topk: Sequence[int], scratch: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Top-k (either direction, as the paper's code), left2right/right2left top-k and MRR of a similarity matrix.

    Pass the matrix the loss already computed (detached or not: this runs under no_grad) to get
    train metrics for free. See the module docstring for the exact definitions.

    Args:
        sim: `(N, N)` similarities, true pairs on the diagonal, on any device and float dtype.
        topk: the k values, each at least 1.
        scratch: optional `(N, N)` fp32 tensor reused for the comparisons (see `partner_ranks`).

    Returns:
        `{name: 0-d fp32 tensor}` with names from `metric_names(topk)`, still on `sim`'s
        device, so a caller can gather all of them with a single transfer.

    Example:
        >>> import torch
        >>> m = retrieval_metrics(torch.eye(4), topk=(1, 3))
        >>> m["top 1"].item(), m["MRR"].item()
        (1.0, 1.0)
    """
    return metrics_from_ranks(*partner_ranks(sim, scratch), topk)


@torch.no_grad()
def metrics_from_ranks(l2r: torch.Tensor, r2l: torch.Tensor, topk: Sequence[int]) -> dict[str, torch.Tensor]:
    """`retrieval_metrics` from the partner ranks themselves (as `partner_ranks` returns them).

    Args:
        l2r, r2l: `(N,)` 1-based ranks of each pair's partner, left-to-right and right-to-left.
        topk: the k values.

    Returns:
        `{name: 0-d fp32 tensor}`, names from `metric_names(topk)`, means over the N pairs.
    """
    either = torch.minimum(l2r, r2l)
    values = (
        [(either <= k).float().mean() for k in topk]
        + [(l2r <= k).float().mean() for k in topk]
        + [(r2l <= k).float().mean() for k in topk]
        + [0.5 * (l2r.float().reciprocal().mean() + r2l.float().reciprocal().mean())]
    )
    return dict(zip(metric_names(topk), values))
