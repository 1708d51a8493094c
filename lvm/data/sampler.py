"""The samplers: one global order per epoch, a pure function of (seed, epoch), shared by the ranks.

Epoch e's order is drawn from generators seeded with (seed, e) alone, so a run restarted at any
point replays exactly the order the uninterrupted run used. Under DDP every rank draws the same
global order and takes every world-th window of it: rank r's batch j is its share of global batch
j (the ranks' shares are disjoint, and equal in size so that every rank takes the same steps).
`resume` skips the windows the interrupted epoch already trained on, counted in the global order,
so the loader workers may change on resume (the order is drawn in the main process).

`shuffle: block` permutes blocks of `block` consecutive windows, then the windows inside each
block: reads from a store on disk stay within one block's rows at a time (mostly sequential).

Rank and world come from torch.distributed when the order is drawn (Lightning sets up the process
group before the first epoch); the trainer runs with `use_distributed_sampler: false`, so Lightning
keeps these samplers instead of its DistributedSampler (which pads with repeated windows).
"""

from __future__ import annotations

from collections.abc import Iterator, Sized

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from lvm.runtime.errors import ConfigError

SHUFFLES = ("global", "block")
# Indices handed out per slice: the permutation stays a tensor (a Python list of every window's
# index costs bytes per window that `make bench`'s data_mem figure counts).
_SLICE = 4096


def epoch_seed(seed: int, epoch: int, *more: int) -> int:
    """The generator seed of epoch `epoch` of a run seeded with `seed` (independent streams;
    `more` names a stream inside the epoch, e.g. a block)."""
    return int(np.random.SeedSequence([seed, epoch, *more]).generate_state(1, np.uint64)[0] >> 1)


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of ranks (0, 1 outside a process group)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def check_shuffle(shuffle: str, block: int | None) -> None:
    """`block` (data.shuffle_block) must be given for shuffle=block and valid wherever given."""
    if shuffle not in SHUFFLES:
        raise ConfigError(f"data.shuffle must be one of {list(SHUFFLES)} (got {shuffle!r})")
    if (block is not None or shuffle == "block") and not (isinstance(block, int) and not isinstance(block, bool) and block >= 1):
        raise ConfigError(f"data.shuffle_block must be an integer >= 1 (got {block!r})")


class EpochSampler(Sampler[int]):
    """This rank's share of epoch `epoch`'s global order. Lightning calls `set_epoch` before each
    epoch."""

    def __init__(self, data_source: Sized, seed: int, shuffle: str = "global", block: int | None = None) -> None:
        check_shuffle(shuffle, block)
        self.data_source = data_source
        self.seed, self.shuffle, self.block = seed, shuffle, block
        self.epoch = 0
        self._skip = 0  # windows of `epoch`'s global order already trained on (every rank's)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self._skip = epoch, 0

    def resume(self, epoch: int, position: int) -> None:
        """Start the next iteration at window `position` of epoch `epoch`'s global order (the next
        epoch's start when the epoch is complete)."""
        if position >= len(self.data_source):
            epoch, position = epoch + 1, 0
        self.epoch, self._skip = epoch, position

    def __len__(self) -> int:
        return len(self.data_source) // rank_and_world()[1]

    def global_order(self) -> Iterator[torch.Tensor]:
        """Epoch `epoch`'s order of every window, in slices."""
        n = len(self.data_source)
        gen = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        if self.shuffle == "global":
            yield from torch.randperm(n, generator=gen).split(_SLICE)
            return
        blocks = -(-n // self.block)
        for b in torch.randperm(blocks, generator=gen).tolist():
            start = b * self.block
            size = min(self.block, n - start)
            inner = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch, b))
            yield start + torch.randperm(size, generator=inner)

    def __iter__(self) -> Iterator[int]:
        rank, world = rank_and_world()
        skip, self._skip = self._skip, 0
        # Rank r takes global positions skip + r + world * i, for i < (windows left) // world.
        count = (len(self.data_source) - skip) // world
        first, last = skip + rank, skip + rank + world * (count - 1)
        seen = 0  # global positions before the current slice
        for part in self.global_order():
            lo, hi = seen, seen + len(part)
            seen = hi
            if hi <= first:
                continue
            if lo > last:
                return
            start = first + -(-(lo - first) // world) * world if lo > first else first
            yield from part[start - lo : min(hi, last + 1) - lo : world].tolist()


class ShardSampler(Sampler[int]):
    """Evaluation in order: rank r takes the r-th of `world` contiguous, near-equal ranges (no
    window twice, none left out, so metrics reduced over the ranks are those of the whole split)."""

    def __init__(self, data_source: Sized) -> None:
        self.data_source = data_source

    def _range(self) -> tuple[int, int]:
        rank, world = rank_and_world()
        n = len(self.data_source)
        return rank * n // world, (rank + 1) * n // world

    def __len__(self) -> int:
        lo, hi = self._range()
        return hi - lo

    def __iter__(self) -> Iterator[int]:
        return iter(range(*self._range()))


def stratified_sample(segment_article: np.ndarray, segment_count: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Indices of `n` windows covering as many articles as possible: every article once before any
    twice, uniform within an article. The windows come as segments (article number and window count
    of each, an article's segments consecutive), so up to one window per article costs
    O(segments + n), not O(windows)."""
    segment_count = np.asarray(segment_count, np.int64)
    total = int(segment_count.sum())
    if n >= total:
        return np.arange(total)
    new = np.concatenate(([True], segment_article[1:] != segment_article[:-1]))
    article_first_window = (np.cumsum(segment_count) - segment_count)[new]
    article_windows = np.add.reduceat(segment_count, np.flatnonzero(new))
    rng = np.random.default_rng(seed)
    if n <= len(article_windows):
        pick = rng.choice(len(article_windows), n, replace=False)
        return np.sort(article_first_window[pick] + rng.integers(article_windows[pick]))
    # More windows than articles: rank every window within its article by a random key, take ranks in order.
    article_of_window = np.repeat(np.cumsum(new) - 1, segment_count)
    key = rng.random(total)
    order = np.lexsort((key, article_of_window))
    rank_in_article = np.arange(total) - np.repeat(article_first_window, article_windows)
    pick = np.lexsort((key[order], rank_in_article))[:n]
    return np.sort(order[pick])
