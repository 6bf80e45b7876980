"""Threshold calibration: the fast curves against brute force, and planted pairs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adaptation.calibration import Threshold, calibrate, max_f1_threshold, pair_scores, precision_threshold


def brute(scores, labels, target=0.95):
    """Every distinct score tried as a threshold with plain masks."""
    best, best_prec = None, None
    positives = labels.sum()
    for t in sorted(set(scores.tolist()), reverse=True):
        pred = scores >= t
        tp = int((pred & labels).sum())
        fp = int((pred & ~labels).sum())
        p = tp / (tp + fp)
        r = tp / positives
        f1 = 2 * p * r / (p + r) if tp else 0.0
        if best is None or f1 > best[1] + 1e-12:  # strict: ties keep the higher threshold
            best = (t, f1, p, r)
        if p >= target:
            best_prec = (t, r)  # keeps being lowered while precision holds
    return best, best_prec


@pytest.mark.parametrize("seed", range(12))
def test_fast_thresholds_match_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 40))
    # Rounded scores create ties, the case the grouping must get right.
    scores = np.round(rng.standard_normal(n) * 2, int(rng.integers(0, 3)))
    labels = rng.random(n) < 0.3
    labels[rng.integers(n)] = True
    want_f1, want_prec = brute(scores, labels, target=0.8)
    got = max_f1_threshold(scores, labels)
    assert got == pytest.approx(want_f1)
    got_prec = precision_threshold(scores, labels, target=0.8)
    assert (got_prec is None) == (want_prec is None)
    if want_prec is not None:
        assert got_prec == pytest.approx(want_prec)


def test_pair_scores_label_the_diagonal():
    sim = torch.arange(9.0).reshape(3, 3)
    scores, labels = pair_scores(sim)
    assert scores.tolist() == list(range(9))
    assert np.flatnonzero(labels).tolist() == [0, 4, 8]
    with pytest.raises(ValueError):
        pair_scores(torch.zeros(2, 3))


def test_precision_never_reached_gives_none():
    # The highest score is a negative and every positive ties with a negative.
    scores = np.array([1.0, 0.5, 0.5])
    labels = np.array([False, True, False])
    assert precision_threshold(scores, labels) is None
    t = calibrate(np.array([[0.1, 0.9], [0.9, 0.1]]))
    assert t.at_precision is None and t.recall_at_precision is None and t.f1 == pytest.approx(2 / 3)


def test_threshold_on_planted_pairs_beats_chance():
    from adaptation.split import split_data, split_indices
    from adaptation.losses import similarity_matrix
    from synthetic.planted import planted_pairs

    # Raw features of planted pairs: partners share a latent; the calibrated threshold is then
    # applied to other pairs (held out), where it must separate partners from non-partners.
    pairs = planted_pairs(n_pairs=240, dim=16, signal_dim=8, nuisance=0.5, flipped=False, seed=1)
    data = split_data(pairs, *split_indices(len(pairs), 0.5, seed=0))
    t = calibrate(similarity_matrix(*data.train))
    scores, labels = pair_scores(similarity_matrix(*data.test))
    pred = scores >= t.max_f1
    precision = (pred & labels).sum() / pred.sum()
    recall = (pred & labels).sum() / labels.sum()
    chance = labels.mean()  # the precision of saying "alike" at random
    assert precision > 5 * chance and recall > 0.3
    assert Threshold.from_dict(t.to_dict()) == t
