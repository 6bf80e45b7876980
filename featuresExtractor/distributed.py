"""Running one extraction over several processes with torch.distributed (launched by torchrun).

    torchrun --nproc_per_node K extract.py <the same flags>

Each rank takes a contiguous shard of the sorted items (`Ranks.shard`) and writes its chunks
into the run's chunk store; when every rank is done, rank 0 merges the chunks, fits the PCA
and writes the outputs and the manifest. gloo on the CPU, NCCL on CUDA (each rank on
`cuda:LOCAL_RANK`).

Errors: a bad input is found the same way on every rank, so every rank stops with exit 2 and
only rank 0 prints the line (`quiet` on the others). What only one rank can see (an unreadable
image under `strict`, the output folder's state, which rank 0 checks) travels through
`Ranks.agree` and `Ranks.all_succeed`, so no rank waits for one that has given up.

Example:
    >>> ranks = Ranks.from_env()            # RANK, WORLD_SIZE, LOCAL_RANK as torchrun sets them
    >>> ranks.world_size, list(ranks.shard(10))
    (1, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9])
    >>> Ranks(rank=1, world_size=3).shard(10)
    range(3, 6)
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Callable, TypeVar

from toolkit.distributed import all_succeed, destroy_group, quiet, settle_before_leaving, torchrun_env
from toolkit.utils import UserError

__all__ = ["Ranks", "init", "shutdown"]

T = TypeVar("T")

# Ranks wait for each other at the end of their shards (a resumed run may have one shard done and
# another untouched) and while rank 0 checks the output folder; a dead rank is caught by torchrun,
# which stops the others, so the collective timeout only needs to be long.
TIMEOUT = datetime.timedelta(days=2)


@dataclass(frozen=True)
class Ranks:
    """This process's place in the run: rank, world size and local rank (all 0/1/0 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @classmethod
    def from_env(cls) -> "Ranks":
        """Read torchrun's RANK, WORLD_SIZE and LOCAL_RANK (a plain `python extract.py` has none)."""
        env = torchrun_env()
        return cls(env["rank"], env["world_size"], env["local_rank"])

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def label(self) -> str:
        """'rank R/K' for progress bars; empty in a one-process run."""
        return f"rank {self.rank}/{self.world_size}" if self.distributed else ""

    def shard(self, n_items: int) -> range:
        """This rank's items: a contiguous range of the sorted items; shards differ in size by at most one."""
        return range(self.rank * n_items // self.world_size, (self.rank + 1) * n_items // self.world_size)

    def layout(self, n_items: int) -> list[list[int]]:
        """Every rank's shard as [start, stop), for the manifest."""
        return [[r * n_items // self.world_size, (r + 1) * n_items // self.world_size] for r in range(self.world_size)]

    def check_items(self, n_items: int) -> None:
        """Refuse more ranks than items (a rank would get an empty shard)."""
        if n_items < self.world_size:
            raise UserError(f"{self.world_size} ranks for {n_items} item(s): every rank needs at least one; "
                            f"use --nproc_per_node {n_items} or fewer")

    def agree(self, fn: Callable[[], T]) -> T:
        """Run `fn` on rank 0 only; every rank gets its result, or raises its `UserError` (quiet off rank 0)."""
        if not self.distributed:
            return fn()
        import torch.distributed as dist

        box: list = [None]
        if self.rank == 0:
            try:
                box[0] = ("ok", fn())
            except UserError as err:
                box[0] = ("error", str(err))
                dist.broadcast_object_list(box, src=0)
                settle_before_leaving()
                raise
        dist.broadcast_object_list(box, src=0)
        status, value = box[0]
        if status == "error":
            settle_before_leaving()
            raise quiet(UserError(value))
        return value

    def all_succeed(self, fn: Callable[[], T]) -> list[T]:
        """Run `fn` on every rank; the list of every rank's result, or the first rank's `UserError` on all.

        It is also the barrier: it returns when every rank has finished `fn`
        (`toolkit.distributed.all_succeed`).
        """
        return all_succeed(fn, self.rank, self.world_size)


def init(device_type: str) -> Ranks:
    """Join the process group torchrun set up (gloo on the CPU, NCCL on CUDA); a one-process `Ranks` without torchrun."""
    ranks = Ranks.from_env()
    if not ranks.distributed:
        return ranks
    import torch
    import torch.distributed as dist

    backend = "nccl" if device_type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(ranks.local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=TIMEOUT)
    return Ranks(ranks.rank, ranks.world_size, ranks.local_rank, backend)


def shutdown() -> None:
    """Leave the process group, if this process joined one."""
    destroy_group()
