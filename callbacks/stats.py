"""StepStatistics: the one owner of the per-step training statistics.

Each training step returns its statistics (`outputs["stats"]`, names in lvm.module.STEP_STATS);
this callback buffers them on device and flushes them (lvm/guard/steplog.py: every `flush_every` steps,
before each validation, at the epoch's and the fit's end) to the loggers, each row at its own
step, and to the subscribers it was built with (the guard's in-training detectors). Unflushed rows
ride in checkpoints, so a resumed run logs and flushes at the same steps as the uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch

from lvm.guard.steplog import StepLog


class StepStatistics(L.Callback):
    def __init__(
        self,
        names: Sequence[str],
        flush_every: int,
        subscribers: Sequence[Callable[[list[int], list[dict[str, float]]], None]] = (),
        extra: Sequence[tuple[Sequence[str], Callable[[], torch.Tensor]]] = (),
    ) -> None:
        """`extra`: (names, source) of statistics another callback computes each step after the
        module's (callbacks/spike.py: the gradient norm), appended to the row."""
        self.extra = list(extra)
        self.buffer = StepLog([f"train/{n}" for n in (*names, *(n for ns, _ in self.extra for n in ns))], flush_every, subscribers)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        row = outputs["stats"]
        if self.extra:
            row = torch.cat([row, *(source().to(row.device, row.dtype) for _, source in self.extra)])
        self.buffer.record(outputs["step"], row, trainer.loggers)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning validates before on_train_epoch_end: the epoch's last partial window goes out
        # now, so that a decision at validation end has seen every step of the epoch.
        if not trainer.sanity_checking:
            self.buffer.flush(trainer.loggers)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.buffer.flush(trainer.loggers)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.buffer.flush(trainer.loggers)

    def state_dict(self) -> dict[str, Any]:
        return self.buffer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.buffer.load_state_dict(state_dict)
