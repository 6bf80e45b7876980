"""Data parallelism over `torchrun` processes: who this process is, its share of a batch, gathers.

`train.py` under `torchrun --nproc_per_node K` runs K copies of itself; each holds the whole
(small) features file, draws the same global batches and takes a contiguous share of each.
The adapted vectors of the shares are all-gathered *with gradient*
(`torch.distributed.nn.functional.all_gather`, whose backward sums each share's gradient over
the ranks), so each rank scores its own rows against every column of the global batch, as
open_clip's `ClipLoss(local_loss=True, gather_with_grad=True)` does. Shares may differ in size
(a last, smaller batch): each is padded to the largest for the collective and the padding is
dropped from the result.

A single process is `Dist()`: rank 0 of 1, and every helper here is then the identity.

Example:
    >>> d = Dist()
    >>> d.share(10)
    (0, 10)
    >>> Dist(rank=1, world_size=3).share(10)
    (4, 7)
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

__all__ = ["Dist", "share_bounds", "gather_rows", "all_reduce_sum", "all_reduce_min", "broadcast_int",
           "agree_on_failure", "from_env", "init_group", "run_ranked_cli"]


def share_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rows `[start, stop)` of `n` that rank `rank` of `world_size` holds: contiguous, sizes differing by at most 1."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


@dataclass(frozen=True)
class Dist:
    """This process's place in a data-parallel group (`world_size == 1`: no group at all).

    Attributes:
        rank, world_size: as torch.distributed numbers them.
        local_world_size: ranks sharing this machine (for the memory check on the CPU).
    """

    rank: int = 0
    world_size: int = 1
    local_world_size: int = 1

    @property
    def active(self) -> bool:
        """Whether collectives are needed (more than one rank)."""
        return self.world_size > 1

    def share(self, n: int) -> tuple[int, int]:
        """This rank's rows `[start, stop)` of a global batch of `n`."""
        return share_bounds(n, self.rank, self.world_size)


def gather_rows(x: torch.Tensor, dist: Dist, n: int) -> torch.Tensor:
    """All ranks' shares of a global batch of `n` rows, in rank order, differentiable.

    Args:
        x: this rank's share, `(stop - start, D)` as `dist.share(n)` gives.
        dist: the group.
        n: the global batch size.

    Returns:
        `(n, D)`: row i is global row i. The gradient reaching each row flows back to the rank
        that holds it (summed over the ranks that used it).
    """
    if not dist.active:
        return x
    import torch.distributed.nn.functional as dnn

    sizes = [share_bounds(n, r, dist.world_size) for r in range(dist.world_size)]
    longest = max(stop - start for start, stop in sizes)
    padded = x if x.shape[0] == longest else torch.cat([x, x.new_zeros((longest - x.shape[0], *x.shape[1:]))])
    with warnings.catch_warnings():
        # Deprecated in favour of a private API (_functional_collectives); this one is public and differentiable.
        warnings.simplefilter("ignore", FutureWarning)
        parts = dnn.all_gather(padded)
    return torch.cat([part[: stop - start] for part, (start, stop) in zip(parts, sizes)])


def all_reduce_sum(x: torch.Tensor, dist: Dist) -> torch.Tensor:
    """`x` summed over the ranks (in place; `x` itself for a single process)."""
    if dist.active:
        import torch.distributed as tdist

        tdist.all_reduce(x, op=tdist.ReduceOp.SUM)
    return x


def from_env(environ: dict[str, str] | None = None) -> Dist:
    """This process's place as `torchrun` describes it (`RANK`, `WORLD_SIZE`, `LOCAL_WORLD_SIZE`); `Dist()` outside torchrun."""
    from toolkit.distributed import torchrun_env

    env = torchrun_env(environ)
    if env["world_size"] <= 1:
        return Dist()
    return Dist(rank=env["rank"], world_size=env["world_size"], local_world_size=env["local_world_size"])


def broadcast_int(value: int, dist: Dist) -> int:
    """Rank 0's `value` on every rank (e.g. a seed drawn at random)."""
    if not dist.active:
        return value
    import torch.distributed as tdist

    t = torch.tensor([value], dtype=torch.int64)
    tdist.broadcast(t, src=0)
    return int(t.item())


def all_reduce_min(value: float, dist: Dist) -> float:
    """The smallest `value` over the ranks."""
    if not dist.active:
        return value
    import torch.distributed as tdist

    t = torch.tensor([value], dtype=torch.float64)
    tdist.all_reduce(t, op=tdist.ReduceOp.MIN)
    return float(t.item())


def agree_on_failure(failure: Exception | None, dist: Dist) -> None:
    """Raise on every rank when any rank failed a check, so that all stop together (no rank waits alone).

    Every rank calls this at the same point (it is a collective, `toolkit.distributed.all_succeed`).
    Every rank raises the first failing rank's `UserError` ("rank R: ..." when R > 0), which
    `run_ranked_cli` prints only on rank 0, once. A single process just raises `failure`.
    """
    from toolkit.distributed import all_succeed

    def check() -> None:
        if failure is not None:
            raise failure

    all_succeed(check, dist.rank, dist.world_size)


_PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "remote worker crashing")
"""What gloo's RuntimeError says when another rank's process has gone (it raises no DistError for it)."""


def run_ranked_cli(main, prog: str, dist: Dist | None = None) -> int:
    """`toolkit.utils.run_cli` for a script that may run as one rank of several.

    `dist` defaults to the place torchrun's environment describes (`from_env`); environment
    variables that are not integers are one line and exit 2, like any bad input.

    - Bad input (`UserError`) is printed by rank 0 only: every rank checks the same input and
      finds the same fault, so one line says it; all ranks exit 2. An `OSError` (disk full,
      read-only place) is one line naming the path, exit 2, from the rank that met it.
    - Any other failure prints one line naming the rank (`prog: rank 1 of 2 failed: ...`) and
      exits 1; the other ranks, which then lose their peer (a torch.distributed error) or get
      SIGTERM from torchrun, stop quietly after their own clean-up.
    """
    import sys

    from toolkit.utils import UserError, first_line, os_error_line, run_cli, terminated_as_interrupt

    if dist is None:
        try:
            dist = from_env()
        except UserError as err:
            print(f"{prog}: error: {err}", file=sys.stderr)
            return 2
    if not dist.active:
        return run_cli(main, prog=prog)

    try:
        # torchrun stops the ranks with SIGTERM after one failed: unwind, cleaning up as for Ctrl-C.
        with terminated_as_interrupt():
            return int(main(None) or 0)
    except UserError as err:
        if dist.rank == 0:
            print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:  # Ctrl-C, or SIGTERM/SIGHUP as toolkit.utils.Terminated
        return getattr(err, "exit_code", 130)
    except Exception as err:  # noqa: BLE001 - the top of a rank: one line instead of a traceback per rank
        import torch.distributed as tdist

        if isinstance(err, tdist.DistError) or any(m in str(err) for m in _PEER_LOST):
            return 1  # a peer went away; that rank says why
        if isinstance(err, OSError):  # disk full, read-only place...: one line naming the path, as run_cli does
            print(f"{prog}: error: {os_error_line(err)}", file=sys.stderr)
            return 2
        print(f"{prog}: rank {dist.rank} of {dist.world_size} failed: {first_line(err)}", file=sys.stderr)
        return 1
    finally:
        from toolkit.distributed import destroy_group

        destroy_group()


def init_group(dist: Dist, device: torch.device, timeout_s: float = 600.0) -> None:
    """Join the torchrun group: gloo for CPU tensors, plus NCCL for CUDA ones when training on CUDA."""
    if not dist.active:
        return
    import datetime

    import torch.distributed as tdist

    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    tdist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
