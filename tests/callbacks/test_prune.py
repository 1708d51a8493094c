"""TrialPruning (callbacks/prune.py): each epoch's monitored value goes to the Optuna trial, and the
run stops at the epoch boundary the pruner names, through `trainer.should_stop`."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from callbacks.prune import TrialPruning
from tests.helpers import TinyFit

optuna = pytest.importorskip("optuna")


class Scripted(TinyFit):
    """Logs `values[epoch]` as val/cos each epoch (and `sanity` during the sanity check)."""

    def __init__(self, values: list[float], sanity: float = 0.0, monitor: str = "val/cos") -> None:
        super().__init__()
        self.values, self.sanity, self.monitor = values, sanity, monitor
        self.layer = torch.nn.Linear(2, 1)
        self.epochs_trained: list[int] = []

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).pow(2).mean()

    def on_train_epoch_start(self) -> None:
        self.epochs_trained.append(self.current_epoch)

    def validation_step(self, batch, batch_idx):
        value = self.sanity if self.trainer.sanity_checking else self.values[self.current_epoch]
        self.log(self.monitor, value)


def fit(module: Scripted, trial, monitor: str = "val/cos", max_epochs: int = 5) -> TrialPruning:
    pruning = TrialPruning(trial, monitor)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=max_epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=1,
        callbacks=[pruning],
    )
    trainer.fit(module)
    return pruning


def new_trial(lower: float):
    """A trial of an in-memory study whose pruner prunes as soon as a report is below `lower`."""
    pruner = optuna.pruners.ThresholdPruner(lower=lower, n_warmup_steps=0)
    study = optuna.create_study(direction="maximize", storage=optuna.storages.InMemoryStorage(), pruner=pruner)
    return study, study.ask()


def test_reports_every_epoch_and_runs_to_the_end_when_never_pruned():
    values = [0.6, 0.7, 0.65, 0.8]
    study, trial = new_trial(lower=0.5)
    module = Scripted(values, sanity=0.0)  # the sanity check's 0.0 would prune: it must not be reported
    pruning = fit(module, trial, max_epochs=len(values))
    assert module.epochs_trained == [0, 1, 2, 3]
    assert (pruning.stop_reason, pruning.pruned_at) == (None, None)
    reported = study.trials[0].intermediate_values
    assert reported == pytest.approx(dict(enumerate(values)))


@pytest.mark.parametrize(("values", "at"), [([0.9, 0.8, 0.3, 0.9, 0.9], 2), ([0.1, 0.9, 0.9], 0), ([0.9, 0.6, 0.55, 0.49], 3)])
def test_stops_after_the_first_epoch_below_the_threshold(values, at):
    study, trial = new_trial(lower=0.5)
    module = Scripted(values)
    pruning = fit(module, trial, max_epochs=len(values))
    assert module.epochs_trained == list(range(at + 1))  # no epoch starts after the pruned one
    assert (pruning.stop_reason, pruning.pruned_at) == ("pruned", at)
    assert study.trials[0].intermediate_values == pytest.approx(dict(enumerate(values[: at + 1])))
    assert trial.should_prune()


def test_a_missing_monitor_reports_nothing_and_never_stops():
    study, trial = new_trial(lower=0.5)
    module = Scripted([0.1, 0.1, 0.1], monitor="val/other")
    pruning = fit(module, trial, monitor="val/cos", max_epochs=3)
    assert module.epochs_trained == [0, 1, 2] and pruning.stop_reason is None
    assert study.trials[0].intermediate_values == {}


def test_reports_the_monitored_metric_not_another():
    study, trial = new_trial(lower=0.5)
    module = Scripted([0.9, 0.2], monitor="ood/cos")
    pruning = fit(module, trial, monitor="ood/cos", max_epochs=2)
    assert pruning.pruned_at == 1 and study.trials[0].intermediate_values == pytest.approx({0: 0.9, 1: 0.2})
