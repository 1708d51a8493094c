"""The samplers: a global order that depends on (seed, epoch) only, resumable mid-epoch, shared
out across ranks without a window twice."""

from __future__ import annotations

import pytest
import torch

from lvm.data import sampler as sampler_module
from lvm.data.sampler import EpochSampler, ShardSampler, epoch_seed
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
