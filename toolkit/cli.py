"""The one runner of every script's `main`, in one process or as one rank of several under torchrun.

`run_cli(main)` turns what can go wrong into one line on stderr and an exit status, never a
traceback for a user's mistake:

- bad input (`UserError`): one line, exit 2. Under torchrun every rank finds the same fault, or
  learns of another rank's through `toolkit.distributed.Ranks.agree`/`all_succeed`: rank 0 alone prints.
- an `OSError` (disk full, read-only place): one line naming the path, exit 2, from the rank that met it.
- Ctrl-C, SIGTERM, SIGHUP: `main` unwinds (its clean-up runs), one line, exit 128 + the signal.
- any other failure: in one process, Python's own traceback (a bug to report); under torchrun one
  line naming the rank (`prog: rank 1 of 2 failed: ...`), exit 1, while the ranks that then lose
  their peer exit 1 without a line of their own.

Under torchrun the process group is left on every path (`Ranks.leave`), and once a rank is on its
way out it no longer takes torchrun's SIGTERM (the order is written down in `toolkit.distributed`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Sequence

from .distributed import Ranks, ignore_termination
from .utils import Terminated, UserError, first_line, os_error_line, terminated_as_interrupt

__all__ = ["run_cli", "HelpFormatter"]

_PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "remote worker crashing")
"""What gloo's RuntimeError says when another rank's process has gone (it raises no DistError for it)."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """`-h` with each option's default where it says something: not on switches (`--no-progress`
    defaulting to True), required options, options without a default, or help that names its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (action.required or action.default in (None, argparse.SUPPRESS) or isinstance(action.default, bool)
                or "default" in text.lower() or not action.option_strings):
            return text
        return super()._get_help_string(action)


def run_cli(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None,
            prog: str | None = None) -> int:
    """Run a script's `main(argv)` as its command line would; returns the exit status.

    `prog` names the script in the messages; by default the module that defines `main`.
    """
    prog = prog or (main.__module__ if main.__module__ != "__main__" else Path(sys.argv[0]).stem) + ".py"
    try:
        ranks = Ranks.from_env()
    except UserError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    ok = False
    try:
        with terminated_as_interrupt():
            code = int(main(argv) or 0)
        ok = True
        return code
    except UserError as err:
        # quiet: rank 0 has printed it; loud: every rank prints it (a failure to join, which no peer can report)
        if (ranks.rank == 0 or getattr(err, "loud", False)) and not getattr(err, "quiet", False):
            print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        # Disk full, read-only place, a path component that is a file...: one line, path and reason.
        print(f"{prog}: error: {os_error_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:  # Ctrl-C, or SIGTERM/SIGHUP as `Terminated`
        if ranks.rank == 0:
            print(f"{prog}: interrupted" + (f" ({err})" if isinstance(err, Terminated) else ""), file=sys.stderr)
        return getattr(err, "exit_code", 130)
    except Exception as err:  # noqa: BLE001 - the top of a rank: one line instead of a traceback per rank
        if not ranks.distributed:
            raise
        import torch.distributed as dist

        if isinstance(err, dist.DistError) or any(m in str(err) for m in _PEER_LOST):
            return 1  # a peer went away; that rank says why
        print(f"{prog}: rank {ranks.rank} of {ranks.world_size} failed: {first_line(err)}", file=sys.stderr)
        return 1
    finally:
        if ranks.distributed:
            # On the way out, torchrun's SIGTERM must not cut the group's teardown short.
            ignore_termination()
            Ranks.leave(together=ok)
