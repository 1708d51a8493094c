"""StepStatistics: the one owner of the per-step training statistics.

Each training step returns its statistics (`outputs["stats"]`, names in lvm.module.STEP_STATS);
this callback buffers them on device and flushes them (lvm/steplog.py: every `flush_every` steps,
before each validation, at the epoch's and the fit's end) to the loggers, each row at its own
step, and to the subscribers it was built with (the guard's in-training detectors). Unflushed rows
ride in checkpoints, so a resumed run logs and flushes at the same steps as the uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import lightning as L

from lvm.steplog import StepLog


class StepStatistics(L.Callback):
    def __init__(self, names: Sequence[str], flush_every: int,
                 subscribers: Sequence[Callable[[list[int], list[dict[str, float]]], None]] = ()) -> None:
        self.buffer = StepLog([f"train/{n}" for n in names], flush_every, subscribers)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.buffer.record(outputs["step"], outputs["stats"], trainer.loggers)

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
