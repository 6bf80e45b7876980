"""The training recipe: full-batch Adam on the contrastive loss, evaluated every epoch.

Each epoch:

1. For each training set (the original training pairs, then their flipped copies), compute
   the adapted vectors, the N x N cosine matrix and the contrastive loss; backpropagate half
   of it (the objective is the mean over the sets). With `precision="bf16"` the model and the
   similarity product run under `torch.autocast(dtype=bfloat16)`; the loss is taken in fp32.
   The cosine matrix, its exponentials and its gradient are written into N x N tensors
   allocated once per run (`adaptation._fused.Workspace`), not once per set and epoch.
2. One Adam step.
3. Read the train metrics off the originals' similarity matrix from step 1, which the loss
   already paid for (so they describe the model *before* this epoch's step, as the paper's code's
   train loss did), and evaluate the test originals with the updated model, in fp32.

Nothing leaves the device inside an epoch except one small vector of metric values. A model
without parameters (`dummy`) is evaluated once and its figures repeated for every epoch, so
its flat curves can sit beside the others in TensorBoard.

Example:
    >>> import torch
    >>> from adaptation.models import build_model
    >>> from adaptation.planted import planted_pairs
    >>> from adaptation.split import split_indices, split_data
    >>> pairs = planted_pairs(n_pairs=64, dim=16, seed=0)
    >>> data = split_data(pairs, *split_indices(len(pairs), 0.25, seed=0))
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = build_model("original", pairs.in_dim)
    >>> cfg = TrainConfig(epochs=3, temperature=15.0, topk=(1, 3))
    >>> history = train(model, data, cfg, make_optimizer(model, cfg))
    >>> len(history), sorted(history[-1])[:3]
    (3, ['Test/Loss', 'Test/MRR', 'Test/left2right top 1'])
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import torch
from torch import nn

from .split import TrainData
from ._fused import Workspace, similarity_and_loss, symmetric_cross_entropy
from .losses import similarity_matrix
from .metrics import retrieval_metrics

__all__ = ["PRECISIONS", "TrainConfig", "make_optimizer", "evaluate", "train"]

PRECISIONS = ("fp32", "bf16")


@dataclass(frozen=True)
class TrainConfig:
    """The recipe's hyper-parameters (defaults: the paper's code's, except its per-run learning rates).

    Attributes:
        epochs: full-batch steps.
        temperature: the paper's `-t`: the loss's `logit_scale`, which multiplies the cosines before the softmax.
        lr, weight_decay: Adam's.
        topk: the k values of the retrieval metrics.
        precision: `fp32`, or `bf16` for autocast of the model and the similarity products.
    """

    epochs: int = 150
    temperature: float = 1.0
    lr: float = 1e-3
    weight_decay: float = 0.0
    topk: tuple[int, ...] = (1, 3)
    precision: str = "fp32"

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.epochs < 1 or not self.topk or min(self.topk) < 1:
            raise ValueError("epochs and every k must be at least 1")

    def to_dict(self) -> dict:
        """Plain values (lists, not tuples), for JSON and for `torch.load(weights_only=True)`."""
        d = asdict(self)
        d["topk"] = list(self.topk)
        return d


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Adam | None:
    """Adam over the model's trainable parameters, or None for a model that has none (`dummy`)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        return None
    return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)


@torch.no_grad()
def evaluate(
    model: nn.Module, left: torch.Tensor, right: torch.Tensor, config: TrainConfig
) -> dict[str, torch.Tensor]:
    """Loss and retrieval metrics of `model` on pairs `(left[i], right[i])`, in fp32.

    Evaluation stays in fp32 whatever `config.precision`: bf16 rounding of the cosines would
    create ties, which count against the query, and the test product is small next to training.

    Returns:
        `{"Loss": ..., "top k": ..., ...}` as 0-d tensors on the data's device.
    """
    model.eval()
    sim = similarity_matrix(model(left), model(right))
    out = {"Loss": symmetric_cross_entropy(sim, config.temperature)}
    out.update(retrieval_metrics(sim, config.topk))
    return out


def _train_step(
    model: nn.Module,
    data: TrainData,
    config: TrainConfig,
    optimizer: torch.optim.Optimizer | None,
    workspace: Workspace,
) -> dict[str, torch.Tensor]:
    model.train()
    sets = data.train_sets
    device = data.train[0].device
    bf16 = config.precision == "bf16"
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    if optimizer is not None:
        optimizer.zero_grad(set_to_none=True)
    total = torch.zeros((), device=device)
    metrics: dict[str, torch.Tensor] = {}
    for i, (left, right) in enumerate(sets):
        with torch.set_grad_enabled(optimizer is not None):
            with autocast:
                out_left, out_right = model(left), model(right)
            # The cosine product (and its backward) in bf16 as autocast would run it; the loss in fp32.
            sim, loss = similarity_and_loss(
                out_left, out_right, config.temperature, torch.bfloat16 if bf16 else None, workspace
            )
            loss = loss / len(sets)
            # Backward per set frees each graph before the next set reuses the workspace.
            if optimizer is not None:
                loss.backward()
        total += loss.detach()
        if i == 0:
            # Read now: the next set overwrites `sim` in the workspace.
            scratch = workspace.get("ranks", tuple(sim.shape), torch.float32, device)
            metrics = retrieval_metrics(sim, config.topk, scratch)
    if optimizer is not None:
        optimizer.step()
    return {"Loss": total, **metrics}


def train(
    model: nn.Module,
    data: TrainData,
    config: TrainConfig,
    optimizer: torch.optim.Optimizer | None = None,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
) -> list[dict[str, float]]:
    """Run the recipe for `config.epochs` epochs; see the module docstring for what an epoch does.

    Args:
        model: an adaptation model on the data's device (see `adaptation.models.build_model`).
        data: the three sets, on one device (see `adaptation.split.split_data`).
        config: hyper-parameters.
        optimizer: from `make_optimizer(model, config)`; None trains nothing and evaluates once.
        on_epoch: called after every epoch with `(epoch, metrics)`, e.g. to write TensorBoard
            scalars or move a progress bar.

    Returns:
        One dict per epoch: `epoch` (1-based) and floats `Train/Loss`, `Train/top k`,
        `Train/left2right top k`, `Train/right2left top k`, `Train/MRR` (on the original
        training pairs), and the same under `Test/` (on the test pairs). Train/Loss is the
        mean over the training sets, the quantity minimised.
    """
    history: list[dict[str, float]] = []
    row: dict[str, float] = {}
    workspace = Workspace()  # the N x N training matrices, allocated once for the whole run
    for epoch in range(1, config.epochs + 1):
        if optimizer is not None or epoch == 1:
            tr = _train_step(model, data, config, optimizer, workspace)
            te = evaluate(model, *data.test, config)
            names = [f"Train/{k}" for k in tr] + [f"Test/{k}" for k in te]
            # One device-to-host transfer per epoch, not one per metric.
            values = torch.stack([v.float() for v in (*tr.values(), *te.values())]).tolist()
            row = dict(zip(names, values))
        history.append({"epoch": epoch, **row})
        if on_epoch is not None:
            on_epoch(epoch, dict(row))
    return history
