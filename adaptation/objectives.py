"""Objectives that learn from positive pairs only: SimSiam and BYOL heads around an adaptation model.

The paper's closing research question: can the similarity be learnt from the look-alike pairs
alone, with no negatives? Two answers from self-supervised learning, applied to a pair
`(left, right)` as the two "views":

- **SimSiam** (Chen and He, 2021, "Exploring Simple Siamese Representation Learning"): one
  encoder `f` (the adaptation model), a predictor MLP `h`, and

      L = 0.5 * D(h(f(left)), sg(f(right))) + 0.5 * D(h(f(right)), sg(f(left)))

  with `D(p, z) = -cos(p, z)` and `sg` the stop-gradient. See `simsiam_loss`.
- **BYOL** (Grill et al., 2020, "Bootstrap your own latent"): an online encoder `f` plus
  predictor `h`, and a target encoder `g` that is never trained by gradient but follows `f` by
  exponential moving average, `g <- tau * g + (1 - tau) * f` after each optimiser step:

      L = 0.5 * ||n(h(f(left))) - n(g(right))||^2 + 0.5 * ||n(h(f(right))) - n(g(left))||^2

  where `n` is L2 normalisation (`||n(a) - n(b)||^2 = 2 - 2 cos(a, b)`). The two directions are
  averaged, not summed as in the paper, so the loss reads on the same scale whatever the
  symmetrisation. See `byol_loss`, `ema_update`.

**The EMA schedule** (`byol_tau`) is BYOL's: `tau` rises from its base value to 1 along a
half cosine over the run's optimiser steps, `tau_k = 1 - (1 - tau_base) (cos(pi k / K) + 1) / 2`.
The base is 0.99 by default (`DEFAULT_EMA`), not BYOL's 0.996: BYOL tuned 0.996 for ImageNet
runs of about 300,000 steps, while a run here makes a few hundred to a few thousand (150 epochs
of a few minibatches), so the target's time constant `1 / (1 - tau)` starts at 100 steps rather than 250.
The paper being reproduced has no BYOL code to take a value from.

In both, BYOL's projector is the adaptation model itself: its output is what similarity.py
compares, so it is the representation and the projection at once. The predictor
(`Predictor`) is SimSiam's shape, a bottleneck `Linear(d, d/4) - BatchNorm - ReLU - Linear(d/4, d)`.

**Collapse.** Positive-only objectives have a trivial minimum: every input mapped to the same
vector. `output_std` is the per-dimension standard deviation of the L2-normalised outputs
averaged over dimensions, SimSiam's collapse monitor: 0 for a constant output, about
`1 / sqrt(d)` for outputs spread over the sphere. `is_collapsed` compares it with
`COLLAPSE_RATIO / sqrt(d)`.

Example:
    >>> import torch
    >>> from adaptation.models import build_model
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> objective = build_objective("simsiam", build_model("original", 16, out_dim=32))
    >>> loss, (z_left, z_right) = objective(torch.randn(8, 16), torch.randn(8, 16))
    >>> loss.shape, z_left.shape
    (torch.Size([]), torch.Size([8, 32]))
"""

from __future__ import annotations

import copy
import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from toolkit.checks import Check
from toolkit.utils import UserError

from .losses import EPS


Gather = Callable[[torch.Tensor], torch.Tensor]
"""Joins the ranks' shares of a batch into the global batch, with gradient (`adaptation.distributed.gather_rows`)."""

__all__ = [
    "OBJECTIVES",
    "POSITIVE_OBJECTIVES",
    "DEFAULT_EMA",
    "EMA",
    "COLLAPSE_RATIO",
    "Predictor",
    "negative_cosine",
    "simsiam_loss",
    "byol_loss",
    "ema_update",
    "byol_tau",
    "output_std",
    "is_collapsed",
    "SimSiam",
    "BYOL",
    "build_objective",
]

OBJECTIVES = ("contrastive", "simsiam", "byol")
"""The names `train.py --objective` takes; `contrastive` is the paper's loss (`adaptation.losses`)."""
POSITIVE_OBJECTIVES = ("simsiam", "byol")
"""The objectives built here, which see positive pairs only."""
DEFAULT_EMA = 0.99
"""BYOL's base target decay here (see the module docstring for why not BYOL's 0.996)."""
EMA = Check(float, "in [0, 1]", lambda v: 0.0 <= v <= 1.0)
"""The rule of a base decay (train.py's `--ema` reads it with the same rule)."""
COLLAPSE_RATIO = 0.1
"""A run counts as collapsed when `output_std * sqrt(d)` ends below this (healthy spread: about 1)."""


class Predictor(nn.Module):
    """SimSiam's predictor: `Linear(d, h) - BatchNorm1d(h) - ReLU - Linear(h, d)`, `h = d // 4` by default.

    BatchNorm needs at least 2 rows per batch in training mode.
    """

    def __init__(self, dim: int, hidden: int | None = None):
        super().__init__()
        self.dim = int(dim)
        self.hidden = int(hidden) if hidden else max(1, self.dim // 4)
        self.net = nn.Sequential(
            nn.Linear(self.dim, self.hidden, bias=False),
            nn.BatchNorm1d(self.hidden),
            nn.ReLU(inplace=True),
            nn.Linear(self.hidden, self.dim),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


def _cosine_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # In fp32 at least (fp64 stays fp64); norms clamped as in adaptation.losses: a ReLU output can be all zeros.
    dtype = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
    return (F.normalize(a.to(dtype), dim=1, eps=EPS) * F.normalize(b.to(dtype), dim=1, eps=EPS)).sum(dim=1)


def negative_cosine(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """SimSiam's `D(p, z) = -mean_i cos(p_i, sg(z_i))`: no gradient flows into `z`."""
    return -_cosine_rows(p, z.detach()).mean()


def simsiam_loss(p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """SimSiam's symmetrised loss `0.5 D(p1, z2) + 0.5 D(p2, z1)`, in [-1, 1].

    Args:
        p1, p2: `(N, d)` predictions from each side's encoder output.
        z1, z2: `(N, d)` encoder outputs; they are detached here (the stop-gradient).
    """
    return 0.5 * negative_cosine(p1, z2) + 0.5 * negative_cosine(p2, z1)


def byol_loss(p1: torch.Tensor, p2: torch.Tensor, t1: torch.Tensor, t2: torch.Tensor) -> torch.Tensor:
    """BYOL's loss averaged over both directions: `0.5 mean(2 - 2 cos(p1, t2)) + 0.5 mean(2 - 2 cos(p2, t1))`, in [0, 4].

    Args:
        p1, p2: `(N, d)` online predictions of each side.
        t1, t2: `(N, d)` target outputs of each side; detached here.
    """
    return 0.5 * (2 - 2 * _cosine_rows(p1, t2.detach())).mean() + 0.5 * (2 - 2 * _cosine_rows(p2, t1.detach())).mean()


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, tau: float) -> None:
    """In place, `target <- tau * target + (1 - tau) * online` for every parameter; buffers are copied."""
    for t, o in zip(target.parameters(), online.parameters(), strict=True):
        t.lerp_(o.detach(), 1.0 - tau)
    for t, o in zip(target.buffers(), online.buffers(), strict=True):
        t.copy_(o)


def byol_tau(base: float, step: int, total_steps: int) -> float:
    """BYOL's decay at optimiser step `step` of `total_steps`: `1 - (1 - base) (cos(pi step / total) + 1) / 2`.

    `base` at step 0, rising along a half cosine to 1 at the last step.
    """
    if total_steps <= 0:
        return base
    return 1.0 - (1.0 - base) * (math.cos(math.pi * min(step, total_steps) / total_steps) + 1.0) / 2.0


@torch.no_grad()
def output_std(z: torch.Tensor) -> torch.Tensor:
    """Mean over dimensions of the per-dimension std (over rows) of the L2-normalised rows of `z`.

    About `1 / sqrt(d)` for outputs spread over the sphere, 0 when every row points the same way.
    Returns a 0-d fp32 tensor on `z`'s device.
    """
    return F.normalize(z.float(), dim=1, eps=EPS).std(dim=0).mean()


def is_collapsed(std: float, dim: int, ratio: float = COLLAPSE_RATIO) -> bool:
    """Whether an `output_std` value for `dim`-d outputs means collapse: `std * sqrt(dim) < ratio`.

    A NaN std (a diverged model) counts as collapsed.
    """
    return not (std * math.sqrt(dim) >= ratio)


class SimSiam(nn.Module):
    """SimSiam around an adaptation model: `objective(left, right)` gives `(loss, (z_left, z_right))`.

    Attributes:
        encoder: the adaptation model (what similarity uses).
        predictor: the `Predictor` (kept for resuming; not used for similarity).
    """

    name = "simsiam"

    def __init__(self, encoder: nn.Module, predictor: nn.Module):
        super().__init__()
        self.encoder, self.predictor = encoder, predictor
        self.target = None

    def forward(self, left: torch.Tensor, right: torch.Tensor,
                gather: Gather | None = None) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """The loss of a batch `(left, right)` and the encoder's outputs.

        Under torchrun, `left` and `right` are this rank's share of the global batch and `gather`
        joins the ranks' encoder outputs (with gradient) before the predictor, so its BatchNorm
        sees the global batch and every rank computes the global batch's loss.
        """
        z1, z2 = self.encoder(left), self.encoder(right)
        if gather is not None:
            z1, z2 = gather(z1), gather(z2)
        return simsiam_loss(self.predictor(z1), self.predictor(z2), z1, z2), (z1, z2)

    def after_step(self, step: int, total_steps: int) -> None:
        """Nothing to do after an optimiser step (BYOL updates its target here)."""

    def config(self) -> dict[str, Any]:
        """The objective's settings, as plain values."""
        return {"objective": self.name, "predictor_hidden": self.predictor.hidden}


class BYOL(nn.Module):
    """BYOL around an adaptation model: online `encoder` + `predictor`, EMA `target` copy of the encoder.

    Call `after_step(step, total_steps)` after each optimiser step to move the target.

    Attributes:
        encoder: the online adaptation model (what similarity uses).
        predictor: the `Predictor`.
        target: a copy of the encoder, without gradients, updated by `ema_update`.
        ema: the base decay (`byol_tau` raises it to 1 over the run).
    """

    name = "byol"

    def __init__(self, encoder: nn.Module, predictor: nn.Module, ema: float = DEFAULT_EMA):
        super().__init__()
        problem = EMA.problem(ema)
        if problem is not None:
            raise UserError(f"ema {problem}")
        self.encoder, self.predictor, self.ema = encoder, predictor, float(ema)
        self.target = copy.deepcopy(encoder).requires_grad_(False)
        self.tau = self.ema

    def forward(self, left: torch.Tensor, right: torch.Tensor,
                gather: Gather | None = None) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """The loss of a batch `(left, right)` and the online encoder's outputs (`gather`: as `SimSiam.forward`)."""
        z1, z2 = self.encoder(left), self.encoder(right)
        with torch.no_grad():
            t1, t2 = self.target(left), self.target(right)
        if gather is not None:
            z1, z2 = gather(z1), gather(z2)
            with torch.no_grad():
                t1, t2 = gather(t1), gather(t2)
        return byol_loss(self.predictor(z1), self.predictor(z2), t1, t2), (z1, z2)

    def after_step(self, step: int, total_steps: int) -> None:
        """Move the target towards the encoder with the scheduled decay of step `step` (1-based)."""
        self.tau = byol_tau(self.ema, step, total_steps)
        ema_update(self.target, self.encoder, self.tau)

    def config(self) -> dict[str, Any]:
        """The objective's settings, as plain values."""
        return {"objective": self.name, "predictor_hidden": self.predictor.hidden, "ema": self.ema,
                "ema_schedule": "cosine to 1 over the optimiser steps (BYOL)"}


def build_objective(name: str, encoder: nn.Module, *, ema: float = DEFAULT_EMA,
                    predictor_hidden: int | None = None) -> SimSiam | BYOL:
    """Wrap an adaptation model in a positive-only objective.

    Args:
        name: `simsiam` or `byol`.
        encoder: the adaptation model; it must have trainable parameters and an `out_dim`.
        ema: BYOL's base target decay.
        predictor_hidden: the predictor's bottleneck width (default `out_dim // 4`).

    Raises:
        UserError: an unknown name, or an encoder with nothing to train (`dummy`).
    """
    if name not in POSITIVE_OBJECTIVES:
        raise UserError(f"unknown positive-pair objective {name!r}; choose from {', '.join(POSITIVE_OBJECTIVES)}")
    if not any(p.requires_grad for p in encoder.parameters()):
        # Worded for train.py's flag names too (`toolkit.utils.flag_names` turns objective and model into flags).
        raise UserError(f"objective {name} trains the adaptation, and the one given has no parameters (dummy): "
                        f"nothing to train; use model original or peterson")
    predictor = Predictor(encoder.out_dim, predictor_hidden)
    if name == "simsiam":
        return SimSiam(encoder, predictor)
    return BYOL(encoder, predictor, ema)
