"""The positive-pair objectives (`adaptation.objectives`: SimSiam, BYOL) as a `BatchLoss` of the one epoch loop.

`adaptation.training.train` runs them as it runs the contrastive loss, with the same batches
(`adaptation.training.epoch_batches`: with the default `config.batch_size=None` one step per epoch
over the whole training set; with a smaller B each training set, the original pairs then their
flipped copies, never mixed, shuffled each epoch, seeded by `config.seed`, the epoch and the set,
and cut into batches of B, step s taking batch s of each set) and the same gradient sync under
torchrun (DistributedDataParallel). What `PositivePairLoss` changes in the loop:

- each batch's loss is the objective's (its mean over the step's sets is the step's loss); with
  `precision="bf16"` the objective's forward runs under `torch.autocast(dtype=bfloat16)`. Under
  torchrun each rank encodes its share of the global batch and the objective gathers the shares
  with gradient (`adaptation.distributed.gather_rows`), so every rank computes the global batch's loss
  and its predictor's BatchNorm sees the global batch;
- a batch of a single row is left out (`min_rows`: the predictor's BatchNorm needs two);
- after each optimiser step, `objective.after_step` (BYOL's target update);
- the figures describe the encoder (the adaptation model), after each epoch, in fp32 and eval mode:
  `Train/Loss` is the objective's, averaged over the epoch's steps weighted by their number of
  original pairs (as the contrastive loop weights its minibatches); `Train/output std` is the
  collapse monitor (`adaptation.objectives.output_std`) of the encoder's outputs on the original
  training pairs, both sides; `Train/top k` ... `Train/MRR` are the retrieval figures on those
  pairs; the `Test/` figures are computed as a contrastive run computes them (`Test/Loss` is the
  contrastive loss at `config.temperature`), so the curves and summaries compare directly.

Example:
    >>> import torch
    >>> from adaptation.models import build_model
    >>> from adaptation.objectives import build_objective
    >>> from synthetic.planted import planted_pairs
    >>> from adaptation.split import split_indices, split_data
    >>> from adaptation.training import TrainConfig, make_optimizer
    >>> pairs = planted_pairs(n_pairs=64, dim=16, seed=0)
    >>> data = split_data(pairs, *split_indices(len(pairs), 0.25, seed=0))
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> objective = build_objective("byol", build_model("original", pairs.in_dim))
    >>> cfg = TrainConfig(epochs=2, temperature=15.0, topk=(1,), batch_size=16)
    >>> history = train_positive(objective, data, cfg, make_optimizer(objective, cfg))
    >>> history[-1]["epoch"], "Train/output std" in history[-1]
    (2, True)
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from toolkit.distributed import Ranks

from .distributed import gather_rows
from .objectives import BYOL, SimSiam, output_std
from .split import TrainData
from .training import BatchContext, BatchLoss, BatchOutput, TrainConfig, evaluate, train

__all__ = ["OUTPUT_STD", "PositivePairLoss", "train_positive"]

OUTPUT_STD = "Train/output std"
"""The collapse monitor's metric name (TensorBoard tag and history key)."""


class PositivePairLoss(BatchLoss):
    """SimSiam's or BYOL's loss (the objective `train` is given) as a `BatchLoss`; see the module docstring."""

    min_rows = 2  # the predictor's BatchNorm

    def __call__(self, model: nn.Module, left: torch.Tensor, right: torch.Tensor, ctx: BatchContext) -> BatchOutput:
        gather = (lambda x: gather_rows(x, ctx.dist, ctx.n)) if ctx.dist.distributed else None
        with torch.autocast(left.device.type, dtype=torch.bfloat16, enabled=ctx.config.precision == "bf16"):
            loss, _ = model(left, right, gather)
        return BatchOutput(loss.float())

    def evaluated(self, model: SimSiam | BYOL) -> nn.Module:
        return model.encoder

    def after_step(self, model: SimSiam | BYOL, step: int, total_steps: int) -> None:
        model.after_step(step, total_steps)

    def train_figures(self, model: nn.Module, data: TrainData, config: TrainConfig,
                      dist: Ranks) -> dict[str, torch.Tensor]:
        figures = evaluate(model, *data.train, config, dist)  # in eval mode, fp32
        with torch.no_grad():
            figures[OUTPUT_STD.removeprefix("Train/")] = output_std(torch.cat([model(data.train[0]),
                                                                               model(data.train[1])]))
        return figures


def train_positive(
    objective: SimSiam | BYOL,
    data: TrainData,
    config: TrainConfig,
    optimizer: torch.optim.Optimizer,
    on_epoch: Callable[[int, dict[str, float]], bool | None] | None = None,
    dist: Ranks = Ranks(),
) -> list[dict[str, float]]:
    """Train `objective` (its encoder and predictor) for `config.epochs` epochs: `adaptation.training.train`
    with `PositivePairLoss`.

    Args:
        objective: from `adaptation.objectives.build_objective`, on the data's device.
        data: the three sets (see `adaptation.split.split_data`).
        config: epochs, batch_size and seed (the batches), temperature (the test loss), lr, topk, precision.
        optimizer: from `make_optimizer(objective, config)`: the encoder's and the predictor's parameters.
        on_epoch: called after every epoch with `(epoch, metrics)`; returning True stops training there.
        dist: under torchrun, this process's place in the group (joined); every rank takes the same steps.

    Returns:
        One dict per epoch: `epoch` and the floats `Train/Loss`, `Train/output std`, the train
        retrieval figures, and the `Test/` (and, with validation pairs, `Val/`) figures of a
        contrastive run. Fewer than `config.epochs` rows when `on_epoch` stopped it.
    """
    return train(objective, data, config, optimizer, on_epoch=on_epoch, dist=dist, batch_loss=PositivePairLoss())
