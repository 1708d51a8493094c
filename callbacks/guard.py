"""SkipGuard: the P6b v2 safety check, skip the directional term for a batch with a negative mean cosine.

The decision is taken on the same batch (the module calls `gate` between computing the cosines
and weighting the term), from the batch means reduced across ranks, so every rank decides alike;
a skip sets the term's weight to 0 and keeps it in the graph.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import torch

log = logging.getLogger(__name__)


def skip_rule(pos: torch.Tensor, neg: torch.Tensor, pos_below: float, neg_below: float) -> torch.Tensor:
    """True when mean pos < pos_below or mean neg < neg_below (the seed: both thresholds 0)."""
    return (pos < pos_below) | (neg < neg_below)


class SkipGuard(L.Callback):
    """Installs the skip rule on the module and reports skips (counter, warning line)."""

    def __init__(self, pos_below: float, neg_below: float, print_every: int) -> None:
        self.pos_below = pos_below
        self.neg_below = neg_below
        self.print_every = print_every
        self.skips_total = 0
        self._strategy: Any = None
        self._window: torch.Tensor | None = None  # skips since the last report, on device
        self._last: torch.Tensor | None = None  # (pos, neg) of the newest skipped batch

    def gate(self, pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
        both = self._strategy.reduce(torch.stack([pos, neg]), reduce_op="mean")
        return skip_rule(both[0], both[1], self.pos_below, self.neg_below)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._strategy = trainer.strategy
        pl_module.skip_gate = self.gate

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        pl_module.skip_gate = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        terms = pl_module.last_terms
        skipped = terms.skipped
        if self._window is None:
            self._window = torch.zeros((), dtype=torch.long, device=skipped.device)
            self._last = torch.zeros(2, device=skipped.device)
        self._window += skipped.long()
        self._last = torch.where(skipped, torch.stack([terms.pos, terms.neg]), self._last)
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
                    "(%d batches skipped since last report, %d in total)", pos, neg, n, self.skips_total,
                )
            self._window.zero_()

    def state_dict(self) -> dict[str, Any]:
        pending = int(self._window) if self._window is not None else 0
        return {"skips_total": self.skips_total + pending}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skips_total = int(state_dict["skips_total"])
