"""TrialPruning: a search trial (lvm.tools.search) reports each epoch's val cosine to its Optuna trial and
stops at that epoch boundary when the pruner says so: cleanly, through `trainer.should_stop`, so
the run ends with its checkpoints, metrics and results.json (status `stopped: pruned`).

The decision is reduced across ranks (any rank's "prune" stops every rank), as every stop in lvm is.
"""

from __future__ import annotations

from typing import Any

import lightning as L


class TrialPruning(L.Callback):
    def __init__(self, trial: Any, monitor: str) -> None:
        self.trial, self.monitor = trial, monitor
        self.stop_reason: str | None = None  # "pruned" once the pruner stopped the run
        self.pruned_at: int | None = None  # the epoch (0-based) it was pruned after

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or self.monitor not in trainer.callback_metrics:
            return
        epoch = trainer.current_epoch
        prune = False
        if trainer.is_global_zero:
            self.trial.report(float(trainer.callback_metrics[self.monitor]), epoch)
            prune = bool(self.trial.should_prune())
        if trainer.strategy.reduce_boolean_decision(prune, all=False):
            trainer.should_stop = True
            self.stop_reason, self.pruned_at = "pruned", epoch
