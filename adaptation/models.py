"""Adaptation modules: small networks applied to both images' features before the cosine.

Three models, by the name `train.py --model` takes:

- `original`: `Linear(in_dim, 1024, bias=False)` then ReLU, the paper's adaptation function.
- `peterson`: one non-negative weight per dimension, `x * relu(w)` with `w` starting at 1
  (Peterson et al., 2018, "Evaluating (and improving) the correspondence between deep neural
  networks and human representations").
- `dummy`: the identity. Nothing to train; it scores the raw features, the baseline every
  table needs.

`build_model` creates one from its name; `adaptation.checkpoint.load_checkpoint` rebuilds a
trained one from the `model_and_optimizer.pt` that train.py writes.

Example:
    >>> import torch
    >>> model = build_model("original", in_dim=256)
    >>> model(torch.zeros(3, 256)).shape
    torch.Size([3, 1024])
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from toolkit.utils import UserError

__all__ = [
    "Original",
    "Peterson",
    "Dummy",
    "MODELS",
    "build_model",
    "model_kwargs",
]


class Original(nn.Module):
    """The paper's adaptation: `relu(x @ W.T)` with `W` of shape `(out_dim, in_dim)`, no bias.

    The ReLU makes every adapted vector non-negative, so adapted cosines lie in [0, 1].
    """

    def __init__(self, in_dim: int, out_dim: int = 1024):
        super().__init__()
        self.in_dim, self.out_dim = int(in_dim), int(out_dim)
        # The attribute name matches the paper's code's checkpoints, so their state_dicts load as they are.
        self.weight_matrix = nn.Linear(self.in_dim, self.out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.weight_matrix(x))

    def init_kwargs(self) -> dict[str, Any]:
        return {"out_dim": self.out_dim}


class Peterson(nn.Module):
    """A non-negative weight per dimension: `x * relu(W)`, `W` starting at 1 (the identity)."""

    def __init__(self, in_dim: int):
        super().__init__()
        self.in_dim = self.out_dim = int(in_dim)
        # `W` as in the paper's code, so its checkpoints load as they are.
        self.W = nn.Parameter(torch.ones(self.in_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.relu(self.W)

    def init_kwargs(self) -> dict[str, Any]:
        return {}


class Dummy(nn.Module):
    """The identity: no parameters, no training. Scores the raw features."""

    def __init__(self, in_dim: int):
        super().__init__()
        self.in_dim = self.out_dim = int(in_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def init_kwargs(self) -> dict[str, Any]:
        return {}


MODELS: dict[str, Callable[..., nn.Module]] = {
    "original": Original,
    "peterson": Peterson,
    "dummy": Dummy,
}
"""Model name (as `train.py --model` takes it) to constructor `(in_dim, **kwargs)`."""


def build_model(name: str, in_dim: int, **kwargs: Any) -> nn.Module:
    """Create an untrained adaptation model.

    Args:
        name: one of `MODELS` (`original`, `peterson`, `dummy`).
        in_dim: the feature dimension D of the inputs.
        **kwargs: extra constructor arguments, e.g. `out_dim=512` for `original`.

    Returns:
        The `nn.Module`, on the CPU, with `in_dim` and `out_dim` attributes.

    Raises:
        UserError: for an unknown name, a non-positive `in_dim` or a bad keyword.

    Example:
        >>> build_model("peterson", 8).W.shape
        torch.Size([8])
    """
    if name not in MODELS:
        raise UserError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    if int(in_dim) < 1:
        raise UserError(f"in_dim must be positive, got {in_dim}")
    try:
        return MODELS[name](int(in_dim), **kwargs)
    except TypeError as err:
        raise UserError(f"model {name!r} does not take {sorted(kwargs)}: {err}") from None


def model_kwargs(model: nn.Module) -> dict[str, Any]:
    """The keyword arguments that, given to `build_model` with the same name and in_dim, rebuild `model`."""
    return dict(model.init_kwargs())
