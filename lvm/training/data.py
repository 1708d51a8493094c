"""A run's batches: its loaders, as a Lightning DataModule, and the device-resident path (`data.on_device`).

On the device path the store's vectors and each split's window segments are copied to the
training device once, at the first batch; the loaders hand out only window indices
({"index": [B]}, lvm/data/store.py WindowIndex), and each batch is gathered there, one index per
tensor, in `on_after_batch_transfer`: no host gather, no host-to-device copy of vectors per step.
Lightning runs that hook before any callback's batch hooks, so every callback sees the gathered
batch wherever it sits in the list. The sampler is the host path's: the same seed gives the same
batches, and exact resume and DDP's per-rank shards work unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from lvm.data.sampler import EpochSampler, ShardSampler
from lvm.data.store import DeviceWindows, WindowIndex, Windows, collate_batch
from lvm.runtime.errors import ConfigError


def keeps_data_on_device(setting: Any, share: float, store_bytes: int, device: torch.device) -> bool:
    """Whether data.on_device holds for a store of `store_bytes` on `device`: true, false, or auto
    (on an accelerator whose memory the store fits in `share` of; off on the CPU, where the host
    path already reads the vectors in place)."""
    if setting not in (True, False, "auto"):
        raise ConfigError(f"data.on_device must be true, false or auto (got {setting!r})")
    if not (isinstance(share, (int, float)) and 0 < share <= 1):
        raise ConfigError(f"data.device_share must be in (0, 1] (got {share!r})")
    if setting != "auto":
        return bool(setting)
    if device.type != "cuda":
        return False
    return store_bytes <= share * torch.cuda.get_device_properties(device).total_memory


def make_loader(
    windows: Windows,
    batch_size: int,
    shuffle: str | None,
    num_workers: int,
    seed: int,
    on_device: bool = False,
    shuffle_block: int | None = None,
) -> DataLoader:
    """Batches of `windows`: shuffled by (seed, epoch) alone with `shuffle` global or block, this
    rank's share of each global batch (lvm/data/sampler.py; `shuffle_block`: data.shuffle_block,
    needed by block); in order, this rank's range, without.
    `on_device`: batches of window indices, for WindowData to gather on the device."""
    return DataLoader(
        WindowIndex(windows) if on_device else windows,
        batch_size=batch_size,
        sampler=EpochSampler(windows, seed, shuffle, shuffle_block) if shuffle else ShardSampler(windows),
        num_workers=num_workers,
        collate_fn=collate_batch,
        persistent_workers=num_workers > 0,
        # Its own generator: starting an iterator must not draw from the global RNG, or a resumed
        # run's dropout masks would differ from the uninterrupted run's.
        generator=torch.Generator().manual_seed(seed),
    )


class WindowData(L.LightningDataModule):
    """A run's windows as Lightning's DataModule: the train loader (`make_loader`'s shuffle), one
    in-order loader per evaluation split (dataloader_idx order) and, on the device path, the
    gather of each batch."""

    def __init__(
        self,
        train: Windows,
        evals: Sequence[Windows],
        batch_size: int,
        eval_batch_size: int,
        shuffle: str,
        shuffle_block: int | None,
        num_workers: int,
        seed: int,
        on_device: bool,
    ) -> None:
        super().__init__()
        self.windows = {"train": train, **{str(i): w for i, w in enumerate(evals)}}
        self.train = make_loader(train, batch_size, shuffle, num_workers, seed, on_device, shuffle_block)
        self.evals = [make_loader(w, eval_batch_size, None, num_workers, seed, on_device) for w in evals]
        self.on_device = on_device
        self.on: dict[str, DeviceWindows] = {}

    def train_dataloader(self) -> DataLoader:
        return self.train

    def val_dataloader(self) -> list[DataLoader]:
        return self.evals

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if not self.on_device:
            return batch
        index = batch["index"]
        if not self.on:  # one copy of the store on the device: every split views it
            vectors = self.windows["train"].store.vectors.to(index.device)
            self.on = {name: w.on(index.device, vectors) for name, w in self.windows.items()}
        split = "train" if self.trainer is not None and self.trainer.training else str(dataloader_idx)
        return self.on[split].gather(index)
