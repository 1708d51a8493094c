"""StepStatistics: the one owner of the per-step training statistics.

Each training step returns its statistics (`outputs["stats"]`, names in lvm.module.STEP_STATS);
this callback buffers them on device and flushes them (lvm/guard/steplog.py: every `flush_every` steps,
before each validation, at the epoch's and the fit's end) to the loggers, each row at its own
step, and to the subscribers it was built with (the guard: `RowsSubscriber`), inside its own hook,
so a subscriber's decision on a flush never depends on where the two callbacks sit in the trainer's
list. Unflushed rows ride in checkpoints, so a resumed run logs and flushes at the same steps as the
uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import lightning as L
import torch

from lvm.guard.steplog import FlushedRows, StepLog


class RowsSubscriber(Protocol):
    def on_rows(self, trainer: L.Trainer, pl_module: L.LightningModule, flushed: FlushedRows, in_training: bool) -> None:
        """Every flushed row, once, in step order. `in_training`: flushed at a training batch's end
        (a decision may act now); otherwise before validation or at an epoch's or the fit's end."""


class StepStatistics(L.Callback):
    def __init__(
        self,
        names: Sequence[str],
        flush_every: int,
        subscribers: Sequence[RowsSubscriber] = (),
        extra: Sequence[tuple[Sequence[str], Callable[[], torch.Tensor]]] = (),
    ) -> None:
        """`extra`: (names, source) of statistics another callback computes each step after the
        module's (callbacks/spike.py: the gradient norm), appended to the row."""
        self.extra = list(extra)
        self.subscribers = list(subscribers)
        self.buffer = StepLog([f"train/{n}" for n in (*names, *(n for ns, _ in self.extra for n in ns))], flush_every)

    def _hand_out(self, trainer: L.Trainer, pl_module: L.LightningModule, flushed: FlushedRows | None, in_training: bool) -> None:
        if flushed is not None:
            for subscriber in self.subscribers:
                subscriber.on_rows(trainer, pl_module, flushed, in_training)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        row = outputs["stats"]
        if self.extra:
            row = torch.cat([row, *(source().to(row.device, row.dtype) for _, source in self.extra)])
        self._hand_out(trainer, pl_module, self.buffer.record(outputs["step"], row, trainer.loggers), in_training=True)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning validates before on_train_epoch_end: the epoch's last partial window goes out
        # now, so that a decision at validation end has seen every step of the epoch.
        if not trainer.sanity_checking:
            self._hand_out(trainer, pl_module, self.buffer.flush(trainer.loggers), in_training=False)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._hand_out(trainer, pl_module, self.buffer.flush(trainer.loggers), in_training=False)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._hand_out(trainer, pl_module, self.buffer.flush(trainer.loggers), in_training=False)

    def state_dict(self) -> dict[str, Any]:
        return self.buffer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.buffer.load_state_dict(state_dict)
