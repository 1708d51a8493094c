"""The samplers: a global order that depends on (seed, epoch) only, resumable mid-epoch, shared
out across ranks without a window twice."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lvm.data import sampler as sampler_module
from lvm.data.sampler import EpochSampler, ShardSampler, epoch_seed, stratified_sample
from lvm.runtime.errors import ConfigError

DATA = list(range(10000))


def test_each_epoch_is_a_seeded_permutation_of_its_own():
    s = EpochSampler(DATA, seed=3)
    first = list(s)
    assert sorted(first) == DATA and first != DATA
    assert list(EpochSampler(DATA, seed=3)) == first  # the same seed, the same order
    assert list(EpochSampler(DATA, seed=4)) != first
    s.set_epoch(1)
    second = list(s)
    assert sorted(second) == DATA and second != first
    # The order of an epoch is torch's permutation from that epoch's own seed, whatever came before.
    expected = torch.randperm(len(DATA), generator=torch.Generator().manual_seed(epoch_seed(3, 1))).tolist()
    assert second == expected


def test_resume_skips_what_the_epoch_already_trained_on():
    whole = EpochSampler(DATA, seed=0)
    whole.set_epoch(2)
    order = list(whole)
    resumed = EpochSampler(DATA, seed=0)
    resumed.resume(2, 4096 + 32)
    assert list(resumed) == order[4096 + 32 :]
    assert len(list(resumed)) == len(DATA)  # the skip is used once: the next iteration is whole
    done = EpochSampler(DATA, seed=0)
    done.resume(2, len(DATA))  # a complete epoch resumes at the next epoch's start
    nxt = EpochSampler(DATA, seed=0)
    nxt.set_epoch(3)
    assert list(done) == list(nxt)


def test_set_epoch_keeps_a_resume_position_of_the_same_epoch():
    """Lightning calls set_epoch(e) when a resumed epoch e starts: the position must survive."""
    s = EpochSampler(DATA, seed=0)
    s.resume(1, 64)
    s.set_epoch(1)
    ref = EpochSampler(DATA, seed=0)
    ref.set_epoch(1)
    assert list(s) == list(ref)[64:]


def as_rank(monkeypatch, rank: int, world: int) -> None:
    monkeypatch.setattr(sampler_module, "rank_and_world", lambda: (rank, world))


@pytest.mark.parametrize("n", [10000, 10001, 10003])
def test_ranks_take_disjoint_equal_shares_of_each_global_batch(monkeypatch, n):
    data, world, batch = list(range(n)), 3, 32
    order = torch.randperm(n, generator=torch.Generator().manual_seed(epoch_seed(5, 0))).tolist()
    shares = []
    for rank in range(world):
        as_rank(monkeypatch, rank, world)
        s = EpochSampler(data, seed=5)
        shares.append(list(s))
        assert len(shares[-1]) == len(s) == n // world  # every rank takes the same number of steps
    for j in range(n // world // batch):  # global batch j is split among the ranks, nothing else
        global_batch = order[j * batch * world : (j + 1) * batch * world]
        assert sorted(x for share in shares for x in share[j * batch : (j + 1) * batch]) == sorted(global_batch)
    taken = [x for share in shares for x in share]
    assert len(set(taken)) == len(taken) == world * (n // world)  # disjoint; the tail (< world windows) left out


def test_a_resumed_rank_goes_on_where_its_uninterrupted_share_was(monkeypatch):
    world, batch, done = 2, 32, 70
    for rank in range(world):
        as_rank(monkeypatch, rank, world)
        whole = EpochSampler(DATA, seed=1)
        whole.set_epoch(4)
        resumed = EpochSampler(DATA, seed=1)
        resumed.resume(4, done * batch * world)  # global windows done, as ExactResume counts them
        assert list(resumed) == list(whole)[done * batch :]


def test_block_shuffle_keeps_each_block_together_and_is_a_function_of_seed_and_epoch():
    n, block = 10000, 1000
    s = EpochSampler(list(range(n)), seed=2, shuffle="block", block=block)
    order = list(s)
    assert sorted(order) == list(range(n)) and order != sorted(order)
    for k in range(0, n, block):  # each run of `block` windows is one block, shuffled inside
        part = order[k : k + block]
        assert max(part) - min(part) == block - 1 and part != sorted(part)
    assert [p[0] // block for p in (order[k : k + block] for k in range(0, n, block))] != list(range(n // block))
    assert list(EpochSampler(list(range(n)), seed=2, shuffle="block", block=block)) == order
    s.set_epoch(1)
    assert list(s) != order
    ragged = list(EpochSampler(list(range(2500)), seed=0, shuffle="block", block=1000))
    assert sorted(ragged) == list(range(2500))  # a short last block


def test_a_bad_shuffle_setting_is_one_line():
    with pytest.raises(ConfigError, match="data.shuffle must be one of"):
        EpochSampler(DATA, seed=0, shuffle="local")
    with pytest.raises(ConfigError, match="data.shuffle_block must be an integer >= 1"):
        EpochSampler(DATA, seed=0, shuffle="block", block=0)
    with pytest.raises(ConfigError, match="data.shuffle_block must be an integer >= 1 .got None"):
        EpochSampler(DATA, seed=0, shuffle="block")  # the block size comes from data.shuffle_block, no default


@pytest.mark.parametrize("n", [0, 5, 1027])
def test_evaluation_shards_cover_the_split_once(monkeypatch, n):
    parts = []
    for rank in range(4):
        as_rank(monkeypatch, rank, 4)
        parts.append(list(ShardSampler(range(n))))
    assert [x for p in parts for x in p] == list(range(n))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_stratified_sample_covers_articles_first():
    # Ten articles of 1..10 windows; article 4's windows in two segments.
    art = np.array([0, 1, 2, 3, 4, 4, 5, 6, 7, 8, 9])
    count = np.array([1, 2, 3, 4, 2, 3, 6, 7, 8, 9, 10])
    of_window = np.repeat(art, count)
    pick = stratified_sample(art, count, 10, seed=0)
    assert sorted(of_window[pick]) == list(range(10))  # one per article before any repeats
    pick2 = stratified_sample(art, count, 25, seed=0)
    counts = np.bincount(of_window[pick2], minlength=10)
    # Ranks fill in order: 10 firsts, then the 9 articles with a second window, then 6 of the 8
    # with a third (25 = 10 + 9 + 6): article 0 (1 window) once, article 1 twice, the rest 2 or 3.
    assert counts[0] == 1 and counts[1] == 2
    assert sorted(counts[2:]) == [2, 2] + [3] * 6
    assert len(set(pick2)) == 25
    assert np.array_equal(stratified_sample(art, count, 25, seed=0), pick2)
    assert not np.array_equal(stratified_sample(art, count, 25, seed=1), pick2)
    assert np.array_equal(stratified_sample(art, count, 1000, seed=0), np.arange(count.sum()))


def test_one_window_per_article_is_uniform_over_articles_and_within_each():
    art, count = np.array([0, 0, 1, 2]), np.array([3, 2, 4, 1])  # article 0: windows 0-4 in two segments
    seen = np.zeros(10)
    for seed in range(3000):
        pick = stratified_sample(art, count, 2, seed)
        assert len(set(np.repeat(art, count)[pick])) == 2
        seen[pick] += 1
    # Each article is picked in 2/3 of the draws, then each of its windows equally.
    per_window = 3000 * 2 / 3 / np.array([5] * 5 + [4] * 4 + [1])
    assert np.allclose(seen, per_window, rtol=0.12), (seen, per_window)


def test_sampling_few_windows_costs_the_segments_not_the_windows():
    # A split of 4e12 windows in four articles: the old per-window sort could not even allocate it.
    art, count = np.arange(4), np.full(4, 10**12)
    pick = stratified_sample(art, count, 3, seed=0)
    assert len(pick) == 3 and len(set((pick // 10**12).tolist())) == 3


def _by_window_key_sort(article_of_window: np.ndarray, n: int, seed: int) -> np.ndarray:
    """The per-window sampler (every window ranked by a random key inside its article)."""
    rng = np.random.default_rng(seed)
    key = rng.random(len(article_of_window))
    order = np.lexsort((key, article_of_window))
    art_sorted = article_of_window[order]
    first = np.flatnonzero(np.concatenate(([True], art_sorted[1:] != art_sorted[:-1])))
    rank = np.arange(len(order)) - np.repeat(first, np.diff(np.append(first, len(order))))
    return np.sort(order[np.lexsort((key[order], rank))[:n]])


@pytest.mark.parametrize("n", [4, 7, 19])
def test_more_windows_than_articles_draws_as_the_per_window_sort(n):
    # Above one window per article the picks are those of the per-window sort (same seed, same
    # windows), so the default recipe's mini-5CAT sample (1,000 windows from ~100 val articles) stands.
    art, count = np.array([0, 1, 1, 2]), np.array([5, 3, 4, 8])
    assert np.array_equal(stratified_sample(art, count, n, seed=3), _by_window_key_sort(np.repeat(art, count), n, seed=3))
