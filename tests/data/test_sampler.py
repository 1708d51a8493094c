"""The training sampler: a permutation that depends on (seed, epoch) only, resumable mid-epoch."""

from __future__ import annotations

import torch
from torch.utils.data import RandomSampler

from lvm.data.sampler import EpochSampler, epoch_seed

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
    assert isinstance(s, RandomSampler)  # Lightning swaps in a DistributedSampler under DDP


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
