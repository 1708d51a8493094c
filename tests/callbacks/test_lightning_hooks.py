"""The Lightning internals lvm leans on, pinned: an upgrade that changes one fails here first.

- FiniteModelCheckpoint overrides ModelCheckpoint's private `_save_topk_checkpoint` and
  `_save_last_checkpoint`: every trigger (epoch end, every N steps, save_last) must go through them.
- ExactResume reads `fit_loop.epoch_loop.batch_progress.is_last_batch` (never save at an epoch's
  last batch) and `fit_loop.restarting`, and takes the epoch scheduler step Lightning skips at the
  end of an epoch it restarted mid-way; results.json counts `fit_loop.epoch_progress.current.processed`.
- EpochEndSave writes the epoch's last.ckpt after the best checkpoint's epoch-end save: Lightning
  runs Checkpoint callbacks after all others, in their given order.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Checkpoint
from torch.utils.data import DataLoader, TensorDataset

from callbacks import FiniteModelCheckpoint

BATCHES = 4  # per epoch


class Toy(L.LightningModule):
    """A linear layer on fixed data, with lvm's epoch scheduler (ReduceLROnPlateau; its last_epoch
    counts its steps)."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        loss = self.layer(batch[0]).pow(2).mean()
        self.log("loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.layer(batch[0]).pow(2).mean())

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.01)
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": plateau, "interval": "epoch", "monitor": "val_loss"}}


def loader() -> DataLoader:
    return DataLoader(TensorDataset(torch.arange(2.0 * BATCHES).reshape(BATCHES, 2)), batch_size=1)


def trainer(tmp_path, callbacks, epochs=2) -> L.Trainer:
    return L.Trainer(
        default_root_dir=tmp_path,
        max_epochs=epochs,
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
    )


class Poison(L.Callback):
    """NaN weights from the first batch on: no checkpoint may be written, whatever the trigger."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        with torch.no_grad():
            pl_module.layer.weight.fill_(float("nan"))


@pytest.mark.parametrize(
    "trigger",
    [
        {"monitor": "val_loss", "save_top_k": 1},  # at the validation's end
        {"every_n_train_steps": 2, "save_top_k": -1},  # mid-epoch, every N steps
        {"save_on_train_epoch_end": True, "save_top_k": -1},  # at the train epoch's end
        {"save_last": True, "save_top_k": 0},  # last.ckpt
    ],
    ids=["val_end", "every_n_steps", "train_epoch_end", "save_last"],
)
def test_every_checkpoint_trigger_goes_through_the_two_overridden_methods(trigger, tmp_path):
    healthy = FiniteModelCheckpoint(dirpath=tmp_path / "healthy", **trigger)
    trainer(tmp_path, [healthy]).fit(Toy(), loader(), loader())
    assert list((tmp_path / "healthy").glob("*.ckpt")), "the trigger saves a healthy model"
    poisoned = FiniteModelCheckpoint(dirpath=tmp_path / "nan", **trigger)
    trainer(tmp_path, [Poison(), poisoned]).fit(Toy(), loader(), loader())
    assert not list((tmp_path / "nan").glob("*.ckpt")), "a save bypassed _save_topk_checkpoint/_save_last_checkpoint"


class Record(L.Callback):
    """What ExactResume reads of the fit loop, and a mid-epoch checkpoint after `save_at` steps."""

    def __init__(self, save_at: int | None = None, path=None) -> None:
        self.save_at, self.path = save_at, path
        self.last_batch: list[bool] = []
        self.restarting: bool | None = None

    def on_train_start(self, trainer, pl_module):
        self.restarting = trainer.fit_loop.restarting

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.last_batch.append(trainer.fit_loop.epoch_loop.batch_progress.is_last_batch)
        if trainer.global_step == self.save_at:
            trainer.save_checkpoint(self.path)


def test_the_fit_loop_state_exact_resume_reads(tmp_path):
    whole, record = Toy(), Record(save_at=BATCHES + 1, path=tmp_path / "mid.ckpt")
    t = trainer(tmp_path, [record])
    t.fit(whole, loader(), loader())
    assert record.last_batch == [i % BATCHES == BATCHES - 1 for i in range(2 * BATCHES)]
    assert record.restarting is False and t.fit_loop.epoch_progress.current.processed == 2
    assert t.lr_scheduler_configs[0].scheduler.last_epoch == 2  # one step per epoch end

    # Resumed one batch into epoch 1: Lightning restarts that epoch and, at its end, does not step
    # the plateau scheduler (ExactResume takes that step itself, callbacks/resume.py).
    resumed_record = Record()
    resumed = trainer(tmp_path, [resumed_record])
    resumed.fit(Toy(), loader(), loader(), ckpt_path=tmp_path / "mid.ckpt")
    assert resumed_record.restarting is True
    assert resumed_record.last_batch == [False] * (BATCHES - 2) + [True]
    assert resumed.fit_loop.epoch_progress.current.processed == 2
    assert resumed.lr_scheduler_configs[0].scheduler.last_epoch == 1


class Saved(L.Callback):
    """How many files `best` holds when this callback's epoch end runs."""

    def __init__(self, best: FiniteModelCheckpoint) -> None:
        self.best, self.seen = best, []

    def on_train_epoch_end(self, trainer, pl_module):
        self.seen.append(len(self.best.best_k_models))


class SavedAsCheckpoint(Saved, Checkpoint):
    pass


def test_checkpoint_callbacks_run_last_in_their_given_order(tmp_path):
    """ModelCheckpoint saves at the train epoch's end (validation once per epoch), after every plain
    callback's epoch end, even one given after it: a last.ckpt written there would hold the best as
    of the epoch before. A Checkpoint given after it runs after its save (EpochEndSave)."""
    best = FiniteModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val_loss", save_top_k=-1)
    later, plain = SavedAsCheckpoint(best), Saved(best)
    t = trainer(tmp_path, [best, later, plain], epochs=3)
    t.fit(Toy(), loader(), loader())
    assert plain.seen == [0, 1, 2] and later.seen == [1, 2, 3]
    assert t.callbacks[-2:] == [best, later]
