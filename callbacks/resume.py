"""ExactResume: last.ckpt resumes a run exactly, at an epoch end, mid-epoch or after a preemption.

- last.ckpt carries the sampler position (the epoch's order is a function of (seed, epoch), see
  lvm/data/sampler.py) and every RNG state (torch, CUDA, numpy, python), so a resumed run draws
  the same batches and the same dropout masks as the uninterrupted run.
- It is written by `LastSave`, a Lightning Checkpoint, so after every other callback's hook (it
  holds the guard's decision of its step, and the best and epoch checkpoints' record of its epoch):
  at every epoch end, every `every_n_steps` steps mid-epoch
  (`auto`: the steps of about `every_minutes`, timed on this run's first steps), and when SIGTERM,
  SIGUSR1 or a Ctrl-C arrives (then the run stops with `Preempted`); always atomically
  (lvm/runtime/files.py via the trainer's CheckpointIO), so kill -9 at any moment loses at most
  `every_n_steps` steps.
- A model with a non-finite weight is never written as last.ckpt (the older file stays).
- Epoch-interval LR schedulers (ReduceLROnPlateau) step after an epoch's last.ckpt is written,
  and Lightning does not step them at the end of an epoch it restarted mid-way: the values they
  read are kept in last.ckpt and the missing step is taken on resume, where the uninterrupted run
  took it.

One writer for last.ckpt instead of Lightning's ModelCheckpoint: that writes at one kind of
trigger only (epoch or steps), and needs neither the preemption save nor the finite check.
"""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Checkpoint

from lvm.data.sampler import EpochSampler
from lvm.runtime.checkpoints import finite_weights
from lvm.runtime.errors import Preempted, finite, require
from lvm.runtime.signals import StopSignals

log = logging.getLogger(__name__)


def rng_states() -> dict[str, Any]:
    """Every RNG state a training step can draw from (as tensors and plain containers, so that
    checkpoints load under torch's weights_only rules)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def scheduler_inputs(trainer: L.Trainer) -> dict[str, float]:
    """The monitored values the epoch-interval schedulers are about to step on."""
    keys = {c.monitor for c in trainer.lr_scheduler_configs if c.interval == "epoch" and c.reduce_on_plateau}
    return {k: float(trainer.callback_metrics[k]) for k in keys if k in trainer.callback_metrics}


def step_epoch_schedulers(trainer: L.Trainer, inputs: dict[str, float]) -> None:
    """The epoch-end step Lightning takes (lvm's schedulers step every epoch: frequency 1)."""
    for c in trainer.lr_scheduler_configs:
        if c.interval != "epoch":
            continue
        if not c.reduce_on_plateau:
            c.scheduler.step()
        elif c.monitor in inputs:
            c.scheduler.step(inputs[c.monitor])


# every_n_steps: auto times this many steps, after this many warm-up steps.
_WARMUP_STEPS, _TIMED_STEPS = 10, 50


class ExactResume(L.Callback):
    def __init__(
        self,
        sampler: EpochSampler,
        batch_size: int,
        last_path: str | Path,
        every_n_steps: int | str | None,
        every_minutes: float,
        signals: StopSignals | None,
        signal_check_every: int,
    ) -> None:
        n = every_n_steps
        require(
            (
                n is None or n == "auto" or (isinstance(n, int) and not isinstance(n, bool) and n >= 1),
                f"callbacks.resume.every_n_steps must be auto, null or an integer >= 1 (got {n!r})",
            ),
            (finite(every_minutes) and every_minutes > 0, f"callbacks.resume.every_minutes must be > 0 (got {every_minutes})"),
        )
        self.sampler = sampler
        self.batch_size = batch_size
        self.last_path = Path(last_path)
        self.every_n_steps = None if every_n_steps == "auto" else every_n_steps
        self._timer = (0, 0.0)  # (steps seen, start of the timed steps) while timing for `auto`
        self._timing = every_n_steps == "auto"
        self.every_minutes = every_minutes
        self.signals = signals
        self.signal_check_every = signal_check_every  # steps between the ranks' stop-signal reduce (DDP)
        self.epoch = 0
        self.batches_done = 0  # batches of `epoch` trained so far, on each rank
        self.world = 1  # ranks: batches_done x batch_size x world windows of the epoch's order are done
        # Between an epoch's end and the next epoch's start: the values its epoch schedulers step on.
        self.scheduler_inputs: dict[str, float] | None = None
        self._restored_inputs: dict[str, float] | None = None  # from a checkpoint written at an epoch end
        self._step_at_next_epoch = False  # Lightning restarted this epoch mid-way: it will not step them
        self.writer = LastSave(self)  # what writes last.ckpt: the run adds it beside this callback

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Stop signals are lvm's: the run stops at a batch end or an epoch end, where last.ckpt is
        # written in step with the records (lvm/runtime/signals.py).
        if self.signals is not None:
            self.signals.take_over()
        # After the trainer restored a checkpoint.
        if self._restored_inputs is not None:
            step_epoch_schedulers(trainer, self._restored_inputs)
            self._restored_inputs = None
        self._step_at_next_epoch = trainer.fit_loop.restarting

    # --- position -----------------------------------------------------------------------------
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._catch_up(trainer)
        self.epoch, self.batches_done = trainer.current_epoch, 0

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._catch_up(trainer)

    def _catch_up(self, trainer: L.Trainer) -> None:
        if self._step_at_next_epoch and self.scheduler_inputs is not None:
            step_epoch_schedulers(trainer, self.scheduler_inputs)
        self._step_at_next_epoch = False
        self.scheduler_inputs = None

    def save_batch_end(self, trainer: L.Trainer, batch_idx: int) -> None:
        """last.ckpt mid-epoch, every `every_n_steps` steps or on a stop signal (LastSave, after
        every other batch-end hook)."""
        self.epoch, self.batches_done, self.world = trainer.current_epoch, batch_idx + 1, trainer.world_size
        if self._timing:
            self._time_steps(trainer)
        # Never at the epoch's last batch: Lightning would resume from there as if the epoch had
        # ended, without its validation and row. The epoch-end save (and stop) follows instead.
        if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            return
        stop = self._stop_requested(trainer)
        if stop or (self.every_n_steps and trainer.global_step % self.every_n_steps == 0):
            self.save(trainer)
        if stop:
            raise Preempted(self.signals.received or "a signal on another rank")

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Before the epoch's checkpoints (best-*, epochNN), so that they hold them too.
        self.scheduler_inputs = scheduler_inputs(trainer)

    def save_epoch_end(self, trainer: L.Trainer) -> None:
        """last.ckpt at an epoch's end (LastSave, after every other epoch-end hook)."""
        self.save(trainer)
        # A signal that came during the epoch's last batch or its validation: stop here, with the
        # epoch's row and last.ckpt written.
        if self._stop_requested(trainer, every_rank_now=True):
            raise Preempted(self.signals.received or "a signal on another rank")

    def _time_steps(self, trainer: L.Trainer) -> None:
        """`every_n_steps: auto`: time steps 10..60 of this run, then save every ~every_minutes
        (rank 0's count on every rank)."""
        seen, t0 = self._timer
        seen += 1
        if seen == _WARMUP_STEPS:
            t0 = time.perf_counter()
        elif seen == _WARMUP_STEPS + _TIMED_STEPS:
            per_step = (time.perf_counter() - t0) / _TIMED_STEPS
            n = trainer.strategy.broadcast(max(1, round(self.every_minutes * 60 / per_step)))
            self.every_n_steps, self._timing = n, False
            log.info("Mid-epoch last.ckpt every %d steps (%.2f ms/step: about %.1f min)", n, 1000 * per_step, self.every_minutes)
        self._timer = (seen, t0)

    def _stop_requested(self, trainer: L.Trainer, every_rank_now: bool = False) -> bool:
        """A stop signal on any rank. With several ranks a collective (and a host sync) decides, so
        only every `signal_check_every` steps (the same steps on every rank) or where every rank
        asks at once (`every_rank_now`: an epoch end), not every step."""
        here = self.signals is not None and self.signals.received is not None
        if trainer.world_size == 1:
            return here
        if not every_rank_now and trainer.global_step % self.signal_check_every:
            return False
        return trainer.strategy.reduce_boolean_decision(here, all=False)

    # --- last.ckpt ----------------------------------------------------------------------------
    def save(self, trainer: L.Trainer) -> None:
        """Write last.ckpt (atomically), unless the model has a non-finite weight."""
        if not finite_weights(trainer):
            log.warning(
                "Not writing %s at step %d: the model has non-finite weights (the older file is kept)", self.last_path, trainer.global_step
            )
            return
        trainer.save_checkpoint(self.last_path)

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "batches_done": self.batches_done,
            "world": self.world,
            "rng": rng_states(),
            "scheduler_inputs": self.scheduler_inputs,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Called while the trainer restores a checkpoint, before the training data is iterated.
        self.epoch, self.batches_done = state_dict["epoch"], state_dict["batches_done"]
        self._restored_inputs = state_dict.get("scheduler_inputs")
        self.world = state_dict["world"]
        self.sampler.resume(self.epoch, self.batches_done * self.batch_size * self.world)
        set_rng_states(state_dict["rng"])


class LastSave(Checkpoint):
    """ExactResume's writer of last.ckpt. A Lightning Checkpoint: the trainer runs checkpoint
    callbacks after all others, in their given order, and the run gives this one after the best and
    epoch checkpoints; so last.ckpt holds every other callback's state of its step (the guard's
    decision) and of its epoch (ModelCheckpoint saves at the train epoch's end when validation runs
    once per epoch), whatever their order in the list."""

    def __init__(self, resume: ExactResume) -> None:
        self.resume = resume

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.resume.save_batch_end(trainer, batch_idx)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.resume.save_epoch_end(trainer)
