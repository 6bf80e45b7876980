"""Shared CCA: one linear map for both sides of a pair, in closed form (float64).

The map's columns are the top-k generalised eigenvectors `w` of

    Cov(l + r) w = lambda (Cov(l - r) + ridge * tr(Cov(l - r)) / D * I) w

over the training pairs `(l, r)` (and their flipped copies, when the data has them): the
directions along which partners agree, weighed against how much partners differ. The ratio
`lambda` of a direction is `(1 + rho) / (1 - rho)` for its partner correlation `rho`, so the
order is that of CCA with one map shared by the two sides. It belongs with LDA, within-class
covariance normalisation and KISSME, classical metric-learning baselines.

Why each choice:

- **Both orders.** The map is shared, so which image of a pair is "left" must not matter: each
  pair counts as `(l, r)` and as `(r, l)`. `l + r` is the same either way; `l - r` changes sign, so
  its mean is zero and `Cov(l - r)` is its second moment.
- **The ridge** is scaled to the trace of `Cov(l - r)`, so one value (`DEFAULT_RIDGE`) means the
  same at any feature scale, and fewer pairs than dimensions still fit. Without it
  (`ridge=0`) a singular `Cov(l - r)` is refused (`SingularFit`).
- **Normalisation.** `eigh`'s: `W.T @ B @ W = I` for the regularised `B`, i.e. each direction is
  scaled to unit within-pair spread. The cosine after the map is what is scored.
- **k** is given, or chosen where `validation_curve`'s top-k is highest (MRR, then the smaller k,
  breaking ties: `adaptation.selection.selection_key`), on validation pairs only.

The statistics are sums (`PairMoments`), so the ranks of a torchrun group each sum their share and
add them up (`fit_moments`): the result is the one process's, up to float64 rounding.

Example:
    >>> import torch
    >>> from synthetic.planted import planted_pairs
    >>> pairs = planted_pairs(n_pairs=200, dim=16, seed=0)
    >>> left, right = torch.as_tensor(pairs.left), torch.as_tensor(pairs.right)
    >>> fit = shared_cca(pair_moments([(left, right)]), ridge=1e-3)
    >>> fit.vectors.shape, bool(fit.values[0] >= fit.values[-1])
    (torch.Size([16, 16]), True)
    >>> fit.weight(4).shape   # the (k, D) weight of the bias-free linear layer
    torch.Size([4, 16])
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from toolkit.distributed import Ranks
from toolkit.utils import UserError

from .distributed import all_reduce_sum
from .evaluation import evaluate_vectors
from .selection import selection_key
from .split import TrainData

__all__ = ["DEFAULT_RIDGE", "SINGULAR_RCOND", "PairMoments", "SingularFit", "CCAFit", "pair_moments", "shared_cca",
           "validation_curve", "choose_k", "check_k", "check_ridge", "CCARun", "fit_run"]

DEFAULT_RIDGE = 1e-3
"""The default ridge, as a share of Cov(l - r)'s mean eigenvalue (its trace over D)."""
SINGULAR_RCOND = 1e-12
"""Cov(l - r) (plus its ridge) whose smallest eigenvalue is at most this share of its largest counts as singular."""


class SingularFit(UserError):
    """The within-pair covariance cannot be inverted (fewer independent pairs than dimensions, and no ridge)."""


@dataclass(frozen=True)
class PairMoments:
    """The sums a shared CCA needs, in float64: they add up over shares of the pairs (and over ranks).

    Attributes:
        n: the number of pairs summed.
        sum_s: `sum(l + r)`, `(D,)`.
        sum_ss: `sum((l + r)(l + r)^T)`, `(D, D)`.
        sum_dd: `sum((l - r)(l - r)^T)`, `(D, D)`.
    """

    n: float
    sum_s: torch.Tensor
    sum_ss: torch.Tensor
    sum_dd: torch.Tensor

    def pack(self) -> torch.Tensor:
        """All four as one flat float64 tensor (one collective adds them all over the ranks)."""
        return torch.cat([self.sum_s.new_tensor([self.n]), self.sum_s, self.sum_ss.flatten(), self.sum_dd.flatten()])

    @staticmethod
    def unpack(flat: torch.Tensor, dim: int) -> "PairMoments":
        """`pack`'s inverse."""
        s, ss = 1 + dim, 1 + dim + dim * dim
        return PairMoments(float(flat[0].item()), flat[1:s], flat[s:ss].view(dim, dim), flat[ss:].view(dim, dim))

    def covariances(self) -> tuple[torch.Tensor, torch.Tensor]:
        """`(Cov(l + r), Cov(l - r))`, both orders counted (so `l - r` has mean zero); population covariances."""
        if self.n < 1:
            raise UserError("shared CCA needs at least one training pair")
        mean_s = self.sum_s / self.n
        return self.sum_ss / self.n - torch.outer(mean_s, mean_s), self.sum_dd / self.n


def pair_moments(sets: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> PairMoments:
    """The `PairMoments` of the pairs `(left[i], right[i])` of each set (e.g. the originals and their flipped copies).

    Args:
        sets: `(left, right)` tensors, each `(N, D)`, any float dtype and device; summed in float64.
    """
    if not sets:
        raise ValueError("no pairs to sum")
    dim = sets[0][0].shape[1]
    device = sets[0][0].device
    n, sum_s = 0.0, torch.zeros(dim, dtype=torch.float64, device=device)
    sum_ss = torch.zeros(dim, dim, dtype=torch.float64, device=device)
    sum_dd = torch.zeros_like(sum_ss)
    for left, right in sets:
        left, right = left.to(torch.float64), right.to(torch.float64)
        s, d = left + right, left - right
        n += s.shape[0]
        sum_s += s.sum(0)
        sum_ss += s.T @ s
        sum_dd += d.T @ d
    return PairMoments(n, sum_s, sum_ss, sum_dd)


@dataclass(frozen=True)
class CCAFit:
    """A fitted shared CCA.

    Attributes:
        values: the generalised eigenvalues, `(D,)`, largest first (partner agreement over difference).
        vectors: `(D, D)`, column j the direction of `values[j]`; `vectors.T @ B @ vectors = I`.
        ridge: the ridge it was fitted with (a share of Cov(l - r)'s mean eigenvalue).
    """

    values: torch.Tensor
    vectors: torch.Tensor
    ridge: float

    def weight(self, k: int) -> torch.Tensor:
        """The `(k, D)` weight of `nn.Linear(D, k, bias=False)` applying the top-k directions."""
        check_k(k, self.vectors.shape[0])
        return self.vectors[:, :k].T.contiguous()


def check_ridge(ridge: float) -> None:
    """Refuse a ridge that is negative or not a number (`UserError`)."""
    if not (isinstance(ridge, (int, float)) and math.isfinite(ridge) and ridge >= 0):
        raise UserError(f"cca_ridge must be a finite number, zero or more, got {ridge}")


def check_k(k: int, dim: int) -> None:
    """Refuse a k outside 1..D (`UserError`)."""
    if isinstance(k, bool) or int(k) != k or not 1 <= k <= dim:
        raise UserError(f"cca_k must be between 1 and the features' dimension {dim}, got {k}")


def shared_cca(moments: PairMoments, ridge: float) -> CCAFit:
    """The shared CCA of summed pairs: `Cov(l + r)` against `Cov(l - r)` plus the ridge, in float64.

    Computed by whitening: `B = V diag(e) V^T`, `M = (V e^-1/2)^T A (V e^-1/2)`, `M = U diag(values) U^T`,
    `vectors = V e^-1/2 U`, so `vectors.T @ A @ vectors = diag(values)` and `vectors.T @ B @ vectors = I`.

    Raises:
        UserError: a negative ridge; `SingularFit` when `B` is singular (ridge 0 and too few pairs).
    """
    check_ridge(ridge)
    a, d = moments.covariances()
    dim = a.shape[0]
    b = d + (ridge * torch.trace(d) / dim) * torch.eye(dim, dtype=d.dtype, device=d.device)
    e, v = torch.linalg.eigh(b)
    if not e[-1] > 0 or e[0] <= SINGULAR_RCOND * e[-1]:
        raise SingularFit(
            f"the within-pair covariance of {int(moments.n)} training pairs is singular in {dim} dimensions "
            f"(smallest eigenvalue {e[0].item():.3g}, largest {e[-1].item():.3g}), so shared CCA has no unique "
            f"solution; use a cca_ridge above 0 (default {DEFAULT_RIDGE:g}) or more pairs")
    whiten = v / e.sqrt()
    values, u = torch.linalg.eigh(whiten.T @ a @ whiten)
    order = torch.arange(dim - 1, -1, -1, device=values.device)  # eigh ascends; the largest first
    return CCAFit(values[order], whiten @ u[:, order], float(ridge))


def validation_curve(fit: CCAFit, left: torch.Tensor, right: torch.Tensor, topk: Sequence[int], temperature: float,
                     evaluate: Callable[..., dict[str, torch.Tensor]] = evaluate_vectors) -> list[dict[str, float]]:
    """The retrieval figures of the validation pairs `(left[i], right[i])` under each k from 1 to D.

    One projection onto all D directions (in float64), then for each k the first k columns are
    scored as the trained models are (`adaptation.evaluation.evaluate_vectors`, fp32): row k-1 is
    `{"k": k, "Val/top k": ..., "Val/MRR": ..., "Val/Loss": ...}`. `evaluate` stands in for
    `evaluate_vectors` (e.g. sharing its blocks among torchrun ranks).
    """
    pl = left.to(torch.float64) @ fit.vectors
    pr = right.to(torch.float64) @ fit.vectors
    rows = []
    for k in range(1, fit.vectors.shape[1] + 1):
        figures = evaluate(pl[:, :k].float(), pr[:, :k].float(), temperature, topk)
        values = torch.stack([v.float() for v in figures.values()]).tolist()  # one transfer per k
        rows.append({"k": k, **{f"Val/{name}": value for name, value in zip(figures, values)}})
    return rows


def choose_k(curve: Sequence[dict[str, float]], k_metric: int) -> int:
    """The k of the best row of `validation_curve`: highest `Val/top k_metric`, then MRR, then the smallest k."""
    if not curve:
        raise ValueError("an empty validation curve")
    best = max(curve, key=lambda row: (selection_key(row, k_metric), -row["k"]))
    return int(best["k"])


@dataclass(frozen=True)
class CCARun:
    """A run's fitted shared CCA: the fit, the k applied and how it was chosen, the validation curve (or None)."""

    fit: CCAFit
    k: int
    chosen_on: str  # "validation" (the best of `curve`) or "given" (cca_k)
    curve: list[dict[str, float]] | None

    def weight(self) -> torch.Tensor:
        """The `(k, D)` map, for `adaptation.models.SharedCCA.set_map`."""
        return self.fit.weight(self.k)

    def record(self) -> dict:
        """What config.json records: k, how it was chosen, the ridge, the eigenvalues and the validation curve."""
        curve = None
        if self.curve is not None:
            curve = {name: [row[name] for row in self.curve] for name in self.curve[0]}
        return {"k": self.k, "chosen_on": self.chosen_on, "ridge": self.fit.ridge,
                "eigenvalues": self.fit.values.tolist(), "val_curve": curve}


def summed_moments(sets: Sequence[tuple[torch.Tensor, torch.Tensor]], dist: Ranks = Ranks()) -> PairMoments:
    """`pair_moments` of all the sets' pairs, each rank summing its share (`Ranks.shard`) and the shares added up."""
    shares = []
    for left, right in sets:
        rows = dist.shard(len(left))
        shares.append((left[rows.start:rows.stop], right[rows.start:rows.stop]))
    moments = pair_moments(shares)
    if not dist.distributed:
        return moments
    return PairMoments.unpack(all_reduce_sum(moments.pack(), dist), sets[0][0].shape[1])


def fit_run(data: TrainData, ridge: float, k: int | None, topk: Sequence[int], temperature: float,
            dist: Ranks = Ranks()) -> CCARun:
    """Fit a run's shared CCA on its training pairs and their flipped copies, never its validation or test pairs.

    Args:
        data: the run's sets (`adaptation.split.TrainData`); the map is fitted on `data.train_sets`.
        ridge: see `shared_cca`.
        k: the directions to keep; None chooses it on `data.val` (`choose_k` over every k from 1 to D).
        topk, temperature: the figures of the validation curve (k is chosen on `topk[0]`).
        dist: under torchrun, the group: the sums are added over the ranks and the curve's blocks shared,
            so every rank gets one process's fit.

    Raises:
        UserError: k outside 1..D, no k and no validation pairs, or a singular fit (`SingularFit`).
    """
    dim = data.train[0].shape[1]
    if k is not None:
        check_k(k, dim)
    elif data.val is None:
        raise UserError("model cca needs cca_k, or val_split to choose k on validation pairs")
    fit = shared_cca(summed_moments(data.train_sets, dist), ridge)
    curve = None
    if data.val is not None:
        def evaluate(a: torch.Tensor, b: torch.Tensor, scale: float, ks: Sequence[int]) -> dict[str, torch.Tensor]:
            return evaluate_vectors(a, b, scale, ks, dist=dist)

        curve = validation_curve(fit, *data.val, topk, temperature, evaluate)
    if k is None:
        return CCARun(fit, choose_k(curve, topk[0]), "validation", curve)
    return CCARun(fit, int(k), "given", curve)
