"""Adaptation modules: small networks applied to both images' features before the cosine.

Five models, by the name `train.py --model` takes:

- `original`: `Linear(in_dim, 1024, bias=False)` then ReLU, the paper's adaptation function
  (`out_dim`: 1024 unless given).
- `linear`: `Linear(in_dim, out_dim, bias=False)` without the ReLU (`out_dim`: 256 unless given).
- `cca`: the same bias-free linear layer, fitted in closed form rather than trained: the shared
  CCA of `adaptation.cca`, `out_dim` being its k (the fit sets it; `in_dim` until then).
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
    "Linear",
    "SharedCCA",
    "MODELS",
    "OUT_DIM_MODELS",
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


class Linear(nn.Module):
    """A bias-free linear map, `x @ W.T` with `W` of shape `(out_dim, in_dim)`: `original` without its ReLU.

    Adapted cosines then lie in [-1, 1]; its null space is what the map learns to ignore.
    """

    def __init__(self, in_dim: int, out_dim: int = 256):
        super().__init__()
        self.in_dim, self.out_dim = int(in_dim), int(out_dim)
        if self.out_dim < 1:
            raise UserError(f"out_dim must be at least 1, got {out_dim}")
        self.weight_matrix = nn.Linear(self.in_dim, self.out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight_matrix(x)

    def init_kwargs(self) -> dict[str, Any]:
        return {"out_dim": self.out_dim}


class SharedCCA(Linear):
    """`Linear` whose weights are set in closed form (`adaptation.cca`), not trained; `out_dim` is the CCA's k.

    Before `set_map` it is the full basis's size, `in_dim`. A checkpoint rebuilds it with the
    fitted k (`out_dim`) and loads the weights as for any model.
    """

    def __init__(self, in_dim: int, out_dim: int | None = None):
        super().__init__(in_dim, in_dim if out_dim is None else out_dim)
        self.weight_matrix.weight.requires_grad_(False)  # nothing here is trained: no optimiser takes it

    @torch.no_grad()
    def set_map(self, weight: torch.Tensor) -> None:
        """Take `weight`, `(k, in_dim)`, as the map (`out_dim` becomes k), on the model's device and dtype."""
        if weight.ndim != 2 or weight.shape[1] != self.in_dim or weight.shape[0] < 1:
            raise ValueError(f"expected a (k, {self.in_dim}) map, got {tuple(weight.shape)}")
        old = self.weight_matrix.weight
        self.out_dim = int(weight.shape[0])
        self.weight_matrix = nn.Linear(self.in_dim, self.out_dim, bias=False, device=old.device, dtype=old.dtype)
        self.weight_matrix.weight.copy_(weight)
        self.weight_matrix.weight.requires_grad_(False)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "original": Original,
    "peterson": Peterson,
    "dummy": Dummy,
    "linear": Linear,
    "cca": SharedCCA,
}
"""Model name (as `train.py --model` takes it) to constructor `(in_dim, **kwargs)`."""

OUT_DIM_MODELS = ("original", "linear")
"""The models whose output width is a choice (`train.py --out-dim`); `cca`'s is its k (`--cca-k`)."""


def build_model(name: str, in_dim: int, **kwargs: Any) -> nn.Module:
    """Create an untrained adaptation model.

    Args:
        name: one of `MODELS` (`original`, `peterson`, `dummy`, `linear`, `cca`).
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
