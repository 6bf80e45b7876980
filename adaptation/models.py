"""Adaptation modules: small networks applied to both images' features before the cosine.

Three models, by the name `train.py --model` takes:

- `original`: `Linear(in_dim, 1024, bias=False)` then ReLU, the paper's adaptation function.
- `peterson`: one non-negative weight per dimension, `x * relu(w)` with `w` starting at 1
  (Peterson et al., 2018, "Evaluating (and improving) the correspondence between deep neural
  networks and human representations").
- `dummy`: the identity. Nothing to train; it scores the raw features, the baseline every
  table needs.

`build_model` creates one from its name; `load_checkpoint` rebuilds a trained one from the
`model_and_optimizer.pt` that train.py writes.

Example:
    >>> import torch
    >>> model = build_model("original", in_dim=256)
    >>> model(torch.zeros(3, 256)).shape
    torch.Size([3, 1024])
"""

from __future__ import annotations

import os
import pickle
import struct
from typing import Any, Callable

import torch
from torch import nn

from featuresExtractor.utils import UserError, first_line

__all__ = [
    "Original",
    "Peterson",
    "Dummy",
    "MODELS",
    "build_model",
    "model_kwargs",
    "load_checkpoint",
    "CHECKPOINT_KEYS",
]


class Original(nn.Module):
    """The paper's adaptation: `relu(x @ W.T)` with `W` of shape `(out_dim, in_dim)`, no bias.

    The ReLU makes every adapted vector non-negative, so adapted cosines lie in [0, 1].
    """

    def __init__(self, in_dim: int, out_dim: int = 1024):
        super().__init__()
        self.in_dim, self.out_dim = int(in_dim), int(out_dim)
        # The attribute name matches the seed's checkpoints, so their state_dicts load as they are.
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
        # `W` as in the seed, so its checkpoints load as they are.
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


CHECKPOINT_KEYS = ("epoch", "state_dict", "optimizer", "config", "model_name", "in_dim", "model_kwargs", "test_names")
"""Keys every checkpoint written by train.py holds (see `load_checkpoint`)."""


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a trained model from a train.py checkpoint (`RUN_DIR/model_and_optimizer.pt`).

    The file is read with `torch.load(weights_only=True)`, so loading it never runs code.

    Args:
        path: the checkpoint file.
        device: where to put the model.

    Returns:
        `(model, checkpoint)`: the model in eval mode on `device`, and the checkpoint dict with
        the keys of `CHECKPOINT_KEYS`: `epoch` (int), `state_dict`, `optimizer` (the Adam state,
        None for `dummy`), `config` (plain dict; `config["data"]` is the absolute path of the
        features file it was trained on), `model_name`, `in_dim`, `model_kwargs`, `test_names`
        (list of str), plus `final_metrics` (dict of floats).

    Raises:
        UserError: a missing or unreadable file, or one that is not a train.py checkpoint.

    Example:
        >>> model, ckpt = load_checkpoint("runs/run1/model_and_optimizer.pt")   # doctest: +SKIP
        >>> ckpt["config"]["data"]                                             # doctest: +SKIP
        '/data/tll/clip_rn50x4/features_pca256.npy'
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, struct.error, OSError, ValueError) as err:
        # A corrupt zip is a RuntimeError, a non-tensor object refused by weights_only an
        # UnpicklingError, a truncated file EOFError; none of them should show a traceback.
        raise UserError(f"cannot read checkpoint {path}: {first_line(err)}") from None
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise UserError(f"{path} is not a train.py checkpoint: missing {', '.join(missing)}")
    model = build_model(ckpt["model_name"], ckpt["in_dim"], **ckpt["model_kwargs"])
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as err:
        raise UserError(f"{path}: weights do not fit model {ckpt['model_name']!r}: {first_line(err)}") from None
    return model.to(device).eval(), ckpt
