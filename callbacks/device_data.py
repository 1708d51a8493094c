"""DeviceData: the device-resident data path (`data.on_device`).

The store's vectors and each split's window index arrays are copied to the training device once,
when the fit starts; the loaders then hand out only window indices ({"index": [B]}, lvm/data/
store.py WindowIndex), and each batch is gathered on the device, one index per tensor: no host
gather, no host-to-device copy of vectors per step. The sampler is the host path's (the same
seed gives the same batches, and exact resume and DDP's per-rank shards work unchanged).

It must be the first callback: the others (fault injection, the spike check) read the gathered
batch in their own on_train_batch_start.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import torch

from lvm.data.store import DeviceWindows, Windows
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


class DeviceData(L.Callback):
    def __init__(self, train: Windows, evals: Sequence[Windows]) -> None:
        """`evals`: the windows of the validation loaders, in their order (dataloader_idx)."""
        self.host: Mapping[str, Windows] = {"train": train, **{str(i): w for i, w in enumerate(evals)}}
        self.on: dict[str, DeviceWindows] = {}

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        device = pl_module.device
        vectors = self.host["train"].store.vectors.to(device)  # one copy: every split views one store
        self.on = {name: w.on(device, vectors) for name, w in self.host.items()}

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        batch.update(self.on["train"].gather(batch.pop("index")))

    def on_validation_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        batch.update(self.on[str(dataloader_idx)].gather(batch.pop("index")))
