"""SkipReport: counts the batches whose directional term the v2 skip rule zeroed, and says so.

The rule itself is part of the loss (lvm/model/losses.py `SkipRule`, decided on the batch means averaged
over ranks); this callback reads each step's statistics from `outputs` and keeps the count.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch

log = logging.getLogger(__name__)


class SkipReport(L.Callback):
    """The count (`guard/skips_total`, kept in checkpoints) and the `[P6b WARNING]` line every
    `print_every` steps; one host sync per report."""

    def __init__(self, stat_names: Sequence[str], print_every: int) -> None:
        self.index = [list(stat_names).index(n) for n in ("skipped", "pos", "neg")]
        self.print_every = print_every
        self.skips_total = 0
        self._window: torch.Tensor | None = None  # skips since the last report, on device
        self._last: torch.Tensor | None = None  # (pos, neg) of the newest skipped batch

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        skipped, pos, neg = outputs["stats"][self.index]
        skipped = skipped > 0
        if self._window is None:
            self._window = torch.zeros((), dtype=torch.long, device=skipped.device)
            self._last = torch.zeros(2, device=skipped.device)
        self._window += skipped.long()
        self._last = torch.where(skipped, torch.stack([pos, neg]), self._last)
        step = trainer.global_step
        if self.print_every and step % self.print_every == 0:
            self._report(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._report(trainer)
        pl_module.log("guard/skips_total", float(self.skips_total), on_step=False, on_epoch=True)

    def _report(self, trainer: L.Trainer) -> None:
        """Fold the on-device window count into the total; one host sync per report."""
        if self._window is None:
            return
        n = int(self._window)
        if n:
            self.skips_total += n
            pos, neg = self._last.tolist()
            if trainer.is_global_zero:
                log.warning(
                    "[P6b WARNING] Negative cosines detected (pos=%.3f, neg=%.3f), skipping directional loss "
                    "(%d batches skipped since last report, %d in total)",
                    pos,
                    neg,
                    n,
                    self.skips_total,
                )
            self._window.zero_()

    def state_dict(self) -> dict[str, Any]:
        pending = int(self._window) if self._window is not None else 0
        return {"skips_total": self.skips_total + pending}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skips_total = int(state_dict["skips_total"])
