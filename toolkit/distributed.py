"""The one rank type of every script under torchrun: where this process is, its share, how the ranks agree and leave.

    torchrun --nproc_per_node K extract.py|train.py|similarity.py <the same flags>

`Ranks.from_env()` reads what torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
MASTER_ADDR, MASTER_PORT) and refuses an inconsistent environment in one line, before anything
starts: a number that is none, a rank outside the world, a MASTER_PORT that is no port (1 to
65535), and a stale environment: RANK and WORLD_SIZE > 1 left in a shell, in a process that
torchrun did not start (torchrun sets TORCHELASTIC_* variables; none is there), which would
otherwise wait for peers that never come. A plain `python script.py` is rank 0 of 1 and nothing
here then talks to anyone. `Ranks.join(device)` joins the process group: the backend follows the
device (gloo for CPU tensors, and NCCL for CUDA ones next to it: `cpu:gloo,cuda:nccl`, so the small
verdicts below still travel on the CPU), with one collective timeout, `TIMEOUT`. The first join
itself is bounded: when not every rank has joined within `JOIN_TIMEOUT` seconds (300; the variable
TOOLKIT_JOIN_TIMEOUT sets another), each rank waiting says so in one line, naming the variables to
unset, and exits 2. `Ranks.shard(n)` is the one rule that cuts n items or rows
into contiguous shares. `toolkit.cli.run_cli` runs a script's `main` on every rank.

How the ranks stop together (the order of collectives on each path). Every rank makes the same
collectives in the same order; a rank leaves the group only once every rank has the verdict:

- **Bad input found alike on every rank** (a flag, the environment, a missing file): each rank
  raises before `join` or at the same point after it; no collective is pending. Rank 0 prints
  the line, the others print nothing (`run_cli`); all exit 2.
- **A check only rank 0 makes** (the output folder's lock, whether it can be written, what is
  already done): `Ranks.agree(fn)`. 1. rank 0 runs `fn`; 2. `broadcast_object_list` of its
  verdict (every rank); 3. on a refusal, `stop_together()` on every rank; 4. every rank raises
  (quiet off rank 0) and exits 2.
- **A failure any rank can hit at a known point** (an unreadable image under --strict, a loss
  that is not finite, late bad input): `Ranks.all_succeed(fn)`. 1. every rank runs `fn`;
  2. `all_gather_object` of (status, result or message); 3. when any failed, `stop_together()`
  on every rank; 4. every rank raises the first failure's message (quiet off rank 0).
- `stop_together()`: 1. from here on SIGTERM and SIGHUP are ignored (see below); 2. a barrier,
  so no rank closes its connections while a peer is still receiving the verdict (gloo aborts a
  process, SIGABRT, whose peer hangs up in the middle of a transfer).
- **Success**: every rank returns from `main`, then passes a barrier (`Ranks.leave(together=True)`),
  so no rank leaves while another is still at work (rank 0 writing the outputs) or receiving.
- **Leaving** (`Ranks.leave()`, in `run_cli`'s `finally`, on every path: success, refusal,
  failure, Ctrl-C): collect garbage, destroy the group, collect again. Objects that hold the
  group (DDP's reducer, gloo work kept by exception frames) would otherwise be destroyed at
  interpreter shutdown, after the group, and abort the process.
- **A failure outside an agreement point** (a bug, a full disk on rank 0 mid-run): the failing
  rank prints one line naming itself and leaves. Its peers are inside a collective, which fails
  with a lost peer; they exit 1 without a line of their own (`run_cli`).
- **Ctrl-C**: every rank gets SIGINT from the terminal and unwinds as a single process does
  (its clean-up runs); nothing is left half-written.

Why SIGTERM is ignored once the ranks agreed to stop: torchrun ends the other ranks with SIGTERM
as soon as one rank exits non-zero. Every rank is already on its way out with its own exit
status (2), so the signal would only cut a clean-up short, or kill a rank inside the group's
teardown. Ranks that stop together therefore all exit 2, none by a signal they did not ask for.

Example:
    >>> Ranks.from_env({}).world_size, list(Ranks.from_env({}).shard(4))
    (1, [0, 1, 2, 3])
    >>> Ranks(rank=1, world_size=3).shard(10)
    range(4, 7)
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import signal
import threading
from dataclasses import dataclass, replace
from typing import Callable, Mapping, TypeVar

from .utils import UserError, first_line

T = TypeVar("T")

__all__ = ["Ranks", "TIMEOUT", "JOIN_TIMEOUT", "JOIN_TIMEOUT_VARIABLE", "TORCHRUN_VARIABLES", "shard_bounds", "quiet",
           "loud", "stop_together", "ignore_termination"]

TIMEOUT = datetime.timedelta(days=2)
"""How long a collective waits for the other ranks. Long on purpose: ranks legitimately wait for each
other for hours (a resumed extraction whose shards are unequally done, rank 0 fitting the PCA while the
others wait), and a rank that dies is caught by torchrun, which stops the others at once."""

JOIN_TIMEOUT = 300.0
"""Seconds the first join waits for every rank (`Ranks.join`). Ranks start together under torchrun and join
after the same quick checks, so a rank still missing after this is one that will not come: a stale
environment, or a peer that failed to start. `JOIN_TIMEOUT_VARIABLE` sets another bound."""
JOIN_TIMEOUT_VARIABLE = "TOOLKIT_JOIN_TIMEOUT"
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
"""The variables torchrun sets for each rank that this module reads (the ones to unset when stale)."""


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Items `[start, stop)` of `n` that rank `rank` of `world_size` takes: contiguous, in rank order,
    sizes differing by at most one (the first `n % world_size` ranks take one more)."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def quiet(err: UserError) -> UserError:
    """Mark an error as reported by rank 0: `toolkit.cli.run_cli` exits 2 without printing it again."""
    err.quiet = True
    return err


def loud(err: UserError) -> UserError:
    """Mark an error that every rank prints (`toolkit.cli.run_cli`): one no other rank can say for it."""
    err.loud = True
    return err


def _stale(env: Mapping[str, str]) -> str:
    """The torchrun variables set in `env`, as a shell would unset them."""
    return "unset " + " ".join(name for name in TORCHRUN_VARIABLES if name in env)


def _launch(env: Mapping[str, str], world: int, rank: int) -> float:
    """Refuse a many-rank environment torchrun did not make, or whose address cannot be; the join bound (seconds)."""
    if not any(name.startswith("TORCHELASTIC_") for name in env):
        raise UserError(f"WORLD_SIZE={world} and RANK={rank} are set, but torchrun did not start this process (no "
                        f"TORCHELASTIC_* variable): left over in this shell? {_stale(env)}; or start the ranks "
                        f"with torchrun")
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not env.get(name)]
    if missing:
        raise UserError(f"WORLD_SIZE={world} but {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} "
                        f"not set: start the ranks with torchrun (it sets them), or unset WORLD_SIZE")
    port = env["MASTER_PORT"]
    if not (port.isdigit() and 1 <= int(port) <= 65535):
        raise UserError(f"MASTER_PORT={port!r} is not a port number (1 to 65535); pass a free port to torchrun "
                        f"(--master-port), or unset MASTER_PORT")
    bound = env.get(JOIN_TIMEOUT_VARIABLE, str(JOIN_TIMEOUT))
    try:
        seconds = float(bound)
    except ValueError:
        seconds = float("nan")
    if not 0 < seconds < float("inf"):
        raise UserError(f"{JOIN_TIMEOUT_VARIABLE}={bound!r} is not a number of seconds; unset it for "
                        f"{JOIN_TIMEOUT:g}")
    return seconds


@contextlib.contextmanager
def _native_stderr_silenced():
    """File descriptor 2 pointed at /dev/null for the block: native code (c10d) writes there directly."""
    import os
    import sys

    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def ignore_termination() -> None:
    """From now on, SIGTERM and SIGHUP are ignored: this rank is already on its way out (see the module doc)."""
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)


def stop_together() -> None:
    """Called by every rank once the ranks agreed to stop: ignore torchrun's SIGTERM, then wait for every rank.

    See the module docstring for why; the barrier is skipped outside a process group.
    """
    import torch.distributed as dist

    ignore_termination()
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _integer(env: Mapping[str, str], name: str, default: str) -> int:
    text = env.get(name, default)
    try:
        return int(text)
    except ValueError:
        raise UserError(f"{name}={text!r} is not an integer; RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE "
                        f"are set by torchrun: start the ranks with torchrun, or unset them") from None


@dataclass(frozen=True)
class Ranks:
    """This process's place among the ranks (rank 0 of 1 without torchrun).

    Attributes:
        rank, world_size: as torch.distributed numbers them.
        local_rank, local_world_size: this process's place on its machine (its GPU is `cuda:local_rank`).
        backend: the process group's backend once joined (`join`), else None.
        join_timeout: seconds `join` waits for every rank to arrive (`JOIN_TIMEOUT`).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    backend: str | None = None
    join_timeout: float = JOIN_TIMEOUT

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "Ranks":
        """This process's place as torchrun's environment describes it; a `UserError` naming what is inconsistent."""
        import os

        env = os.environ if environ is None else environ
        world = _integer(env, "WORLD_SIZE", "1")
        rank = _integer(env, "RANK", "0")
        local = _integer(env, "LOCAL_RANK", str(rank))
        local_world = _integer(env, "LOCAL_WORLD_SIZE", str(world))
        if world < 1:
            raise UserError(f"WORLD_SIZE={world}: there must be at least one rank; start the ranks with torchrun, "
                            f"or unset WORLD_SIZE")
        if not 0 <= rank < world:
            raise UserError(f"RANK={rank} is outside 0..{world - 1} (WORLD_SIZE={world}); start the ranks with "
                            f"torchrun, or unset RANK")
        if not 1 <= local_world <= world or not 0 <= local < local_world:
            raise UserError(f"LOCAL_RANK={local} and LOCAL_WORLD_SIZE={local_world} do not fit WORLD_SIZE={world}; "
                            f"start the ranks with torchrun, or unset them")
        if world > 1:
            return cls(rank, world, local, local_world, join_timeout=_launch(env, world, rank))
        return cls(rank, world, local, local_world)

    @property
    def distributed(self) -> bool:
        """Whether there are other ranks (collectives are needed)."""
        return self.world_size > 1

    @property
    def label(self) -> str:
        """'rank R/K' for progress bars; empty in a one-process run."""
        return f"rank {self.rank}/{self.world_size}" if self.distributed else ""

    def shard(self, n: int) -> range:
        """This rank's items or rows of `n` (`shard_bounds`)."""
        return range(*shard_bounds(n, self.rank, self.world_size))

    def layout(self, n: int) -> list[list[int]]:
        """Every rank's shard of `n` as [start, stop), in rank order (for a manifest)."""
        return [list(shard_bounds(n, r, self.world_size)) for r in range(self.world_size)]

    def check_items(self, n: int) -> None:
        """Refuse more ranks than items (a rank would get an empty shard)."""
        if n < self.world_size:
            raise UserError(f"{self.world_size} ranks for {n} item(s): every rank needs at least one; "
                            f"use --nproc_per_node {n} or fewer")

    def device_for(self, device, cpu_hint: str = "the CPU"):
        """The device this rank computes on: `cuda:LOCAL_RANK` under torchrun on CUDA (one GPU per rank), else `device`.

        A `UserError` when this machine has fewer GPUs than ranks (`cpu_hint`: how the user asks for the CPU).
        """
        import torch

        if device.type != "cuda" or not self.distributed:
            return device
        count = torch.cuda.device_count()
        if count < self.local_world_size:
            raise UserError(f"CUDA with {self.local_world_size} ranks on this machine needs {self.local_world_size} "
                            f"GPUs, found {count}; use torchrun --nproc_per_node {count}, or {cpu_hint}")
        return torch.device("cuda", self.local_rank)

    def join(self, device) -> "Ranks":
        """Join the process group torchrun set up, for work on `device`; returns the joined `Ranks` (self alone).

        A `UserError` (printed by every rank) when not every rank has arrived within `join_timeout` seconds.
        """
        if not self.distributed:
            return self
        import torch.distributed as dist

        backend, kwargs = "gloo", {}
        if device.type == "cuda":
            import torch

            torch.cuda.set_device(device)
            backend, kwargs = "cpu:gloo,cuda:nccl", {"device_id": device}
        if not dist.is_initialized():
            dist.init_process_group(backend=backend, store=self._rendezvous(), rank=self.rank,
                                    world_size=self.world_size, timeout=TIMEOUT, **kwargs)
        return replace(self, backend=backend)

    def _rendezvous(self):
        """torchrun's store (env://, as init_process_group would open it), once every rank is there.

        The store is opened with `join_timeout`, and every rank counts itself in and waits for the
        count to reach the world size under that bound; only then does the store get the
        collectives' long `TIMEOUT`. Without it, a rank whose peers never come waits for `TIMEOUT` (days).
        """
        import os

        import torch.distributed as dist

        bound = datetime.timedelta(seconds=self.join_timeout)
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")  # a restarted group counts afresh
        try:
            with _native_stderr_silenced():  # c10d logs each retry with a C++ stack: the line below says it all
                store, _, _ = next(dist.rendezvous("env://", self.rank, self.world_size, timeout=bound))
            if store.add(f"toolkit/joined/{attempt}", 1) == self.world_size:
                store.set(f"toolkit/all-joined/{attempt}", "1")
            store.wait([f"toolkit/all-joined/{attempt}"])
        except (RuntimeError, ValueError, OSError) as err:  # DistError (a RuntimeError): timed out, or no server
            where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
            raise loud(UserError(
                f"rank {self.rank} of {self.world_size}: not every rank joined at {where} within "
                f"{self.join_timeout:g} s ({first_line(err)[:120]}); if torchrun is not running these ranks, "
                f"{_stale(os.environ)}; if they are slow to start, set {JOIN_TIMEOUT_VARIABLE} to more seconds")) from None
        store.set_timeout(TIMEOUT)
        return dist.PrefixStore("default_pg", store)  # the prefix init_process_group gives the store it opens

    @staticmethod
    def leave(together: bool = False) -> None:
        """Leave the process group, if this process joined one (every path out of a script; see the module doc).

        `together`: first wait at a barrier for every rank (the success path, where every rank is on its
        way out), so that no rank tears its connections down while another still works or still has
        transfers in flight (seen: gloo aborting a rank that left while rank 0 was still writing).
        """
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            if together:
                try:
                    dist.barrier()
                except RuntimeError:  # a peer has gone (it failed after this rank finished): it says why
                    pass
            gc.collect()
            dist.destroy_process_group()
            gc.collect()

    def agree(self, fn: Callable[[], T]) -> T:
        """Run `fn` on rank 0 only; every rank gets its result, or raises its `UserError` (quiet off rank 0)."""
        if not self.distributed:
            return fn()
        import torch.distributed as dist

        box: list = [None]
        error = None
        if self.rank == 0:
            try:
                box[0] = ("ok", fn())
            except UserError as err:
                box[0], error = ("error", str(err)), err
        dist.broadcast_object_list(box, src=0)
        status, value = box[0]
        if status == "error":
            stop_together()
            raise error if error is not None else quiet(UserError(value))
        return value

    def all_succeed(self, fn: Callable[[], T]) -> list[T]:
        """Run `fn` on every rank: every rank's result in rank order, or the first failing rank's `UserError` on all.

        It is also a barrier: it returns or raises only once every rank has run `fn`. The error reads
        "rank R: message" when rank R > 0 failed; it is quiet off rank 0, which prints it.
        """
        if not self.distributed:
            return [fn()]
        import torch.distributed as dist

        try:
            mine = ("ok", fn())
        except UserError as err:
            mine = ("error", str(err))
        every: list = [None] * self.world_size
        dist.all_gather_object(every, mine)  # our own ranks' results (pickled by torch.distributed itself)
        failed = [(r, value) for r, (status, value) in enumerate(every) if status == "error"]
        if failed:
            stop_together()
            first, message = failed[0]
            err = UserError(message if first == 0 else f"rank {first}: {message}")
            raise err if self.rank == 0 else quiet(err)
        return [value for _, value in every]

    def check(self, failure: Exception | None) -> None:
        """`all_succeed` for a check already made: raise on every rank when any rank's `failure` is not None."""

        def raise_failure() -> None:
            if failure is not None:
                raise failure

        self.all_succeed(raise_failure)
