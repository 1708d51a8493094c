"""ShareCPUs: keep torch's thread count fitted to the CPUs other work leaves free (lvm/runtime/threads.py)."""

from __future__ import annotations

from typing import Any

import lightning as L

from lvm.runtime.threads import CPUShare


class ShareCPUs(L.Callback):
    """Re-shares at batch ends, from the training thread (a clock read per step; /proc every few seconds)."""

    def __init__(self, share: CPUShare) -> None:
        self.share = share

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.share.update()
