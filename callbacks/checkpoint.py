"""FiniteModelCheckpoint: Lightning's ModelCheckpoint that never saves a model with a non-finite weight.

A NaN model scores val cos NaN, which ModelCheckpoint ranks as -inf: with no better checkpoint
yet it would be kept as "best". Skipping the save keeps the previous best (or none).
"""

from __future__ import annotations

import logging

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

from lvm.checkpoints import finite_weights

log = logging.getLogger(__name__)


class FiniteModelCheckpoint(ModelCheckpoint):
    def _should_skip_saving_checkpoint(self, trainer: L.Trainer) -> bool:
        # The one hook every ModelCheckpoint trigger consults before it saves (epoch, steps, time).
        if super()._should_skip_saving_checkpoint(trainer):
            return True
        if finite_weights(trainer):
            return False
        log.warning("Not saving a %s checkpoint at step %d: the model has non-finite weights",
                    self.filename or "best", trainer.global_step)
        return True
