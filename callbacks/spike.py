"""SpikeCheck: gradient-norm spikes against a rolling window, and a dropped update for a spiking or
non-finite step, decided on the device (OLMo-core's approach: no host sync per step).

After backward (`on_before_optimizer_step`, the gradients already averaged over ranks, so every rank
computes the same norm and takes the same decision without another collective) it computes the
total gradient norm and its z-score against the last `window` steps. A spike is a norm both
improbable (more than `sigma` standard deviations above the window's mean) and large (at least
`min_ratio` times that mean): a smooth run's window is so narrow that a healthy 1.4x step read z 6.8
(a ramp stage's first steps, measured on a control), while every fault drill's spike is >= 2.7x.
With `drop` on, a spiking or non-finite step gets the optimizer's 0/1 factor 0 (lvm/model/optim.py
DroppableAdamW): weights, moments and step count stay as they were. Each step's `grad_norm`,
`grad_z` and `update_dropped` ride in the per-step statistics (callbacks/stats.py), so the guard
sees and records every dropped update at the next flush; `dropped_total` counts them for the
run's record.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch

from lvm.model.optim import DroppableAdamW, RollingStat, grad_norm
from lvm.runtime.errors import finite

SPIKE_STATS = ("grad_norm", "grad_z", "update_dropped")


class SpikeCheck(L.Callback):
    """Built from `guard.spike`; the run adds `clip`, its gradient-clipping norm, which this callback
    then applies with the norm it computes anyway (the run hands Lightning's clipping over to it)."""

    def __init__(self, sigma: float, min_ratio: float, window: int, min_history: int, drop: bool, clip: float | None = None) -> None:
        if not (finite(sigma) and sigma > 0 and finite(min_ratio) and min_ratio >= 1):
            raise ValueError(f"guard.spike needs sigma > 0 and min_ratio >= 1 (got {sigma}, {min_ratio})")
        if not (isinstance(window, int) and isinstance(min_history, int) and 2 <= min_history <= window):
            raise ValueError(f"guard.spike needs integers 2 <= min_history <= window (got {min_history}, {window})")
        self.sigma, self.min_ratio, self.min_history, self.drop = sigma, min_ratio, min_history, drop
        self.clip = clip  # clip the gradients to this total norm after judging them (Lightning's clipping, with this norm)
        self.norms = RollingStat(window)
        self.row: torch.Tensor | None = None  # this step's SPIKE_STATS, on device
        self._full, self._short = 0, False  # the largest batch seen; whether this one is smaller
        self._params: list[torch.nn.Parameter] | None = None
        self._dropped: torch.Tensor | None = None  # updates dropped so far, on device (read at saves and the end)
        self._dropped_before = 0  # ... in the run this one resumes

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        # An epoch's short remainder batch has a larger gradient norm by nature (fewer windows to
        # average over: measured z ~17-23 for a batch of 1): its norm is neither judged nor kept.
        n = len(batch["target"])
        self._full = max(self._full, n)
        self._short = n < self._full

    def after_rollback(self, step: int) -> None:
        """A rollback restored earlier weights, whose gradients the history does not describe: it
        starts again (callbacks/rollback.py RollbackListener; docs/guard.md measures the false drops without)."""
        self.norms = RollingStat(self.norms.window)

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer) -> None:
        if self._params is None:  # walking the module's parameters costs more than the norm itself (measured)
            self._params = [p for p in pl_module.parameters() if p.requires_grad]
        norm = grad_norm(self._params)
        if self._short:
            z = ratio = torch.zeros_like(norm)
        else:
            z, ratio = self.norms.score(norm, self.min_history)
        bad = ~torch.isfinite(norm) | ((z > self.sigma) & (ratio >= self.min_ratio))
        dropped = bad & self.drop
        if self.drop:
            if not isinstance(optimizer, DroppableAdamW):
                raise TypeError("guard.spike.drop needs lvm.model.optim.DroppableAdamW (built by the module when it is on)")
            optimizer.keep = (~dropped).float()
            self._dropped = dropped.long() if self._dropped is None else self._dropped + dropped
        if not self._short:
            self.norms.push(norm)
        if self.clip is not None:  # what Lightning's clip_grad_norm_ would do, from the same norm
            torch.nn.utils.clip_grads_with_norm_(self._params, self.clip, norm)
        self.row = torch.stack([norm, z, dropped.float()])

    def stats(self) -> torch.Tensor:
        """The newest step's SPIKE_STATS (zeros before the first optimizer step)."""
        return self.row if self.row is not None else torch.zeros(len(SPIKE_STATS))

    def dropped_total(self) -> int:
        """Updates dropped in this run so far, those of the run it resumes included (a host sync)."""
        return self._dropped_before + (int(self._dropped) if self._dropped is not None else 0)

    def state_dict(self) -> dict[str, Any]:
        return {"norms": self.norms.state_dict(), "full_batch": self._full, "dropped": self.dropped_total()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.norms.load_state_dict(state_dict["norms"])
        self._full = state_dict["full_batch"]
        self._dropped_before, self._dropped = state_dict["dropped"], None
