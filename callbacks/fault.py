"""FaultInjection: poison the weights with NaN at given steps, to drill the guard (tests, DDP drills)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import lightning as L
import torch


class FaultInjection(L.Callback):
    """Sets every weight to NaN at the start of the given global steps, on rank 0 only (the
    gradient all-reduce then carries the fault to the other ranks, as a real one would)."""

    def __init__(self, nan_at_steps: Iterable[int]) -> None:
        self.steps = set(nan_at_steps)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if trainer.global_step in self.steps and trainer.is_global_zero:
            with torch.no_grad():
                for p in pl_module.parameters():
                    p.fill_(float("nan"))
