"""The epoch loop for the positive-pair objectives (`adaptation.objectives`: SimSiam, BYOL).

Each epoch:

1. The training pool is the original training pairs and their flipped copies, as one set of
   `(left, right)` rows (with no negatives, the contrastive recipe's per-set averaging changes
   nothing but the batch statistics). It is shuffled with a generator seeded once per run, and cut
   into minibatches of `batch_size` rows (default: the whole pool, one step per epoch). A last
   batch of a single row is skipped for that epoch: the predictor's BatchNorm needs two.
2. Per minibatch: the objective's loss, one Adam step, then `objective.after_step` (BYOL's target
   update). With `precision="bf16"` the forward runs under `torch.autocast(dtype=bfloat16)`.
3. The figures, all with the updated model, in fp32 and eval mode: `Train/Loss` is the
   objective's loss averaged over the epoch's rows; `Train/output std` the collapse monitor
   (`adaptation.objectives.output_std`) of the encoder's outputs on the original training pairs,
   both sides; `Train/top k` ... `Train/MRR` the retrieval figures on the original training pairs;
   and the `Test/` figures of `adaptation.training.evaluate`, exactly those of a contrastive run
   (`Test/Loss` is the contrastive loss at `config.temperature`, so the curves compare).

Example:
    >>> import torch
    >>> from adaptation.models import build_model
    >>> from adaptation.objectives import build_objective
    >>> from adaptation.planted import planted_pairs
    >>> from adaptation.split import split_indices, split_data
    >>> from adaptation.training import TrainConfig, make_optimizer
    >>> pairs = planted_pairs(n_pairs=64, dim=16, seed=0)
    >>> data = split_data(pairs, *split_indices(len(pairs), 0.25, seed=0))
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> objective = build_objective("byol", build_model("original", pairs.in_dim))
    >>> cfg = TrainConfig(epochs=2, temperature=15.0, topk=(1,))
    >>> history = train_positive(objective, data, cfg, make_optimizer(objective, cfg), batch_size=32, seed=0)
    >>> history[-1]["epoch"], "Train/output std" in history[-1]
    (2, True)
"""

from __future__ import annotations

from typing import Callable

import torch

from .objectives import BYOL, SimSiam, output_std
from .split import TrainData
from .training import TrainConfig, evaluate

__all__ = ["OUTPUT_STD", "minibatches", "steps_per_epoch", "train_positive"]

OUTPUT_STD = "Train/output std"
"""The collapse monitor's metric name (TensorBoard tag and history key)."""


def minibatches(n: int, batch_size: int | None, generator: torch.Generator) -> list[torch.Tensor]:
    """Row indices of one epoch's minibatches: a shuffle of `range(n)` cut into `batch_size` pieces.

    `batch_size` None (or >= n) gives one batch of all rows, unshuffled. A last piece of one row
    is dropped (BatchNorm needs two rows).
    """
    if batch_size is None or batch_size >= n:
        return [torch.arange(n)]
    batches = list(torch.randperm(n, generator=generator).split(batch_size))
    if len(batches[-1]) < 2:
        batches.pop()
    return batches


def steps_per_epoch(n: int, batch_size: int | None) -> int:
    """How many optimiser steps `minibatches` makes per epoch for `n` rows."""
    if batch_size is None or batch_size >= n:
        return 1
    full, rest = divmod(n, batch_size)
    return full + (1 if rest >= 2 else 0)


def _pool(data: TrainData) -> tuple[torch.Tensor, torch.Tensor]:
    sets = data.train_sets
    return torch.cat([s[0] for s in sets]), torch.cat([s[1] for s in sets])


def train_positive(
    objective: SimSiam | BYOL,
    data: TrainData,
    config: TrainConfig,
    optimizer: torch.optim.Optimizer,
    *,
    batch_size: int | None = None,
    seed: int = 0,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
) -> list[dict[str, float]]:
    """Train `objective` (its encoder and predictor) for `config.epochs` epochs; see the module docstring.

    Args:
        objective: from `adaptation.objectives.build_objective`, on the data's device.
        data: the three sets (see `adaptation.split.split_data`).
        config: epochs, temperature (for the test loss), lr, topk, precision.
        optimizer: from `make_optimizer(objective, config)`: the encoder's and predictor's parameters.
        batch_size: rows per minibatch; None for the whole pool.
        seed: seeds the per-epoch shuffles.
        on_epoch: called after every epoch with `(epoch, metrics)`.

    Returns:
        One dict per epoch: `epoch` and the floats `Train/Loss`, `Train/output std`, the train
        retrieval figures and the `Test/` figures of a contrastive run.
    """
    left, right = _pool(data)
    n = len(left)
    device = left.device
    generator = torch.Generator().manual_seed(seed)
    total_steps = config.epochs * steps_per_epoch(n, batch_size)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.precision == "bf16")
    history: list[dict[str, float]] = []
    step = 0
    for epoch in range(1, config.epochs + 1):
        objective.train()
        loss_sum, rows = torch.zeros((), device=device), 0
        for idx in minibatches(n, batch_size, generator):
            idx = idx.to(device)
            optimizer.zero_grad(set_to_none=True)
            with autocast:
                loss, _ = objective(left[idx], right[idx])
            loss.float().backward()
            optimizer.step()
            step += 1
            objective.after_step(step, total_steps)
            loss_sum += loss.detach().float() * len(idx)
            rows += len(idx)
        encoder = objective.encoder
        tr = evaluate(encoder, *data.train, config)
        with torch.no_grad():
            tr[OUTPUT_STD.removeprefix("Train/")] = output_std(torch.cat([encoder(data.train[0]), encoder(data.train[1])]))
        tr["Loss"] = loss_sum / max(rows, 1)
        te = evaluate(encoder, *data.test, config)
        names = [f"Train/{k}" for k in tr] + [f"Test/{k}" for k in te]
        values = torch.stack([v.float() for v in (*tr.values(), *te.values())]).tolist()
        row = {"epoch": epoch, **dict(zip(names, values))}
        history.append(row)
        if on_epoch is not None:
            on_epoch(epoch, {k: v for k, v in row.items() if k != "epoch"})
    return history

