"""Features files (extract.py's and the original implementation's pickle), their checks, and the split."""

from dataclasses import replace

import numpy as np
import pytest

from adaptation.split import split_data, split_indices
from featuresExtractor.pairs_file import load_pairs, pairs_from_structured, to_paper_dict, to_structured
from synthetic.planted import planted_array, planted_pairs
import torch
from toolkit.utils import UserError


def seed_dict(n=6, d=4, seed=0):
    """The original implementation's layout: originals first, then their flipped copies named `augmented_<name>`."""
    rng = np.random.default_rng(seed)
    left = rng.standard_normal((2 * n, d)).astype(np.float32)
    right = rng.standard_normal((2 * n, d)).astype(np.float32)
    names = [f"img{i}.png" for i in range(n)]
    full = names + [f"augmented_{x}" for x in names]
    return {"left": left, "right": right, "left_name": np.array(full), "right_name": np.array(full)}


def test_paper_format_needs_allow_pickle_and_pairs_copies_by_name(tmp_path):
    path = tmp_path / "embds.npy"
    d = seed_dict()
    np.save(path, d, allow_pickle=True)
    with pytest.raises(UserError, match="--allow-pickle"):
        load_pairs(path)
    pairs = load_pairs(path, allow_pickle=True)
    assert pairs.names == [f"img{i}.png" for i in range(6)]
    assert pairs.in_dim == 4 and len(pairs) == 6
    np.testing.assert_array_equal(pairs.left, d["left"][:6])
    np.testing.assert_array_equal(pairs.flipped_right, d["right"][6:])
    assert pairs.flipped_of.tolist() == list(range(6))


def test_paper_dict_writer_round_trips_in_the_papers_row_order(tmp_path):
    pairs = planted_pairs(12, 5, seed=4)  # rows shuffled in the file: copies out of their originals' order
    assert pairs.flipped_of.tolist() != list(range(12))
    d = to_paper_dict(pairs)
    # The paper's train.py takes row i + N as the flipped copy of row i.
    assert d["left_name"][:12] == pairs.names and d["left_name"][12:] == ["augmented_" + n for n in pairs.names]
    np.testing.assert_array_equal(d["right"][:12], pairs.right)
    np.testing.assert_array_equal(d["left"][12 + pairs.flipped_of], pairs.flipped_left)
    path = tmp_path / "embds.npy"
    np.save(path, d, allow_pickle=True)
    back = load_pairs(path, allow_pickle=True)
    assert back.names == pairs.names and back.flipped_of.tolist() == list(range(12))
    np.testing.assert_array_equal(back.flipped_right[pairs.flipped_of], pairs.flipped_right)
    plain = to_paper_dict(pairs_from_structured(planted_array(3, 2, flipped=False)))
    assert len(plain["left"]) == 3 and not any(n.startswith("augmented_") for n in plain["left_name"])
    two = pairs.select([0, 1])
    one_copy = replace(two, flipped_left=two.flipped_left[:1], flipped_right=two.flipped_right[:1],
                       flipped_of=two.flipped_of[:1])
    with pytest.raises(UserError, match="one flipped copy per pair"):
        to_paper_dict(one_copy)


def test_paper_dict_missing_key(tmp_path):
    path = tmp_path / "embds.npy"
    d = seed_dict()
    del d["right_name"]
    np.save(path, d, allow_pickle=True)
    with pytest.raises(UserError, match="right_name"):
        load_pairs(path, allow_pickle=True)


def test_structured_rows_in_any_order_pair_by_name(tmp_path):
    arr = planted_array(20, 8, seed=3)  # originals and flipped copies shuffled together
    path = tmp_path / "features.npy"
    np.save(path, arr)
    pairs = load_pairs(path)
    assert len(pairs) == 20 and len(pairs.flipped_of) == 20
    by_name = {(n, a): (l, r) for n, a, l, r in zip(arr["name"], arr["augmented"], arr["left"], arr["right"])}
    for j, i in enumerate(pairs.flipped_of):
        np.testing.assert_array_equal(pairs.flipped_left[j], by_name[(pairs.names[i], True)][0])
    for i, name in enumerate(pairs.names):
        np.testing.assert_array_equal(pairs.right[i], by_name[(name, False)][1])


def test_files_without_flipped_copies_are_fine():
    pairs = pairs_from_structured(planted_array(10, 4, flipped=False))
    data = split_data(pairs, *split_indices(10, 0.3, seed=0))
    assert data.flipped is None and len(data.train_sets) == 1


def test_split_is_seeded_and_keeps_test_copies_out_of_training():
    pairs = pairs_from_structured(planted_array(40, 6, seed=1))
    tr, te = split_indices(40, 0.25, seed=7)
    tr2, te2 = split_indices(40, 0.25, seed=7)
    assert np.array_equal(te, te2) and np.array_equal(tr, tr2)
    assert len(te) == 10 and len(tr) == 30 and not set(tr) & set(te)
    assert not np.array_equal(te, split_indices(40, 0.25, seed=8)[1])
    data = split_data(pairs, tr, te)
    assert data.test_names == [pairs.names[i] for i in te]
    # The flipped set is exactly the copies of the training pairs.
    flipped_rows = {tuple(x) for x in data.flipped[0].numpy()}
    want = {tuple(pairs.flipped_left[j]) for j, i in enumerate(pairs.flipped_of) if i in set(tr)}
    assert flipped_rows == want and len(flipped_rows) == 30


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: np.zeros((4, 3), np.float32), "plain"),
        (lambda: np.zeros(4, np.float32), "plain"),
        (lambda: np.zeros(3, dtype=[("name", "U5"), ("augmented", "?"), ("feature", "<f4", (4,))]), "flat image folder"),
        (lambda: np.zeros(3, dtype=[("name", "U5"), ("left", "<f4", (4,)), ("right", "<f4", (4,))]), "no field augmented"),
        (lambda: np.zeros(3, dtype=[("name", "U5"), ("augmented", "?"), ("left", "<f4"), ("right", "<f4")]), "one vector per pair"),
        (lambda: np.zeros(3, dtype=[("name", "U5"), ("augmented", "?"), ("left", "<f4", (4,)), ("right", "<f4", (5,))]), "4 dimensions but right vectors 5"),
    ],
)
def test_arrays_without_pairs_are_refused(make, match):
    with pytest.raises(UserError, match=match):
        pairs_from_structured(make())


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_refused(bad):
    arr = planted_array(5, 4, flipped=False)
    arr["right"][2, 1] = bad
    with pytest.raises(UserError, match="1 rows hold NaN or inf"):
        pairs_from_structured(arr)


def test_names_must_pair_up():
    x = np.zeros((3, 2))
    with pytest.raises(UserError, match="two original"):
        pairs_from_structured(to_structured(["a", "a", "b"], [False, False, False], x, x))
    with pytest.raises(UserError, match="no original"):
        pairs_from_structured(to_structured(["a", "b", "c"], [False, False, True], x, x))
    with pytest.raises(UserError, match="two flipped"):
        pairs_from_structured(to_structured(["a", "a", "a"], [False, True, True], x, x))


@pytest.mark.parametrize(
    "n,split,topk,match",
    [
        (100, 0.0, (), "strictly between"),
        (100, 1.0, (), "strictly between"),
        (100, -0.5, (), "strictly between"),
        (100, float("nan"), (), "strictly between"),
        (7, 0.25, (), "1 test pairs"),
        (20, 0.25, (1, 6), "top-k 6 is larger than the test set"),
    ],
)
def test_bad_splits(n, split, topk, match):
    with pytest.raises(UserError, match=match):
        split_indices(n, split, seed=0, topk=topk)


def test_unreadable_files(tmp_path):
    with pytest.raises(UserError, match="cannot read"):
        load_pairs(tmp_path / "missing.npy")
    with pytest.raises(UserError, match="is a folder"):
        load_pairs(tmp_path)
    (tmp_path / "text.npy").write_text("hello")
    with pytest.raises(UserError, match="not a .npy file"):
        load_pairs(tmp_path / "text.npy")
    np.save(tmp_path / "ok.npy", planted_array(5, 4))
    (tmp_path / "cut.npy").write_bytes((tmp_path / "ok.npy").read_bytes()[:200])
    with pytest.raises(UserError, match="cannot read"):
        load_pairs(tmp_path / "cut.npy")


def test_split_each_gives_each_splits_sets_and_lets_the_pairs_go_before_the_last_run():
    import weakref

    from adaptation.split import split_each

    pairs = planted_pairs(n_pairs=12, dim=4, seed=2)
    splits = [(*split_indices(12, 0.25, seed=s), None) for s in (0, 1, 2)]
    expected = [split_data(pairs, train, test) for train, test, _ in splits]
    alive = weakref.ref(pairs)
    runs = split_each(pairs, splits)
    del pairs
    got = []
    for i in range(3):
        got.append(next(runs))
        assert (alive() is None) == (i == 2)  # held for runs 1 and 2, released once run 3's sets exist
    for a, b in zip(got, expected):
        assert a.train_names == b.train_names and a.test_names == b.test_names
        for x, y in zip((*a.train, *a.flipped, *a.test), (*b.train, *b.flipped, *b.test)):
            assert torch.equal(x, y)
    assert next(runs, None) is None
