"""Splits by article: disjoint, covering, seeded; OOD is a block; ranges; empty splits raise."""

from __future__ import annotations

import numpy as np
import pytest

from lvm.data.splits import make_splits, split_articles
from lvm.data.store import ArticleStore, WindowSpec
from lvm.runtime.errors import ConfigError, DataError
from lvm.training.config import validate
from tests.helpers import P6, cfg_for

IDS = np.arange(100) * 3 + 11  # non-contiguous article ids


def shuffled_ids(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).permutation(IDS)


def make_store(lengths: dict[int, int], d: int = 4, seed: int = 0, source: str = "toy") -> ArticleStore:
    art = np.concatenate([np.full(n, a) for a, n in lengths.items()]).astype(np.int64)
    chunk = np.concatenate([np.arange(n) for n in lengths.values()]).astype(np.int64)
    v = np.random.default_rng(seed).standard_normal((len(art), d))
    return ArticleStore(v / np.linalg.norm(v, axis=1, keepdims=True), art, chunk, source=source)


# --------------------------------------------------------------------------- split_articles


def test_split_articles_disjoint_covering_sizes():
    out = split_articles(shuffled_ids(), val=0.2, ood=0.1, seed=0)
    assert set(out) == {"train", "val", "ood"}
    assert (len(out["train"]), len(out["val"]), len(out["ood"])) == (70, 20, 10)
    for name, ids in out.items():
        assert np.array_equal(ids, np.sort(ids)), name
    allv = np.concatenate(list(out.values()))
    assert len(np.unique(allv)) == len(allv) == len(IDS)
    assert set(allv.tolist()) == set(IDS.tolist())


def test_ood_is_last_block_of_sorted_ids():
    out = split_articles(shuffled_ids(), val=0.2, ood=0.1, seed=3)
    assert out["ood"].tolist() == sorted(IDS.tolist())[-10:]
    assert out["train"].max() < out["ood"].min() and out["val"].max() < out["ood"].min()


def test_split_articles_deterministic_and_seeded():
    a = split_articles(shuffled_ids(0), val=0.2, ood=0.1, seed=0)
    b = split_articles(shuffled_ids(1), val=0.2, ood=0.1, seed=0)  # input order does not matter
    for k in a:
        assert np.array_equal(a[k], b[k])
    c = split_articles(IDS, val=0.2, ood=0.1, seed=1)
    assert not np.array_equal(a["val"], c["val"])
    assert np.array_equal(a["ood"], c["ood"])  # the OOD block does not depend on the seed
    # val is a random subset, not a block: not all val ids are consecutive in the sorted ids.
    pos = np.searchsorted(np.sort(IDS), a["val"])
    assert pos.max() - pos.min() + 1 > len(pos)


def test_split_articles_zero_fractions():
    out = split_articles(IDS, val=0.0, ood=0.0, seed=0)
    assert np.array_equal(out["train"], IDS) and len(out["val"]) == 0 and len(out["ood"]) == 0


@pytest.mark.parametrize("val, ood", [(0.6, 0.4), (1.0, 0.0), (-0.1, 0.1), (0.1, 1.0)])
def test_split_articles_bad_fractions(val, ood):
    with pytest.raises(DataError, match="val"):
        split_articles(IDS, val=val, ood=ood, seed=0)


def test_split_articles_ranges():
    ids = np.arange(20)
    out = split_articles(ids, 0.1, 0.1, 0, ranges={"train": [0, 10], "val": [10, 14], "ood": [16, 20]})
    assert out["train"].tolist() == list(range(10))
    assert out["val"].tolist() == [10, 11, 12, 13]
    assert out["ood"].tolist() == [16, 17, 18, 19]  # 14, 15 unused
    no_ood = split_articles(ids, 0.1, 0.1, 0, ranges={"train": [0, 10], "val": [10, 20]})
    assert len(no_ood["ood"]) == 0


def test_split_articles_overlapping_ranges():
    with pytest.raises(DataError, match="train and val overlap on 2 articles"):
        split_articles(np.arange(20), 0.1, 0.1, 0, ranges={"train": [0, 12], "val": [10, 15]})
    with pytest.raises(DataError, match="overlap"):
        split_articles(np.arange(20), 0.1, 0.1, 0, ranges={"train": [0, 5], "val": [5, 10], "ood": [8, 20]})


def test_split_articles_unknown_range_name():
    with pytest.raises(DataError, match="test"):
        split_articles(np.arange(20), 0.1, 0.1, 0, ranges={"train": [0, 10], "test": [10, 20]})


# --------------------------------------------------------------------------- make_splits


def varied_store() -> ArticleStore:
    rng = np.random.default_rng(5)
    lengths = {int(a): int(n) for a, n in zip(IDS, rng.integers(3, 15, size=len(IDS)))}
    return make_store(lengths)


def test_make_splits_windows_by_article():
    store = varied_store()
    sp = make_splits(store, P6, val=0.2, ood=0.1, seed=0)
    ids = split_articles(store.unique_articles(), 0.2, 0.1, 0)
    everything = store.windows(P6)
    for name, w in sp.items():
        assert set(w.article_ids().tolist()) <= set(ids[name].tolist())
        assert len(w) > 0
    arts = [set(w.article_ids().tolist()) for w in sp.values()]
    assert not (arts[0] & arts[1]) and not (arts[0] & arts[2]) and not (arts[1] & arts[2])
    # Every window of the store lands in exactly one split.
    starts = np.concatenate([w.starts.numpy() for w in sp.values()])
    assert sorted(starts.tolist()) == sorted(everything.starts.numpy().tolist())
    targets = np.concatenate([w.targets.numpy() for w in sp.values()])
    assert sorted(targets.tolist()) == sorted(everything.targets.numpy().tolist())
    # Expected window counts per split, computed from article lengths.
    for name, w in sp.items():
        lengths = zip(store.unique_articles(), store.article_lengths)
        expected = sum(max(0, n - 6) for a, n in lengths if a in ids[name])
        assert len(w) == expected, name


def test_make_splits_deterministic():
    store = varied_store()
    a = make_splits(store, P6, 0.2, 0.1, seed=4)
    b = make_splits(store, P6, 0.2, 0.1, seed=4)
    c = make_splits(store, P6, 0.2, 0.1, seed=5)
    for k in a:
        assert np.array_equal(a[k].starts.numpy(), b[k].starts.numpy())
    assert not np.array_equal(a["val"].starts.numpy(), c["val"].starts.numpy())


def test_make_splits_empty_val_names_split():
    store = varied_store()
    with pytest.raises(DataError) as e:
        make_splits(store, P6, val=0.0001, ood=0.1, seed=0)  # rounds to no val article
    assert "'val'" in str(e.value) and "toy" in str(e.value)


def test_a_training_split_needs_val_and_the_rule_is_the_one_start_up_checks():
    """make_splits and the start-up check refuse val=0 with the same line (split_articles alone,
    a general article split, accepts it)."""
    with pytest.raises(DataError, match=r"data.split needs 0 < val < 1") as e:
        make_splits(varied_store(), P6, val=0, ood=0.2, seed=0)
    with pytest.raises(ConfigError) as startup:
        validate(cfg_for("data.split.val=0", "data.split.ood=0.2"))
    assert str(e.value) in str(startup.value)


def test_make_splits_empty_train_names_split():
    store = varied_store()
    with pytest.raises(DataError, match="split 'train' has no window"):
        make_splits(store, P6, 0.1, 0.1, 0, ranges={"train": [10_000, 20_000], "val": [0, 10_000]})


def test_make_splits_val_articles_all_short():
    # Val gets articles 10..11 (both too short for P6) through ranges.
    lengths = {a: 10 for a in range(10)} | {10: 6, 11: 3}
    store = make_store(lengths)
    with pytest.raises(DataError) as e:
        make_splits(store, P6, 0.1, 0.0, 0, ranges={"train": [0, 10], "val": [10, 12]})
    msg = str(e.value)
    assert "'val'" in msg and "2 articles" in msg and "7" in msg


def test_make_splits_all_articles_too_short():
    store = make_store({a: 6 for a in range(30)}, source="short.npz")
    with pytest.raises(DataError) as e:
        make_splits(store, P6, 0.2, 0.1, 0)
    msg = str(e.value)
    assert "short.npz" in msg and "no window" in msg
    assert "7 consecutive chunks" in msg and "context=5" in msg and "target_offset=2" in msg
    # The same store is fine for the standard format (6 chunks suffice).
    sp = make_splits(store, WindowSpec(context=5, target_offset=1, prev_slot=-1), 0.2, 0.1, 0)
    assert len(sp["train"]) == len(split_articles(store.unique_articles(), 0.2, 0.1, 0)["train"])


def test_make_splits_ood_requested_but_empty():
    lengths = {a: 10 for a in range(20)} | {100: 3, 101: 3}  # the last block (ood=0.1) is short
    store = make_store(lengths)
    with pytest.raises(DataError, match="split 'ood'"):
        make_splits(store, P6, 0.2, 0.1, 0)
    sp = make_splits(store, P6, 0.2, 0.0, 0)  # not requested: empty is fine
    assert len(sp["ood"]) == 0


def test_make_splits_ranges_without_ood():
    # With ranges the fractions are ignored; no OOD range means no OOD is required.
    store = make_store({a: 9 for a in range(10)})
    sp = make_splits(store, P6, val=0.1, ood=0.1, seed=0, ranges={"train": [0, 7], "val": [7, 10]})
    assert len(sp["ood"]) == 0
    assert set(sp["train"].article_ids().tolist()) == set(range(7))
    assert set(sp["val"].article_ids().tolist()) == {7, 8, 9}
    assert len(sp["train"]) == 7 * 3 and len(sp["val"]) == 3 * 3
    with pytest.raises(DataError, match="split 'ood'"):
        make_splits(store, P6, 0.1, 0.0, 0, ranges={"train": [0, 7], "val": [7, 10], "ood": [50, 60]})
