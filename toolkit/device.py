"""The one device chooser: what a script or an API is asked for, to the torch device this process computes on.

extract.py and similarity.py take `--device NAME`, train.py the paper's `--gpu/--cpu` (mapped to a name
there), `retrieval.visual_similarity.VisualSimilarity.from_run` a name or a device; all of them come
here. No name means CUDA when available, else the CPU. A named device is checked now: an unknown name,
or a CUDA device this machine lacks, is a `UserError` before any model loads (torch would only fail
later). Under torchrun a CUDA device becomes this rank's own GPU, `cuda:LOCAL_RANK`
(`toolkit.distributed.Ranks.device_for`, which refuses fewer GPUs than ranks).

Example:
    >>> choose_device("cpu")
    device(type='cpu')
"""

from __future__ import annotations

from typing import Any

from .utils import UserError, first_line

__all__ = ["choose_device"]


def choose_device(name: Any = None, ranks: Any = None, *, flag: str = "--device", cpu_hint: str = "--device cpu"):
    """The `torch.device` to compute on.

    Args:
        name: a device name (`cpu`, `cuda`, `cuda:N`), a `torch.device`, or None for CUDA when
            available, else the CPU.
        ranks: under torchrun, this process's `toolkit.distributed.Ranks` (a CUDA device becomes
            `cuda:LOCAL_RANK`); None for one process.
        flag: how the user gave `name`, for the messages.
        cpu_hint: how the user asks for the CPU instead, for the message when there are fewer GPUs than ranks.

    Raises:
        UserError: a name that is not a torch device, a device type other than cpu and cuda, a
            CUDA device that is not there, or fewer GPUs than ranks on this machine.
    """
    import torch

    if name is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = _named(name, flag)
    return device if ranks is None else ranks.device_for(device, cpu_hint=cpu_hint)


def _named(name: Any, flag: str):
    """A device the user named, checked against this machine."""
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError) as err:
        raise UserError(f"{flag} {name!r} is not a torch device ({first_line(err)}); use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UserError(f"{flag} {name} was asked for but CUDA is not available; use {flag} cpu")
        if device.index is not None and device.index >= count:
            raise UserError(f"{flag} {name}: there are only {count} CUDA device(s) (cuda:0..cuda:{count - 1})")
    elif device.type != "cpu":
        raise UserError(f"{flag} {name}: only cpu and cuda devices are supported")
    return device
