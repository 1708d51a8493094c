"""FiniteModelCheckpoint: Lightning's ModelCheckpoint that never saves a model with a non-finite weight.

A NaN model scores val cos NaN, which ModelCheckpoint ranks as -inf: with no better checkpoint
yet it would be kept as "best". Skipping the save keeps the previous best (or none).
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

from lvm.runtime.checkpoints import finite_weights

log = logging.getLogger(__name__)


class FiniteModelCheckpoint(ModelCheckpoint):
    # The two methods every trigger (epoch, steps, time) calls once a save is due: the weights are
    # checked only then, not at every step.
    def _save_topk_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict[str, Any]) -> None:
        if self.save_top_k and self._finite(trainer):
            super()._save_topk_checkpoint(trainer, monitor_candidates)

    def _save_last_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict[str, Any]) -> None:
        if self.save_last and self._finite(trainer):
            super()._save_last_checkpoint(trainer, monitor_candidates)

    def _finite(self, trainer: L.Trainer) -> bool:
        if finite_weights(trainer):
            return True
        log.warning("Not saving a %s checkpoint at step %d: the model has non-finite weights", self.filename or "best", trainer.global_step)
        return False
