"""FiniteModelCheckpoint: Lightning's ModelCheckpoint that never saves a model with a non-finite weight.

A NaN model scores val cos NaN, which ModelCheckpoint ranks as -inf: with no better checkpoint
yet it would be kept as "best". Skipping the save keeps the previous best (or none).

A file it finds under its name is replaced, not kept beside a `-v1` copy (Lightning's version
counter off): a resumed run writes again what the killed run wrote after its last.ckpt.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

from lvm.runtime.checkpoints import finite_weights

log = logging.getLogger(__name__)


class FiniteModelCheckpoint(ModelCheckpoint):
    def __init__(self, *args: Any, enable_version_counter: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, enable_version_counter=enable_version_counter, **kwargs)

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
