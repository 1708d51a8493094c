"""FiniteModelCheckpoint: Lightning's ModelCheckpoint that never saves a model with a non-finite weight.

A NaN model scores val cos NaN, which ModelCheckpoint ranks as -inf: with no better checkpoint
yet it would be kept as "best". Skipping the save keeps the previous best (or none).

A file it finds under its name is replaced, not kept beside a `-v1` copy (Lightning's version
counter off): a resumed run writes again what the killed run wrote after its last.ckpt.

A run directory moved or copied elsewhere keeps its best: Lightning forgets the scores and files it
ranked when the checkpoint's dirpath is not its own, so the first validation after the resume would
become "best" beside the real one. Where every file it ranked lies in its own dirpath under the
same name, their paths are moved there instead.
"""

from __future__ import annotations

import logging
from pathlib import Path
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

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        old, ranked = state_dict.get("dirpath"), state_dict.get("best_k_models", {})
        if old and self.dirpath and old != self.dirpath and ranked and all(self._here(p).is_file() for p in ranked):
            moved = {**state_dict, "dirpath": self.dirpath, "best_k_models": {str(self._here(p)): v for p, v in ranked.items()}}
            for key in ("best_model_path", "kth_best_model_path", "last_model_path"):
                if state_dict.get(key):
                    moved[key] = str(self._here(state_dict[key]))
            state_dict = moved
            log.info("Checkpoints ranked in %s are in %s under the same names: ranked there", old, self.dirpath)
        super().load_state_dict(state_dict)

    def _here(self, path: str) -> Path:
        return Path(self.dirpath) / Path(path).name
