"""What extract.py's and train.py's torchrun support share: where this process is, leaving the group.

torchrun describes each process it starts in environment variables; `torchrun_env` reads them
(a plain `python script.py` has none: rank 0 of 1). `destroy_group` leaves the process group,
if this process joined one. The two scripts build their own views on top
(`featuresExtractor.distributed.Ranks`, `adaptation.distributed.Dist`), since extraction shards
items and training shares batches.

Example:
    >>> torchrun_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"})
    {'rank': 1, 'world_size': 2, 'local_rank': 1, 'local_world_size': 2}
    >>> torchrun_env({})
    {'rank': 0, 'world_size': 1, 'local_rank': 0, 'local_world_size': 1}
"""

from __future__ import annotations

import os
from typing import Callable, Mapping, TypeVar

from .utils import UserError

T = TypeVar("T")

__all__ = ["torchrun_env", "destroy_group", "settle_before_leaving", "all_succeed", "quiet"]


def torchrun_env(environ: Mapping[str, str] | None = None) -> dict[str, int]:
    """rank, world_size, local_rank and local_world_size as torchrun sets them (RANK, WORLD_SIZE,
    LOCAL_RANK, LOCAL_WORLD_SIZE); a `UserError` when one is not an integer."""
    env = os.environ if environ is None else environ
    try:
        world = int(env.get("WORLD_SIZE", "1"))
        rank = int(env.get("RANK", "0"))
        local = int(env.get("LOCAL_RANK", str(rank)))
        local_world = int(env.get("LOCAL_WORLD_SIZE", str(world)))
    except ValueError:
        raise UserError("RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE must be integers (torchrun sets "
                        "them)") from None
    return {"rank": rank, "world_size": world, "local_rank": local, "local_world_size": local_world}


def destroy_group() -> None:
    """Leave the torch.distributed process group, if this process joined one."""
    import gc

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        # Objects that hold the group (a DistributedDataParallel wrapper, its reducer, gloo's
        # pending work) may sit in reference cycles; collected only at interpreter shutdown,
        # their gloo threads are destroyed too late and the process aborts (SIGABRT).
        gc.collect()
        dist.destroy_process_group()
        gc.collect()


def settle_before_leaving() -> None:
    """Wait until every rank has reached this point, before ranks that agreed to stop leave the group.

    Why: gloo aborts a process (SIGABRT, no Python error) whose peer closes the connection while
    a transfer between them is still in flight, so a rank that has sent the verdict "stop" must
    not exit before the others have received it. Every rank that learnt of the failure calls it.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def quiet(err: UserError) -> UserError:
    """Mark an error as reported by rank 0: `toolkit.utils.run_cli` exits 2 without printing it again."""
    err.quiet = True
    return err


def all_succeed(fn: Callable[[], T], rank: int, world_size: int) -> list[T]:
    """Run `fn` on every rank: every rank's result in rank order, or the first failing rank's `UserError` on all.

    A collective (every rank calls it at the same point), and a barrier: it returns or raises
    only once every rank has run `fn`, so no rank waits for one that has given up. The error
    reads "rank R: message" when rank R > 0 failed; it is `quiet` off rank 0, which prints it.
    One process: `[fn()]`.

    Example:
        >>> all_succeed(lambda: 7, rank=0, world_size=1)
        [7]
    """
    if world_size <= 1:
        return [fn()]
    import torch.distributed as dist

    try:
        mine = ("ok", fn())
    except UserError as err:
        mine = ("error", str(err))
    every: list = [None] * world_size
    dist.all_gather_object(every, mine)  # our own ranks' results (pickled by torch.distributed itself)
    failed = [(r, value) for r, (status, value) in enumerate(every) if status == "error"]
    if failed:
        settle_before_leaving()
        first, message = failed[0]
        err = UserError(message if first == 0 else f"rank {first}: {message}")
        raise err if rank == 0 else quiet(err)
    return [value for _, value in every]
