"""The training sampler: a shuffle that is a pure function of (seed, epoch), resumable mid-epoch.

Epoch e's order is drawn from a generator seeded with (seed, e) alone, so a run restarted at any
point replays exactly the order the uninterrupted run used; `resume` skips the windows an
interrupted epoch already trained on.
"""

from __future__ import annotations

from collections.abc import Iterator, Sized

import numpy as np
import torch
from torch.utils.data import RandomSampler

# Indices handed out per slice: the permutation stays a tensor (torch's RandomSampler turns the
# whole of it into a Python list, bytes per window that `make bench`'s data_mem figure counts).
_SLICE = 4096


def epoch_seed(seed: int, epoch: int) -> int:
    """The generator seed of epoch `epoch` of a run seeded with `seed` (independent streams)."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1, np.uint64)[0] >> 1)


class EpochSampler(RandomSampler):
    """A RandomSampler (so Lightning swaps in a DistributedSampler under DDP, as usual) whose
    permutation depends only on (seed, epoch). Lightning calls `set_epoch` before each epoch."""

    def __init__(self, data_source: Sized, seed: int) -> None:
        super().__init__(data_source)
        self.seed = seed
        self.epoch = 0
        self._skip = 0  # windows of `epoch` already trained on, skipped by the next iteration

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self._skip = epoch, 0

    def resume(self, epoch: int, position: int) -> None:
        """Start the next iteration at window `position` of epoch `epoch`'s order (the next
        epoch's start when the epoch is complete)."""
        if position >= len(self.data_source):
            epoch, position = epoch + 1, 0
        self.epoch, self._skip = epoch, position

    def __iter__(self) -> Iterator[int]:
        gen = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        perm = torch.randperm(len(self.data_source), generator=gen)[self._skip :]
        self._skip = 0
        for part in perm.split(_SLICE):
            yield from part.tolist()
