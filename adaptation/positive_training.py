"""The epoch loop for the positive-pair objectives (`adaptation.objectives`: SimSiam, BYOL).

The batches are the contrastive recipe's (`adaptation.training.epoch_batches`): with the default
`config.batch_size=None` one step per epoch over the whole training set; with a smaller B each
training set (the original pairs, then their flipped copies, never mixed) is shuffled each epoch,
seeded by `config.seed`, the epoch and the set, and cut into batches of B, step s taking batch s of
each set. Per step:

1. For each set's batch, the objective's loss (its mean over the step's sets is the step's loss),
   backpropagated. With `precision="bf16"` the forward runs under `torch.autocast(dtype=bfloat16)`.
   A batch of a single row is left out (the predictor's BatchNorm needs two).
2. One Adam step, then `objective.after_step` (BYOL's target update).

After each epoch, with the updated model, in fp32 and eval mode:

- `Train/Loss`: the objective's loss, averaged over the epoch's steps weighted by their number of
  original pairs (as the contrastive loop weights its minibatches);
- `Train/output std`: the collapse monitor (`adaptation.objectives.output_std`) of the encoder's
  outputs on the original training pairs, both sides;
- `Train/top k` ... `Train/MRR`: the retrieval figures on the original training pairs;
- the `Test/` figures, computed as a contrastive run computes them (`Test/Loss` is the contrastive
  loss at `config.temperature`), so the curves and summaries compare directly.

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

from toolkit.distributed import Ranks
from toolkit.utils import UserError

from .distributed import average_gradients, gather_rows
from .objectives import BYOL, SimSiam, output_std
from .split import TrainData
from .training import TrainConfig, epoch_batches, evaluate

__all__ = ["OUTPUT_STD", "train_positive"]

OUTPUT_STD = "Train/output std"
"""The collapse monitor's metric name (TensorBoard tag and history key)."""


def _step(objective: SimSiam | BYOL, sets, step, config: TrainConfig, optimizer,
          dist: Ranks) -> tuple[torch.Tensor, int] | None:
    """One optimiser step over the sets' batches; (loss, originals in the batch), or None when no batch was usable.

    Under torchrun each rank encodes its share of each global batch; the objective gathers the
    shares (`gather_rows`) so that every rank computes the global batch's loss, and the ranks'
    gradients are averaged before the step, so every rank takes the one process's step.
    """
    batches = []
    for i, idx in enumerate(step):
        if idx is False:  # this set has no batch left this epoch
            continue
        left, right = sets[i]
        n = len(left) if idx is None else len(idx)
        if n < 2:  # the predictor's BatchNorm needs two rows (the same verdict on every rank)
            continue
        share = dist.shard(n)
        rows = torch.arange(share.start, share.stop) if idx is None else torch.as_tensor(idx[share.start:share.stop])
        if idx is not None or dist.distributed:
            rows = rows.to(left.device)
            left, right = left.index_select(0, rows), right.index_select(0, rows)
        batches.append((i, left, right, n))
    if not batches:
        return None
    device = batches[0][1].device
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.precision == "bf16")
    optimizer.zero_grad(set_to_none=True)
    total = torch.zeros((), device=device)
    for _, left, right, n in batches:
        gather = (lambda x, n=n: gather_rows(x, dist, n)) if dist.distributed else None
        with autocast:
            loss, _ = objective(left, right, gather)
        loss = loss.float() / len(batches)
        loss.backward()
        total += loss.detach()
    if dist.distributed:
        average_gradients(objective, dist)
    optimizer.step()
    n_orig = next((n for i, _, _, n in batches if i == 0), 0)
    return total, n_orig


def train_positive(
    objective: SimSiam | BYOL,
    data: TrainData,
    config: TrainConfig,
    optimizer: torch.optim.Optimizer,
    on_epoch: Callable[[int, dict[str, float]], bool | None] | None = None,
    dist: Ranks = Ranks(),
) -> list[dict[str, float]]:
    """Train `objective` (its encoder and predictor) for `config.epochs` epochs; see the module docstring.

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
    sets = data.train_sets
    sizes = [len(s[0]) for s in sets]
    total_steps = config.epochs * len(epoch_batches(sizes, config.batch_size, config.seed, 1))
    encoder = objective.encoder
    history: list[dict[str, float]] = []
    done = 0
    for epoch in range(1, config.epochs + 1):
        objective.train()
        loss_sum, weight = torch.zeros((), dtype=torch.float64, device=sets[0][0].device), 0
        for step in epoch_batches(sizes, config.batch_size, config.seed, epoch):
            out = _step(objective, sets, step, config, optimizer, dist)
            if out is None:
                continue
            done += 1
            objective.after_step(done, total_steps)
            loss, n_orig = out
            loss_sum += loss.double() * max(n_orig, 1)
            weight += max(n_orig, 1)
        if done == 0:  # never saved as a finished run (`adaptation.experiment.check_objective` refuses this before)
            raise UserError(f"epoch {epoch} made no optimiser step: every batch had fewer than 2 pairs; "
                            f"use a batch_size of 2 or more")
        tr = evaluate(encoder, *data.train, config, dist)  # in eval mode, fp32
        tr["Loss"] = (loss_sum / max(weight, 1)).float()
        with torch.no_grad():
            tr[OUTPUT_STD.removeprefix("Train/")] = output_std(torch.cat([encoder(data.train[0]), encoder(data.train[1])]))
        te = evaluate(encoder, *data.test, config, dist)
        va = evaluate(encoder, *data.val, config, dist) if data.val is not None else {}
        names = [f"Train/{k}" for k in tr] + [f"Test/{k}" for k in te] + [f"Val/{k}" for k in va]
        values = torch.stack([v.float() for v in (*tr.values(), *te.values(), *va.values())]).tolist()
        row = dict(zip(names, values))
        history.append({"epoch": epoch, **row})
        if on_epoch is not None and on_epoch(epoch, dict(row)):
            break
    return history
