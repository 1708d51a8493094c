"""RollbackGuard: detect a collapse, restore the last good checkpoint, back off, and keep a record.

- Detection: `lvm.detectors` on every flushed window of per-step statistics (handed to `on_rows`
  by StepStatistics, in-epoch, at most `logger.flush_every` steps late) and on each validation.
- Good checkpoints: the weights a run starts from are its first rollback point
  (`good-initial.ckpt`), so a NaN before the first validation rolls back too (a val cosine below
  the floors before any healthy validation is a warning: the model is still learning); after each
  validation with no trip the guard saves `good-epochNN.ckpt` (the newest `keep_good` are kept).
  They are named relative to the run's own checkpoints/ folder: a copied or moved run finds its
  own and never deletes another directory's. Rollback takes the newest one that loads, never
  blindly last.ckpt; an unreadable one is recorded and skipped for the next older one.
- Rollback: model weights, optimizer and LR-scheduler state from that checkpoint; then the
  schedule it was handed (the knobs' one owner) backs off: it holds the previous stage for
  `hold_epochs` and scales target_frac and lambda_max by their per-rollback scales. Training
  continues. After `max_rollbacks`, training stops cleanly (`stopped`; the
  run's status is `stopped: max_rollbacks`).
- Every decision is reduced across ranks (a trip on any rank counts on all) and followed by a
  barrier, so all ranks restore the same checkpoint at the same step.
- Record: events.jsonl in the run directory, a TensorBoard text entry, a `[P6b GUARD]` line.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, Protocol

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from callbacks.ramp import RampSchedule
from lvm.guard.detectors import (
    COLLAPSE_DETECTORS,
    Streaks,
    Trip,
    check_nonfinite,
    check_training,
    check_validation,
    detector_problems,
    dropped,
)
from lvm.runtime.checkpoints import finite_weights, read_checkpoint
from lvm.runtime.errors import ConfigError, LvmError, finite, require
from lvm.runtime.files import drop_rows_after

log = logging.getLogger(__name__)

# Detectors that an untrained model also trips: before the first healthy validation they are
# warnings (the run has only its starting weights to go back to, and no history to compare with).
STILL_LEARNING = (
    "val_floor",
    "below_copy_last",
    "below_mean_context",
    "val_low_diversity",
    "val_contrastive_chance",
    "low_diversity",
    "contrastive_chance",
)


class RollbackListener(Protocol):
    """A callback whose state describes the weights before a rollback (the spike history, a
    drill's fault): the guard tells it, after restoring, at the step training goes on from."""

    def after_rollback(self, step: int) -> None: ...


class RollbackGuard(L.Callback):
    """Built from `guard.rollback` (conf/guard/rollback.yaml) with what only the run knows: its
    directory, the ramp `schedule` that backs off, and the `listeners` told of each rollback."""

    def __init__(
        self,
        run_dir: str | Path,
        schedule: RampSchedule,
        detectors: Mapping[str, Any],
        max_rollbacks: int,
        keep_good: int,
        backoff: Mapping[str, float],
        listeners: Sequence[RollbackListener] = (),
        mini5cat: bool = True,
    ) -> None:
        b = dict(backoff)
        require(*((False, p) for p in detector_problems(detectors, mini5cat)), error=ConfigError)
        require(
            (
                set(b) == {"hold_epochs", "target_frac_scale", "lambda_max_scale"},
                f"guard.rollback.backoff needs hold_epochs, target_frac_scale and lambda_max_scale (got {sorted(b)})",
            ),
            error=ConfigError,
        )
        require(
            (max_rollbacks >= 0, f"guard.rollback.max_rollbacks must be >= 0 (got {max_rollbacks})"),
            (keep_good >= 1, f"guard.rollback.keep_good must be >= 1 (got {keep_good})"),
            (b["hold_epochs"] >= 0, f"guard.rollback.backoff.hold_epochs must be >= 0 (got {b['hold_epochs']})"),
            *(
                (finite(b[k]) and 0 < b[k] <= 1, f"guard.rollback.backoff.{k} must be in (0, 1] (got {b[k]})")
                for k in ("target_frac_scale", "lambda_max_scale")
            ),
            error=ConfigError,
        )
        self.ckpt_dir = Path(run_dir) / "checkpoints"
        self.events_path = Path(run_dir) / "events.jsonl"
        self.detectors = dict(detectors)
        self.max_rollbacks = max_rollbacks
        self.hold_epochs = b["hold_epochs"]
        # Per-rollback scales; the schedule keeps their cumulative product.
        self.target_frac_scale = b["target_frac_scale"]
        self.lambda_max_scale = b["lambda_max_scale"]
        self.schedule = schedule
        self.keep_good = keep_good
        self.listeners = list(listeners)
        # State kept in checkpoints, so a restarted run takes the same decisions.
        self.rollbacks = 0
        self.stopped = False  # max_rollbacks reached: training was stopped
        self.good: list[str] = []  # file names in ckpt_dir, oldest first
        self.best_val_cos: float | None = None
        self.streaks = Streaks()
        self._pending: list[Trip] = []
        self._flushed = False  # a window was flushed since the last decision (same steps on every rank)
        self._drops_in_window = 0  # updates the spike check dropped in the newest flushed window
        self._ignore_before = 0  # rows from before the last rollback describe the discarded weights

    # --- wiring: StepStatistics hands every flushed window of rows to `on_rows` -----------------
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # After a checkpoint is restored: forget records written after it by an interrupted run,
        # keep only the good checkpoints this directory holds, and make sure there is a rollback
        # point before the first validation.
        if trainer.is_global_zero:
            drop_rows_after(self.events_path, trainer.global_step)
        missing = [name for name in self.good if not (self.ckpt_dir / name).is_file()]
        if missing:
            log.warning("[P6b GUARD] good checkpoints not in %s (a run resumed from elsewhere): %s", self.ckpt_dir, ", ".join(missing))
            self.good = [name for name in self.good if name not in missing]
        if not self.good:
            self._save_good(trainer, "good-initial.ckpt")

    def on_rows(self, steps: list[int], rows: list[dict[str, float]]) -> None:
        self._flushed = True
        current = [(s, r) for s, r in zip(steps, rows) if s >= self._ignore_before]
        # start_step spares an untrained model's cosines, not a NaN: that is a collapse from step 0.
        warm = [r for s, r in current if s >= self.detectors["start_step"]]
        trips = check_training(warm, self.detectors, self.streaks)
        if not trips and len(warm) < len(current):
            trips = check_nonfinite([r for _, r in current], self.detectors)
        drops = [(s, r) for s, r in current if dropped(r)]
        self._drops_in_window = len(drops)  # the same on every rank (decided from averaged gradients)
        if drops:  # guard.spike.drop kept these updates out: recorded, one line per window
            trips.append(
                Trip(
                    "update_dropped",
                    "warning",
                    {"count": float(len(drops)), "first_step": float(drops[0][0]), "grad_z_max": max(r["train/grad_z"] for _, r in drops)},
                )
            )
        self._pending += self._still_learning(trips)

    # --- decisions ----------------------------------------------------------------------------
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        # Only where a window was just flushed (the same steps on every rank): no per-step sync.
        if not self._flushed:
            return
        self._flushed = False
        trips, self._pending = self._pending, []
        # A dropped step was a bad batch if the weights are finite, broken weights if not (a NaN row
        # alone cannot tell): one check, on every rank alike, only after a window with drops.
        if self._drops_in_window and not any(t.detector == "nonfinite" for t in trips) and not finite_weights(trainer):
            trips.append(Trip("nonfinite", "collapse", {"finite_weights": 0.0}))
        self._decide(trainer, pl_module, trips, where="train")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or "val/cos" not in trainer.callback_metrics:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("val/", "mini5cat/"))}
        val_cos = metrics["val/cos"]
        trips = self._still_learning(check_validation(metrics, self.best_val_cos, self.detectors))
        trips += self._pending
        self._pending = []
        if not self._decide(trainer, pl_module, trips, where="validation") and not any(t.detector in STILL_LEARNING for t in trips):
            self.best_val_cos = val_cos if self.best_val_cos is None else max(self.best_val_cos, val_cos)
            self._save_good(trainer, f"good-epoch{trainer.current_epoch:02d}.ckpt")

    def _still_learning(self, trips: list[Trip]) -> list[Trip]:
        """Before the first healthy validation, a model below the floors is learning, not collapsed,
        and rolling back to its starting weights cannot help it: those trips are warnings (and the
        epoch is not saved as good either)."""
        if self.best_val_cos is not None:
            return trips
        return [Trip(t.detector, "warning", t.values) if t.detector in STILL_LEARNING else t for t in trips]

    def _decide(self, trainer: L.Trainer, pl_module: L.LightningModule, trips: list[Trip], where: str) -> bool:
        """Record warnings; if any rank saw a collapse, every rank acts on it (True)."""
        for t in trips:
            if t.severity == "warning":
                self._record(trainer, t, action="dropped update" if t.detector == "update_dropped" else "warning")
        collapses = [t for t in trips if t.severity == "collapse"]
        here = {t.detector for t in collapses}
        anywhere = self._tripped_anywhere(trainer, here)
        if not anywhere:
            return False
        if not trainer.should_stop:  # once stopping, later trips need no action (and are no good state)
            elsewhere = [Trip(name, "collapse", {"on_another_rank": 1.0}) for name in anywhere if name not in here]
            self._act(trainer, pl_module, collapses + elsewhere, where)
            trainer.strategy.barrier()
        return True

    def _tripped_anywhere(self, trainer: L.Trainer, local: set[str]) -> list[str]:
        """Collapse detectors that tripped on any rank: the same list on every rank (one reduce)."""
        hot = torch.tensor([float(n in local) for n in COLLAPSE_DETECTORS], device=trainer.strategy.root_device)
        hot = trainer.strategy.reduce(hot, reduce_op="max")
        return [n for n, h in zip(COLLAPSE_DETECTORS, hot.tolist()) if h > 0]

    def _act(self, trainer: L.Trainer, pl_module: L.LightningModule, collapses: list[Trip], where: str) -> None:
        """Roll back, or stop after max_rollbacks; the same path on every rank."""
        if self.rollbacks >= self.max_rollbacks:
            self._record(
                trainer, collapses[0], action="stop", extra={"rollbacks": self.rollbacks, "others": [t.detector for t in collapses[1:]]}
            )
            log.error("[P6b GUARD] max_rollbacks (%d) reached: stopping; the best checkpoint is kept", self.max_rollbacks)
            trainer.should_stop = True
            self.stopped = True
            return
        restored = self._restore(trainer, pl_module)
        if restored is None:
            self._record(trainer, collapses[0], action="none: no good checkpoint yet", extra={"where": where})
            return
        self.rollbacks += 1
        self._ignore_before = trainer.global_step
        backoff = self.schedule.back_off(trainer.current_epoch, pl_module, self.hold_epochs, self.target_frac_scale, self.lambda_max_scale)
        self.streaks = Streaks()
        for listener in self.listeners:
            listener.after_rollback(trainer.global_step)
        self._record(
            trainer,
            collapses[0],
            action="rollback",
            extra={
                "where": where,
                "checkpoint": restored,
                "backoff": backoff,
                "rollbacks": self.rollbacks,
                "others": [t.detector for t in collapses[1:]],
            },
        )

    # --- checkpoints --------------------------------------------------------------------------
    def _save_good(self, trainer: L.Trainer, name: str) -> None:
        """Save a rollback point `name` in ckpt_dir and drop the oldest beyond keep_good (never a
        file outside ckpt_dir). A model with a non-finite weight is never a rollback point."""
        if not finite_weights(trainer):
            log.warning("[P6b GUARD] not saving %s: the model has non-finite weights", name)
            return
        self.good = [n for n in self.good if n != name] + [name]
        stale, self.good = self.good[: -self.keep_good], self.good[-self.keep_good :]
        trainer.save_checkpoint(self.ckpt_dir / name)
        if trainer.is_global_zero:
            for n in stale:
                (self.ckpt_dir / n).unlink(missing_ok=True)

    def _restore(self, trainer: L.Trainer, pl_module: L.LightningModule) -> str | None:
        """Load the newest good checkpoint that loads on every rank; returns its path (None if there
        is none). One reduce per candidate, so all ranks load the same one."""
        for name in reversed(self.good):
            path = self.ckpt_dir / name
            try:
                ckpt = read_checkpoint(path, map_location=pl_module.device)
            except LvmError as e:
                ckpt = None
                self._record(trainer, Trip("corrupt_checkpoint", "warning", {}), action=f"skipped {name}: {e}")
            failed = torch.tensor(float(ckpt is None), device=trainer.strategy.root_device)
            if float(trainer.strategy.reduce(failed, reduce_op="max")) > 0:
                continue
            pl_module.load_state_dict(ckpt["state_dict"])
            for opt, state in zip(trainer.optimizers, ckpt["optimizer_states"]):
                opt.load_state_dict(state)
            for cfg, state in zip(trainer.lr_scheduler_configs, ckpt.get("lr_schedulers", [])):
                cfg.scheduler.load_state_dict(state)
            return f"{self.ckpt_dir.name}/{name}"
        return None

    # --- record -------------------------------------------------------------------------------
    def _record(self, trainer: L.Trainer, trip: Trip, action: str, extra: dict[str, Any] | None = None) -> None:
        if not trainer.is_global_zero:
            return
        event = {
            "time": time.time(),
            "step": trainer.global_step,
            "epoch": trainer.current_epoch,
            **asdict(trip),
            "action": action,
            **(extra or {}),
        }
        event["values"] = {k: v if math.isfinite(v) else str(v) for k, v in trip.values.items()}  # strict JSON
        with self.events_path.open("a") as f:
            f.write(json.dumps(event) + "\n")
        values = " ".join(f"{k}={v:.3f}" for k, v in trip.values.items())
        log.warning(
            "[P6b GUARD] %s (%s) at epoch %d step %d: %s -> %s",
            trip.detector,
            trip.severity,
            trainer.current_epoch,
            trainer.global_step,
            values,
            action,
        )
        for lg in trainer.loggers:
            if isinstance(lg, TensorBoardLogger):
                lg.experiment.add_text("guard/events", json.dumps(event), trainer.global_step)

    def state_dict(self) -> dict[str, Any]:
        return {
            "rollbacks": self.rollbacks,
            "good": list(self.good),
            "best_val_cos": self.best_val_cos,
            "pinned_steps": self.streaks.pinned,
            "ignore_before": self._ignore_before,
            "stopped": self.stopped,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.rollbacks = state_dict["rollbacks"]
        self.good = list(state_dict["good"])  # names in this run's ckpt_dir
        self._ignore_before = state_dict["ignore_before"]
        self.stopped = state_dict["stopped"]
        self.best_val_cos = state_dict["best_val_cos"]
        self.streaks = Streaks(state_dict["pinned_steps"])
