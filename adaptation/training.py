"""The training recipe: Adam on the contrastive loss, full batch or minibatches, evaluated every epoch.

With the default `batch_size=None` each epoch is one full-batch step, the paper's recipe:

1. For each training set (the original training pairs, then their flipped copies), compute
   the adapted vectors, the N x N cosine matrix and the contrastive loss; backpropagate half
   of it (the objective is the mean over the sets). With `precision="bf16"` the model and the
   similarity product run under `torch.autocast(dtype=bfloat16)`; the loss is taken in fp32.
   The cosine matrix, its exponentials and its gradient are written into N x N tensors
   allocated once per run (`adaptation.fused.Workspace`), not once per set and epoch.
2. One Adam step.
3. Read the train metrics off the originals' similarity matrix from step 1, which the loss
   already paid for (so they describe the model *before* this epoch's step, as the paper's code's
   train loss did), and evaluate the test originals with the updated model, in fp32; the
   validation pairs too when the data has some (`Val/...`, for model selection).

With `batch_size=B` smaller than a training set, each epoch shuffles each set (seeded by
`config.seed` and the epoch) and cuts it into batches of B; step s takes batch s of each set
(the originals and the flipped copies, never mixed), so in-batch negatives replace the
full set's, and makes one Adam step. The train figures are then the in-batch ones, averaged over
the epoch's batches weighted by their size; memory is O(B x B) instead of O(N x N).

The per-batch objective is a seam: `train(..., batch_loss=...)` takes a `BatchLoss`, or any
function `(model, left, right, ctx) -> BatchOutput`; `contrastive_batch_loss` is the paper's, and
`adaptation.positive_training.PositivePairLoss` runs SimSiam and BYOL in this same loop.

Under `torchrun` (`dist` with several ranks) each rank takes its share of every global batch and
the adapted vectors are gathered with gradient (`adaptation.distributed`); DistributedDataParallel
averages the ranks' gradients (the one gradient sync), so the parameters stay those of one process
at the same global batch. Test figures come from
`adaptation.evaluation.evaluate_vectors`, which never holds an N x N matrix beyond its block
budget.

Nothing leaves the device inside an epoch except one small vector of metric values. A model
without parameters (`dummy`) is evaluated once and its figures repeated for every epoch, so
its flat curves can sit beside the others in TensorBoard.

Example:
    >>> import torch
    >>> from adaptation.models import build_model
    >>> from synthetic.planted import planted_pairs
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

import contextlib
import itertools
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .split import TrainData
from .fused import FUSED_MAX_SCALE, Workspace, row_block_loss, similarity_and_loss
from toolkit.checks import Check, check_fields
from toolkit.distributed import Ranks
from toolkit.utils import UserError

from .distributed import all_reduce_sum, gather_rows
from .evaluation import block_rows_for, evaluate_vectors, unit_rows
from .losses import EPS
from .metrics import block_partner_ranks, column_counts, metric_names, metrics_from_ranks, partner_ranks

__all__ = ["PRECISIONS", "AT_LEAST_1", "POSITIVE", "ZERO_OR_MORE", "SEED", "TrainConfig", "BatchContext", "BatchOutput", "BatchLoss", "contrastive_batch_loss",
           "make_optimizer", "evaluate", "epoch_batches", "train", "step_bytes", "largest_fitting_batch"]

PRECISIONS = ("fp32", "bf16")


AT_LEAST_1 = Check(int, "at least 1", lambda v: v >= 1)
"""epochs, every k, a batch size (and, in an experiment, runs and patience)."""
POSITIVE = Check(float, "a positive number", lambda v: v > 0)
ZERO_OR_MORE = Check(float, "zero or more", lambda v: v >= 0)
SEED = Check(int, "between 0 and 2**32-1", lambda v: 0 <= v < 2**32)


@dataclass(frozen=True)
class TrainConfig:
    """The recipe's hyper-parameters (defaults: the paper's code's, except its per-run learning rates).

    Each field's default and rule are written here once: train.py's flags take them from these
    fields (`toolkit.checks`). A bad value is a `ValueError`.

    Attributes:
        epochs: passes over the training sets.
        temperature: the paper's `-t`: the loss's `logit_scale`, which multiplies the cosines before the softmax.
        lr, weight_decay: Adam's.
        topk: the k values of the retrieval metrics (repeats dropped, order kept).
        precision: `fp32`, or `bf16` for autocast of the model and the similarity products.
        batch_size: pairs per step (the global batch under torchrun); None: the whole set, one step per epoch.
        seed: seeds each epoch's shuffle (used only with a `batch_size` smaller than a set); in an
            experiment, the experiment's seed (`adaptation.experiment.ExperimentConfig.seed`).
    """

    epochs: int = field(default=150, metadata={"check": AT_LEAST_1})
    temperature: float = field(default=1.0, metadata={"check": POSITIVE})
    lr: float = field(default=1e-3, metadata={"check": POSITIVE})
    weight_decay: float = field(default=0.0, metadata={"check": ZERO_OR_MORE})
    topk: tuple[int, ...] = field(default=(1, 3), metadata={"check": AT_LEAST_1})
    precision: str = "fp32"
    batch_size: int | None = field(default=None, metadata={"check": AT_LEAST_1})
    seed: int = field(default=0, metadata={"check": SEED})

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        check_fields(self)
        object.__setattr__(self, "topk", tuple(dict.fromkeys(self.topk)))  # frozen: set once, here

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
    model: nn.Module, left: torch.Tensor, right: torch.Tensor, config: TrainConfig,
    dist: Ranks = Ranks(), block_rows: int | None = None,
) -> dict[str, torch.Tensor]:
    """Loss and retrieval metrics of `model` on pairs `(left[i], right[i])`, in fp32.

    Evaluation stays in fp32 whatever `config.precision`: bf16 rounding of the cosines would
    create ties, which count against the query. The similarities are scored in blocks of queries
    (`adaptation.evaluation.evaluate_vectors`), shared among the ranks under torchrun.

    Returns:
        `{"Loss": ..., "top k": ..., ...}` as 0-d tensors on the data's device.
    """
    model.eval()
    rows = block_rows or block_rows_for(left.shape[0])
    if rows >= left.shape[0] and not dist.distributed:  # one matrix: the whole outputs are no larger
        return evaluate_vectors(model(left), model(right), config.temperature, config.topk, rows, dist)
    # Scored in blocks: adapt and normalise in blocks too, so the outputs are held once (memory at scale).
    return evaluate_vectors(unit_rows(model, left, rows), unit_rows(model, right, rows), config.temperature,
                            config.topk, rows, dist, normalized=True)


@dataclass
class BatchContext:
    """What a per-batch objective may need beside the model and the batch.

    Attributes:
        config: the recipe.
        n: the global batch size (this rank holds rows `dist.shard(n)` of it).
        dist: the data-parallel group (`Ranks()` for one process).
        workspace: scratch matrices kept between steps (`adaptation.fused.Workspace`).
        want_ranks: whether the caller reads train metrics from this batch.
    """

    config: TrainConfig
    n: int
    dist: Ranks = field(default_factory=Ranks)
    workspace: Workspace = field(default_factory=Workspace)
    want_ranks: bool = False


@dataclass
class BatchOutput:
    """A per-batch objective's result.

    Attributes:
        loss: 0-d; its mean over ranks is the batch's loss, and its backward (with the ranks'
            gradients averaged, as DDP does) gives that loss's gradient.
        ranks: `(l2r, r2l)` partner ranks of this rank's rows within the global batch, or None
            (an objective without a similarity matrix has no train retrieval figures).
    """

    loss: torch.Tensor
    ranks: tuple[torch.Tensor, torch.Tensor] | None = None


class BatchLoss:
    """A per-batch objective of the one epoch loop (`train`): the seam another objective plugs into.

    Calling it, `(model, left rows, right rows, ctx) -> BatchOutput`, is the objective; `model`
    is what `train` was given (wrapped in DistributedDataParallel under torchrun, the one gradient
    sync). The other members say how the loop treats the objective; their defaults are the
    contrastive loss's. A plain function with that signature is a `BatchLoss` with the defaults
    (`contrastive_batch_loss` is one). The positive-pair objectives
    (`adaptation.positive_training.PositivePairLoss`) use every member.

    Attributes:
        min_rows: a set's global batch of fewer rows is left out of its step (a BatchNorm needs 2);
            an epoch left with no step is a `UserError`.
    """

    min_rows: int = 1

    def __call__(self, model: nn.Module, left: torch.Tensor, right: torch.Tensor, ctx: BatchContext) -> BatchOutput:
        raise NotImplementedError

    def evaluated(self, model: nn.Module) -> nn.Module:
        """The module whose outputs are the adapted vectors: what the test figures describe."""
        return model

    def after_step(self, model: nn.Module, step: int, total_steps: int) -> None:
        """Called after optimiser step `step` (1-based, counted over the run) of about `total_steps`."""

    def train_figures(self, model: nn.Module, data: TrainData, config: TrainConfig,
                      dist: Ranks) -> dict[str, torch.Tensor] | None:
        """Train figures measured after the epoch on `evaluated(model)`, beside the steps' mean loss;
        None: the steps' in-batch figures (read off `BatchOutput.ranks`)."""
        return None


class _PlainLoss(BatchLoss):
    """A plain function `(model, left, right, ctx) -> BatchOutput` as a `BatchLoss` with the defaults."""

    def __init__(self, fn: Callable[[nn.Module, torch.Tensor, torch.Tensor, BatchContext], BatchOutput]):
        self.fn = fn

    def __call__(self, model, left, right, ctx) -> BatchOutput:
        return self.fn(model, left, right, ctx)


def _forward_pair(model: nn.Module, left: torch.Tensor, right: torch.Tensor, ctx: BatchContext):
    device = left.device
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=ctx.config.precision == "bf16"):
        if ctx.dist.distributed:
            # One forward for both sides: DDP expects one forward per backward.
            out = model(torch.cat([left, right]))
            return out[: len(left)], out[len(left):]
        return model(left), model(right)


def contrastive_batch_loss(model: nn.Module, left: torch.Tensor, right: torch.Tensor, ctx: BatchContext) -> BatchOutput:
    """The paper's symmetric contrastive loss over one (global) batch, in-batch negatives.

    One process: the fused square computation (`adaptation.fused.similarity_and_loss`), exactly
    the full-batch recipe's when the batch is the whole set. Several ranks: this rank's rows of
    the global cosine matrix, its left vectors against every right vector gathered with gradient
    (open_clip's `local_loss` with `gather_with_grad`); the columns' log-sum-exps come from sums
    reduced over the ranks (`adaptation.fused.row_block_loss`), so no rank scores the other
    direction's rows again. The loss is scaled so that the ranks' mean is the global batch's.
    """
    cfg, dist = ctx.config, ctx.dist
    bf16 = cfg.precision == "bf16"
    out_left, out_right = _forward_pair(model, left, right, ctx)
    if not dist.distributed:
        sim, loss = similarity_and_loss(out_left, out_right, cfg.temperature, torch.bfloat16 if bf16 else None,
                                        ctx.workspace)
        ranks = None
        if ctx.want_ranks:
            # Read now: the next set of the same size overwrites `sim` in the workspace.
            ranks = partner_ranks(sim, ctx.workspace.get("ranks", tuple(sim.shape), torch.float32, sim.device))
        return BatchOutput(loss, ranks)
    with torch.autocast(left.device.type, enabled=False):
        a = F.normalize(out_left.float(), dim=1, eps=EPS)
        b = F.normalize(out_right.float(), dim=1, eps=EPS)
        product = torch.bfloat16 if bf16 else torch.float32
        share = dist.shard(ctx.n)
        start, stop = share.start, share.stop
        # This rank's rows of the global cosine matrix: its left vectors against every right one.
        sim = a.to(product) @ gather_rows(b, dist, ctx.n).to(product).T
        if abs(cfg.temperature) <= FUSED_MAX_SCALE:
            loss = row_block_loss(sim, start, ctx.n, cfg.temperature, dist.world_size,
                                  lambda x: all_reduce_sum(x, dist), ctx.workspace)
        else:  # the plain definition, outside the shifted exponentials' range: both directions' rows
            labels = torch.arange(start, stop, device=left.device)
            r2l_sim = (b.to(product) @ gather_rows(a, dist, ctx.n).to(product).T).float()
            ce = (F.cross_entropy(sim.float() * cfg.temperature, labels, reduction="sum")
                  + F.cross_entropy(r2l_sim * cfg.temperature, labels, reduction="sum"))
            loss = ce * (0.5 * dist.world_size / ctx.n)
    ranks = _row_block_ranks(sim.detach(), start, ctx, dist) if ctx.want_ranks else None
    return BatchOutput(loss, ranks)


def _row_block_ranks(sim: torch.Tensor, start: int, ctx: BatchContext, dist: Ranks) -> tuple[torch.Tensor, torch.Tensor]:
    """Both directions' partner ranks of this rank's pairs, from its rows of the global cosine matrix.

    Left to right is along this rank's rows. Right to left is down a column, over every rank's
    rows: each rank counts its rows against the column's partner and the counts are summed
    over the ranks, so the ranks are those `partner_ranks` gives on the whole matrix.
    """
    m, n = sim.shape
    labels = torch.arange(start, start + m, device=sim.device)
    l2r = block_partner_ranks(sim, labels, n)
    partner = torch.zeros(n, dtype=torch.float32, device=sim.device)
    partner[start:start + m] = sim.diagonal(offset=start).float()
    partner = all_reduce_sum(partner, dist)  # every column's partner cosine (a NaN stays where it was)
    scratch = ctx.workspace.get("ranks", (m, n), torch.float32, sim.device)
    counts = all_reduce_sum(column_counts(sim, partner, scratch), dist)[start:start + m].long()
    r2l = torch.where(torch.isnan(partner[start:start + m]), torch.full_like(counts, n), counts)
    return l2r, r2l


def epoch_batches(sizes: list[int], batch_size: int | None, seed: int, epoch: int) -> list[list[np.ndarray | None]]:
    """The global batches of one epoch: for each step, one index array per training set (None: the whole set).

    Each set too large for one batch is shuffled with a generator seeded by `(seed, epoch, set)`
    and cut into batches of `batch_size` (the last one smaller); step s takes batch s of each set.
    A set with fewer batches than another sits out the remaining steps.
    """
    per_set: list[list[np.ndarray | None]] = []
    for i, n in enumerate(sizes):
        if batch_size is None or batch_size >= n:
            per_set.append([None])
        else:
            perm = np.random.default_rng([seed, epoch, i]).permutation(n)
            per_set.append([perm[s:s + batch_size] for s in range(0, n, batch_size)])
    return [list(step) for step in itertools.zip_longest(*per_set, fillvalue=False)]


def _train_figures(parts: list, names: list[str], dist: Ranks) -> dict[str, torch.Tensor]:
    """An epoch's training figures (`Loss` and, when the steps measured them, the metrics) from its steps'
    `(loss, n_originals, metrics)`, as tensors."""
    if len(parts) == 1 and not dist.distributed:
        # The full batch: the figures as they are (no weighting to round).
        loss, _, means = parts[0]
        return {"Loss": loss, **(means or {})}
    n_total = max(sum(n for _, n, _ in parts), 1)
    # Size-weighted sums over the steps (and ranks), one collective per epoch.
    has_metrics = any(m is not None for _, _, m in parts)
    # A step without originals (a set with more batches than they have, or their batch left out) weighs 0.
    sums = torch.stack([torch.stack([loss * n] + ([m[k] * n if m else loss * 0 for k in names]
                                                  if has_metrics else []))
                        for loss, n, m in parts]).sum(0).double()
    sums = all_reduce_sum(sums, dist) / n_total
    sums[0] /= dist.world_size  # each rank's loss is its share times world_size (or, gathered, the batch's)
    return dict(zip(["Loss"] + (names if has_metrics else []), sums.float()))


class _Loop:
    """One run of the epoch loop: the model (wrapped in DistributedDataParallel under torchrun), its sets, the objective."""

    def __init__(self, model: nn.Module, data: TrainData, config: TrainConfig, optimizer: torch.optim.Optimizer | None,
                 dist: Ranks, loss: BatchLoss):
        self.model, self.data, self.config, self.optimizer, self.dist, self.loss = model, data, config, optimizer, dist, loss
        self.sets = data.train_sets
        self.sizes = [len(s[0]) for s in self.sets]
        device = self.sets[0][0].device
        self.ddp = None
        if dist.distributed and optimizer is not None:
            from torch.nn.parallel import DistributedDataParallel

            # The one gradient sync: the ranks' gradients averaged in backward.
            self.ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        self.workspace = Workspace()  # the training matrices, allocated once per size
        self.names = metric_names(config.topk)
        self.steps_done = 0
        self.total_steps = config.epochs * len(epoch_batches(self.sizes, config.batch_size, config.seed, 1))

    def epoch(self, epoch: int) -> dict[str, float]:
        """Train one epoch, then measure; returns the epoch's figures (`Train/...`, `Test/...`, `Val/...`)."""
        config, dist, data = self.config, self.dist, self.data
        self.model.train()
        steps = epoch_batches(self.sizes, config.batch_size, config.seed, epoch)
        parts = [part for part in map(self._step, steps) if part is not None]
        if not parts:  # never saved as a finished run (`adaptation.experiment.check_objective` refuses this before)
            raise UserError(f"epoch {epoch} made no optimiser step: every batch had fewer than {self.loss.min_rows} "
                            f"pairs; use a batch_size of {self.loss.min_rows} or more")
        tr = _train_figures(parts, self.names, dist)
        del parts
        evaluated = self.loss.evaluated(self.model)
        tr = {**(self.loss.train_figures(evaluated, data, config, dist) or {}), **tr}
        if block_rows_for(len(data.test[0])) < len(data.test[0]):
            # A test set scored in blocks is a large one: let the B x B training matrices go first, so
            # they and the evaluation's blocks are not held at once (re-made once per epoch).
            self.workspace = Workspace()
        te = evaluate(evaluated, *data.test, config, dist)
        va = evaluate(evaluated, *data.val, config, dist) if data.val is not None else {}
        keys = [f"Train/{k}" for k in tr] + [f"Test/{k}" for k in te] + [f"Val/{k}" for k in va]
        # One device-to-host transfer per epoch, not one per metric.
        values = torch.stack([v.float() for v in (*tr.values(), *te.values(), *va.values())]).tolist()
        return dict(zip(keys, values))

    def _step(self, step: list) -> tuple[torch.Tensor, int, dict | None] | None:
        """One optimiser step over the sets' batches: (loss on this rank, originals batch size, metrics means or
        None); None when every batch was left out (fewer rows than `min_rows`, the same verdict on every rank)."""
        config, optimizer = self.config, self.optimizer
        batches = [(i, idx, len(self.sets[i][0]) if idx is None else len(idx)) for i, idx in enumerate(step)
                   if idx is not False]
        batches = [(i, idx, n) for i, idx, n in batches if n >= self.loss.min_rows]
        if not batches:
            return None
        total = torch.zeros((), device=self.sets[0][0].device)
        n_orig, metrics = 0, None
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
        for j, (i, idx, n) in enumerate(batches):
            left, right = self._rows(i, idx, n)
            ctx = BatchContext(config, n, self.dist, self.workspace, want_ranks=(i == 0))
            sync = contextlib.nullcontext() if self.ddp is None or j == len(batches) - 1 else self.ddp.no_sync()
            with sync, torch.set_grad_enabled(optimizer is not None):
                out = self.loss(self.ddp if self.ddp is not None else self.model, left, right, ctx)
                loss = out.loss / len(batches)
                # Backward per set frees each graph before the next set reuses the workspace.
                if optimizer is not None:
                    loss.backward()
            total += loss.detach()
            if i == 0:
                n_orig, metrics = n, self._metrics(out.ranks, n, total.device)
        if optimizer is not None:
            optimizer.step()
            self.steps_done += 1
            self.loss.after_step(self.model, self.steps_done, self.total_steps)
        return total, n_orig, metrics

    def _rows(self, i: int, idx: np.ndarray | None, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's share of set i's batch (`idx`; None: the whole set) of `n` rows."""
        left, right = self.sets[i]
        share = self.dist.shard(n)
        if idx is None:
            return (left, right) if not self.dist.distributed else (left[share.start:share.stop],
                                                                    right[share.start:share.stop])
        rows = torch.as_tensor(idx[share.start:share.stop], device=left.device)
        return left.index_select(0, rows), right.index_select(0, rows)

    def _metrics(self, ranks, n: int, device: torch.device) -> dict[str, torch.Tensor] | None:
        """The originals' in-batch metrics from the objective's partner ranks (None: it has none)."""
        if ranks is None:
            return None
        share = self.dist.shard(n)
        if share.stop <= share.start:  # this rank holds none of a batch smaller than the group
            return {k: torch.zeros((), device=device) for k in self.names}
        metrics = metrics_from_ranks(*ranks, self.config.topk)
        if self.dist.distributed:  # this rank's share of the counts, summed over ranks at the epoch's end
            metrics = {k: v * (share.stop - share.start) / n for k, v in metrics.items()}
        return metrics


def train(
    model: nn.Module,
    data: TrainData,
    config: TrainConfig,
    optimizer: torch.optim.Optimizer | None = None,
    on_epoch: Callable[[int, dict[str, float]], bool | None] | None = None,
    dist: Ranks = Ranks(),
    batch_loss: BatchLoss | Callable[..., BatchOutput] = contrastive_batch_loss,
) -> list[dict[str, float]]:
    """Run the recipe for `config.epochs` epochs; see the module docstring for what an epoch does.

    Args:
        model: an adaptation model on the data's device (see `adaptation.models.build_model`), or
            what `batch_loss` trains (a positive-pair objective around one).
        data: the three sets, on one device (see `adaptation.split.split_data`).
        config: hyper-parameters.
        optimizer: from `make_optimizer(model, config)`; None trains nothing and evaluates once.
        on_epoch: called after every epoch with `(epoch, metrics)`, e.g. to write TensorBoard
            scalars or move a progress bar; returning True stops training there (early stopping).
        dist: under torchrun, this process's place in the group (its process group already
            initialised); the model is then wrapped in DistributedDataParallel here.
        batch_loss: the per-batch objective (`BatchLoss`, or a plain function; default: the paper's
            contrastive loss).

    Returns:
        One dict per epoch: `epoch` (1-based) and floats `Train/Loss`, `Train/top k`,
        `Train/left2right top k`, `Train/right2left top k`, `Train/MRR` (on the original
        training pairs: the whole set at full batch, in-batch figures averaged over the epoch
        otherwise; or those `batch_loss.train_figures` measures), and the same under `Test/` (on
        the test pairs) and, when `data.val` is set, `Val/` (on the validation pairs). Train/Loss
        is the mean over the training sets, the quantity minimised. Every rank gets the same
        figures. Fewer than `config.epochs` rows when `on_epoch` stopped it.
    """
    loop = _Loop(model, data, config, optimizer, dist,
                 batch_loss if isinstance(batch_loss, BatchLoss) else _PlainLoss(batch_loss))
    history: list[dict[str, float]] = []
    row: dict[str, float] = {}
    for epoch in range(1, config.epochs + 1):
        if optimizer is not None or epoch == 1:
            row = loop.epoch(epoch)
        history.append({"epoch": epoch, **row})
        if on_epoch is not None and on_epoch(epoch, dict(row)):
            break
    return history


def step_bytes(batch: int, in_dim: int, out_dim: int, n_test: int, world_size: int = 1) -> int:
    """Estimated peak bytes one rank needs for a step at global batch `batch`, and for the test figures.

    Counted: the batch's similarity-sized matrices (one process: cosines, exponentials, gradient
    and rank comparisons, `batch x batch` fp32 each; a rank under torchrun: its rows against
    all columns, counted for the plain composition's two directions with their softmax, gradient
    and comparison copies, which bounds the fused row-block path's five matrices), the
    model's activations and gradients on the batch, and the test evaluation (adapted test vectors
    and the block of similarities, `adaptation.evaluation.BLOCK_BYTES`). The training data itself
    is already in memory when this is called and is not counted.
    """
    from .evaluation import BLOCK_BYTES

    rows = -(-batch // world_size)
    square = 5 * 4 * batch * batch if world_size == 1 else 8 * 4 * rows * batch
    activations = 4 * 8 * batch * (in_dim + out_dim)
    test = 4 * 2 * n_test * (in_dim + out_dim) + min(BLOCK_BYTES, 4 * 3 * n_test * n_test)
    return int(square + activations + test)


def largest_fitting_batch(available: float, in_dim: int, out_dim: int, n_test: int, world_size: int = 1,
                          ranks_sharing: int = 1, upper: int | None = None) -> int:
    """The largest global batch (a multiple of `world_size`, at most `upper`) whose estimate fits in `available`
    bytes shared by `ranks_sharing` ranks; 0 when not even `world_size` fits."""
    def fits(b: int) -> bool:
        return ranks_sharing * step_bytes(b, in_dim, out_dim, n_test, world_size) <= available

    lo, hi = 0, (upper or 1 << 24) // world_size  # in units of world_size
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid * world_size) else (lo, mid - 1)
    return lo * world_size
