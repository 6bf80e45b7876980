"""Tensor collectives of data-parallel training under torchrun: gathers with gradient and reductions.

`train.py` under `torchrun --nproc_per_node K` runs K copies of itself; each holds the whole
(small) features file, draws the same global batches and takes a contiguous share of each
(`toolkit.distributed.Ranks.shard`, the one rank type). The adapted vectors of the shares are
all-gathered *with gradient* (`torch.distributed.nn.functional.all_gather`, whose backward sums
each share's gradient over the ranks), so each rank scores its own rows against every column of
the global batch, as open_clip's `ClipLoss(local_loss=True, gather_with_grad=True)` does. Shares
may differ in size (a last, smaller batch): each is padded to the largest for the collective and
the padding is dropped from the result.

For a single process (`Ranks()`, rank 0 of 1) every function here is the identity.
"""

from __future__ import annotations

import warnings

import torch

from toolkit.distributed import Ranks, shard_bounds

__all__ = ["gather_rows", "all_reduce_sum", "all_reduce_min", "broadcast_int"]


def gather_rows(x: torch.Tensor, ranks: Ranks, n: int) -> torch.Tensor:
    """All ranks' shares of a global batch of `n` rows, in rank order, differentiable.

    Args:
        x: this rank's share, `(stop - start, D)` as `ranks.shard(n)` gives.
        ranks: the group.
        n: the global batch size.

    Returns:
        `(n, D)`: row i is global row i. The gradient reaching each row flows back to the rank
        that holds it (summed over the ranks that used it).
    """
    if not ranks.distributed:
        return x
    import torch.distributed.nn.functional as dnn

    sizes = [shard_bounds(n, r, ranks.world_size) for r in range(ranks.world_size)]
    longest = max(stop - start for start, stop in sizes)
    padded = x if x.shape[0] == longest else torch.cat([x, x.new_zeros((longest - x.shape[0], *x.shape[1:]))])
    with warnings.catch_warnings():
        # Deprecated in favour of a private API (_functional_collectives); this one is public and differentiable.
        warnings.simplefilter("ignore", FutureWarning)
        parts = dnn.all_gather(padded)
    return torch.cat([part[: stop - start] for part, (start, stop) in zip(parts, sizes)])


def all_reduce_sum(x: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """`x` summed over the ranks (in place; `x` itself for a single process)."""
    if ranks.distributed:
        import torch.distributed as tdist

        tdist.all_reduce(x, op=tdist.ReduceOp.SUM)
    return x


def broadcast_int(value: int, ranks: Ranks) -> int:
    """Rank 0's `value` on every rank (e.g. a seed drawn at random)."""
    if not ranks.distributed:
        return value
    import torch.distributed as tdist

    t = torch.tensor([value], dtype=torch.int64)
    tdist.broadcast(t, src=0)
    return int(t.item())


def all_reduce_min(value: float, ranks: Ranks) -> float:
    """The smallest `value` over the ranks."""
    if not ranks.distributed:
        return value
    import torch.distributed as tdist

    t = torch.tensor([value], dtype=torch.float64)
    tdist.all_reduce(t, op=tdist.ReduceOp.MIN)
    return float(t.item())
