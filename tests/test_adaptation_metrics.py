"""Retrieval metrics against a brute-force rank computation, ties included."""

import numpy as np
import pytest
import torch

from adaptation.metrics import metric_names, partner_ranks, retrieval_metrics


def brute_ranks(sim):
    """Rank of each partner by sorting every row (and column) in Python; a tie is placed before the partner."""
    n = len(sim)
    l2r, r2l = [], []
    for i in range(n):
        others = [sim[i][j] for j in range(n) if j != i]
        ordered = sorted(others + [sim[i][i]], reverse=True)
        # The partner goes after every equal value: its rank is the last position holding its value.
        l2r.append(max(p for p, v in enumerate(ordered, 1) if v == sim[i][i]))
        col = [sim[j][i] for j in range(n)]
        ordered = sorted(col, reverse=True)
        r2l.append(max(p for p, v in enumerate(ordered, 1) if v == sim[i][i]))
    return l2r, r2l


def brute_metrics(sim, topk):
    l2r, r2l = brute_ranks(sim)
    n = len(sim)
    out = {}
    for k in topk:
        out[f"top {k}"] = sum(1 for i in range(n) if l2r[i] <= k or r2l[i] <= k) / n
    for k in topk:
        out[f"left2right top {k}"] = sum(1 for r in l2r if r <= k) / n
    for k in topk:
        out[f"right2left top {k}"] = sum(1 for r in r2l if r <= k) / n
    out["MRR"] = 0.5 * (sum(1 / r for r in l2r) / n + sum(1 / r for r in r2l) / n)
    return out


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("levels", [3, 1000])
def test_metrics_match_brute_force(seed, levels):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 30))
    # Few distinct levels means many exact ties, including with the diagonal.
    sim = rng.integers(0, levels, size=(n, n)).astype(np.float32) / levels
    topk = (1, 2, 5) if n >= 5 else (1, 2)
    got = {k: v.item() for k, v in retrieval_metrics(torch.from_numpy(sim), topk).items()}
    want = brute_metrics(sim.tolist(), topk)
    assert list(got) == metric_names(topk)
    assert got == pytest.approx(want, abs=1e-6)
    l2r, r2l = partner_ranks(torch.from_numpy(sim))
    assert (l2r.tolist(), r2l.tolist()) == brute_ranks(sim.tolist())


def test_ties_count_against_the_query():
    # Every candidate scores the same: the partner is ranked last, so top-1 misses it.
    m = retrieval_metrics(torch.ones(4, 4), topk=(1, 4))
    assert m["top 1"].item() == 0.0
    assert m["top 4"].item() == 1.0
    assert m["MRR"].item() == pytest.approx(0.25)


def test_top_k_is_either_direction_as_the_seed():
    # Pair 1's partner wins its column but not its row: a hit for `top 1`, not for left2right.
    sim = torch.tensor([[0.9, 0.1], [0.95, 0.5]])
    m = retrieval_metrics(sim, topk=(1,))
    assert m["left2right top 1"].item() == 0.5
    assert m["right2left top 1"].item() == 0.5
    assert m["top 1"].item() == 1.0


def test_nan_partner_gets_worst_rank():
    sim = torch.eye(3)
    sim[1, 1] = float("nan")
    l2r, r2l = partner_ranks(sim)
    assert l2r.tolist() == [1, 3, 1] and r2l.tolist() == [1, 3, 1]
    assert retrieval_metrics(sim, topk=(1,))["top 1"].item() == pytest.approx(2 / 3)


def test_accepts_bf16_and_rejects_non_square():
    m = retrieval_metrics(torch.eye(3, dtype=torch.bfloat16), topk=(1,))
    assert m["top 1"].dtype == torch.float32 and m["top 1"].item() == 1.0
    with pytest.raises(ValueError):
        partner_ranks(torch.zeros(2, 3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scratch_gives_the_same_ranks(dtype):
    rng = np.random.default_rng(9)
    sim = torch.from_numpy(rng.integers(0, 4, size=(12, 12)).astype(np.float32) / 4).to(dtype)
    scratch = torch.full((12, 12), 7.0)  # stale content must not matter
    got = partner_ranks(sim, scratch)
    want = brute_ranks(sim.float().tolist())
    assert (got[0].tolist(), got[1].tolist()) == want
    assert retrieval_metrics(sim, (1, 3), scratch) == retrieval_metrics(sim, (1, 3))
    with pytest.raises(ValueError):
        partner_ranks(sim, torch.zeros(12, 12, dtype=torch.float64))


def test_column_counts_summed_over_row_blocks_are_the_right_to_left_ranks():
    from adaptation.metrics import column_counts

    g = torch.Generator().manual_seed(4)
    sim = torch.randint(0, 4, (9, 9), generator=g).float()  # few values: many exact ties
    _, r2l = partner_ranks(sim)
    diag = sim.diagonal().contiguous()
    counts = sum(column_counts(sim[a:b], diag) for a, b in [(0, 2), (2, 2), (2, 9)])
    assert torch.equal(counts.long(), r2l)
    # The slow, obvious version: a loop over the columns.
    assert [sum(int(sim[i, j] >= sim[j, j]) for i in range(9)) for j in range(9)] == r2l.tolist()
