"""RollbackGuard: detect a collapse, restore the last good checkpoint, back off, and keep a record.

- Detection: `lvm.detectors` on every flushed window of per-step statistics (handed to `on_rows`
  by StepStatistics, in-epoch, at most `logger.flush_every` steps late) and on each validation.
- Starting weights: before training they are probed (one forward on a fixed sample of val
  windows) for what an untrained model never shows (`check_start`: non-finite, a constant
  output). Collapsed ones roll back to the newest good checkpoint of the run's own directory
  (a resume of its own collapsed last.ckpt), or are refused (CollapsedStart: bad input, exit 2).
- Good checkpoints: the weights a run starts from are its first rollback point
  (`good-initial.ckpt`), so a NaN before the first validation rolls back too (a val cosine below
  the floors before any healthy validation is a warning: the model is still learning); after each
  validation with no trip the guard saves `good-epochNN.ckpt` (the newest `keep_good` are kept).
  They are named relative to the run's own checkpoints/ folder: a copied or moved run finds its
  own and never deletes another directory's. Rollback takes the newest one that loads, never
  blindly last.ckpt; an unreadable one is recorded and skipped for the next older one, and so is
  one whose probe trips a detector the rollback is for (it would be restored again and again: it
  is dropped from the good checkpoints and set aside as <name>.collapsed). With none left,
  training stops.
- Rollback: model weights, optimizer and LR-scheduler state from that checkpoint; then the
  schedule it was handed (the knobs' one owner) backs off: it holds the previous stage for
  `hold_epochs` and scales target_frac and lambda_max by their per-rollback scales. Training
  continues. After `max_rollbacks`, or with no good checkpoint left, training stops cleanly (the
  run's status is `stopped: max_rollbacks` or `stopped: no good checkpoint`).
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
from lvm.data.store import Windows
from lvm.evaluation import metrics as M
from lvm.guard.detectors import (
    COLLAPSE_DETECTORS,
    CollapsedStart,
    Streaks,
    Trip,
    check_nonfinite,
    check_probe,
    check_start,
    check_training,
    check_validation,
    detector_problems,
    dropped,
)
from lvm.guard.steplog import FlushedRows
from lvm.model.module import batch_health
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


@torch.no_grad()
def probe(pl_module: L.LightningModule, batch: dict[str, torch.Tensor]) -> dict[str, float]:
    """The module's figures on `batch` (eval mode, no gradient, no random draw, one host sync):
    what the guard judges starting weights and rollback targets by (lvm.guard.detectors)."""
    was = pl_module.training
    pl_module.eval()
    try:
        context, target = batch["context"].to(pl_module.device), batch["target"].to(pl_module.device)
        raw, pred = (t.float() for t in pl_module(context))
    finally:
        pl_module.train(was)
    diversity, ca = batch_health(pred, target)
    figures = {
        "mse": (raw - target).square().mean(),
        "cos": M.cos(pred, target).mean(),
        "neg": M.cos(pred, context[:, pl_module.prev_slot]).mean(),
        "raw_norm": raw.norm(dim=-1).mean(),
        "diversity": diversity,
        "ca": ca,
        "cos_copy_last": M.cos(M.copy_last(context), target).mean(),
        "mean_context_cos": M.cos(M.mean_context(context), target).mean(),
    }
    out = dict(zip(figures, torch.stack(list(figures.values())).tolist()))
    return out | {"margin": float(pl_module.knobs.margin), "windows": float(len(target))}


class RollbackListener(Protocol):
    """A callback whose state describes the weights before a rollback (the spike history, a
    drill's fault): the guard tells it, at the step training goes on from, once it gives those
    weights up and before it judges the rollback targets (their probe must not see that state)."""

    def after_rollback(self, step: int) -> None: ...


class RollbackGuard(L.Callback):
    """Built from `guard.rollback` (conf/guard/rollback.yaml) with what only the run knows: its
    directory, the ramp `schedule` that backs off, the `listeners` told of each rollback, and the
    `windows` (val) whose `probe_windows` evenly spaced ones weights are probed on (None: only to
    check the settings, lvm/training/config.py)."""

    def __init__(
        self,
        run_dir: str | Path,
        schedule: RampSchedule,
        detectors: Mapping[str, Any],
        max_rollbacks: int,
        keep_good: int,
        backoff: Mapping[str, float],
        probe_windows: int,
        windows: Windows | None = None,
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
            (
                isinstance(probe_windows, int) and probe_windows >= 2,
                f"guard.rollback.probe_windows must be an integer >= 2 (got {probe_windows!r})",
            ),
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
        self.probe_batch = None if windows is None else windows.gather(torch.linspace(0, len(windows) - 1, probe_windows).long().unique())
        # State kept in checkpoints, so a restarted run takes the same decisions.
        self.rollbacks = 0
        self.stopped: str | None = None  # why the guard stopped training (the run's `stopped: <why>`)
        self.good: list[str] = []  # file names in ckpt_dir, oldest first
        self.best_val_cos: float | None = None
        self.streaks = Streaks()
        self._pending: list[Trip] = []
        self._drops_in_window = 0  # updates the spike check dropped in the newest flushed window
        self._ignore_before = 0  # rows from before the last rollback describe the discarded weights

    # --- wiring: StepStatistics hands every flushed window of rows to `on_rows` -----------------
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # After a checkpoint is restored: forget records written after it by an interrupted run,
        # keep only the good checkpoints this directory holds, judge the starting weights, and make
        # sure there is a rollback point before the first validation. A run the guard stopped stays stopped.
        if self.stopped:  # restored: the same on every rank
            log.warning(
                "[P6b GUARD] this run was stopped (%s) at step %d: resuming it trains no further; to train on, "
                "resume one of its good checkpoints in a new run directory, or start over",
                self.stopped,
                trainer.global_step,
            )
            trainer.should_stop = True
            return
        if trainer.is_global_zero:
            drop_rows_after(self.events_path, trainer.global_step)
        missing = [name for name in self.good if not (self.ckpt_dir / name).is_file()]
        if missing:
            log.warning("[P6b GUARD] good checkpoints not in %s (a run resumed from elsewhere): %s", self.ckpt_dir, ", ".join(missing))
            self.good = [name for name in self.good if name not in missing]
        trips = self._start_trips(trainer, pl_module)
        if trips and not self.good:
            raise self._refusal(trainer, trips, "this run's directory holds no good checkpoint to roll back to")
        if trips and not trainer.should_stop:
            self._act(trainer, pl_module, trips, where="start")
            trainer.strategy.barrier()
        if not self.good:
            self._save_good(trainer, "good-initial.ckpt")

    def on_rows(self, trainer: L.Trainer, pl_module: L.LightningModule, flushed: FlushedRows, in_training: bool) -> None:
        """The in-training detectors on each flushed window of step statistics (StepStatistics):
        decided at once when flushed in training, else with the validation that follows."""
        current = [(s, r) for s, r in zip(flushed.steps, flushed.rows) if s >= self._ignore_before]
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
        if in_training:
            self._decide_pending(trainer, pl_module)

    # --- the starting weights -----------------------------------------------------------------
    def _start_trips(self, trainer: L.Trainer, pl_module: L.LightningModule) -> list[Trip]:
        """What collapse the starting weights show (check_start), the same on every rank (one reduce)."""
        local = check_start(self._probe(trainer, pl_module), self.detectors, trained=trainer.global_step > 0)
        here = {t.detector for t in local}
        elsewhere = [Trip(n, "collapse", {"on_another_rank": 1.0}) for n in self._tripped_anywhere(trainer, here) if n not in here]
        return local + elsewhere

    def _probe(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        if self.probe_batch is None:
            raise ValueError("RollbackGuard: no windows to probe weights on (built without `windows`)")
        return {"finite_weights": float(finite_weights(trainer)), **probe(pl_module, self.probe_batch)}

    def _refusal(self, trainer: L.Trainer, trips: list[Trip], why: str) -> CollapsedStart:
        """The one-line refusal: the weights' source, the detector and its values, why no rollback."""
        t = trips[0]
        source = f"checkpoint {trainer.ckpt_path}" if trainer.ckpt_path else "the initial weights"
        values = ", ".join(f"{k}={v:.4g}" for k, v in t.values.items())
        n = len(self.probe_batch["target"])
        message = (
            f"{source}: collapsed weights ({t.detector}: {values}, on {n} probe windows): guard=rollback does not train from them "
            f"and {why}; start from a healthy checkpoint (or train these weights anyway with guard=skip)"
        )
        log.error("[P6b GUARD] %s", message)
        return CollapsedStart(message)

    # --- decisions ----------------------------------------------------------------------------
    def _decide_pending(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """The trips of the windows flushed so far, decided now: only where a window was just
        flushed (the same steps on every rank), so no per-step sync."""
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
        """Roll back, or stop after max_rollbacks or when no good checkpoint is left (at the start:
        refuse); the same path on every rank."""
        if self.rollbacks >= self.max_rollbacks:
            self._stop(trainer, collapses, where, f"max_rollbacks ({self.max_rollbacks}) reached", "max_rollbacks")
            return
        for listener in self.listeners:
            listener.after_rollback(trainer.global_step)
        restored = self._restore(trainer, pl_module, {t.detector for t in collapses})
        if restored is None and where == "start":
            raise self._refusal(trainer, collapses, "none of this run's good checkpoints is fit to roll back to")
        if restored is None:
            self._stop(trainer, collapses, where, "no good checkpoint left to roll back to", "no good checkpoint")
            return
        self.rollbacks += 1
        self._ignore_before = trainer.global_step
        backoff = self.schedule.back_off(trainer.current_epoch, pl_module, self.hold_epochs, self.target_frac_scale, self.lambda_max_scale)
        self.streaks = Streaks()
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
        if where == "start":
            log.warning("[P6b GUARD] the starting weights (%s) are collapsed: rolled back to %s", trainer.ckpt_path, restored)

    def _stop(self, trainer: L.Trainer, collapses: list[Trip], where: str, reason: str, status: str) -> None:
        extra = {"where": where, "reason": reason, "rollbacks": self.rollbacks, "others": [t.detector for t in collapses[1:]]}
        self._record(trainer, collapses[0], action="stop", extra=extra)
        log.error("[P6b GUARD] %s: stopping; the best checkpoint is kept", reason)
        trainer.should_stop = True
        self.stopped = status

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

    def _restore(self, trainer: L.Trainer, pl_module: L.LightningModule, reasons: set[str]) -> str | None:
        """Load the newest good checkpoint that loads on every rank and whose probe trips none of
        `reasons` (the detectors the rollback is for); returns its path (None if there is none: the
        module keeps its own weights). Reduced per candidate, so all ranks load the same one."""
        own = None
        for name in list(reversed(self.good)):
            path = self.ckpt_dir / name
            try:
                ckpt = read_checkpoint(path, map_location=pl_module.device)
            except LvmError as e:
                ckpt = None
                self._record(trainer, Trip("corrupt_checkpoint", "warning", {}), action=f"skipped {name}: {e}")
            failed = torch.tensor(float(ckpt is None), device=trainer.strategy.root_device)
            if float(trainer.strategy.reduce(failed, reduce_op="max")) > 0:
                continue
            own = own or {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
            pl_module.load_state_dict(ckpt["state_dict"])
            same = self._trips_at_once(trainer, pl_module, int(ckpt.get("global_step", 0)), reasons)
            if same:
                self._forget(trainer, name, same[0])
                continue
            for opt, state in zip(trainer.optimizers, ckpt["optimizer_states"]):
                opt.load_state_dict(state)
            for cfg, state in zip(trainer.lr_scheduler_configs, ckpt.get("lr_schedulers", [])):
                cfg.scheduler.load_state_dict(state)
            return f"{self.ckpt_dir.name}/{name}"
        if own is not None:
            pl_module.load_state_dict(own)
        return None

    def _trips_at_once(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int, reasons: set[str]) -> list[Trip]:
        """The trips among `reasons` of the module's weights (saved at `step`), on any rank (one reduce)."""
        local = [t for t in check_probe(self._probe(trainer, pl_module), self.detectors, self.best_val_cos, step) if t.detector in reasons]
        hot = torch.tensor(float(bool(local)), device=trainer.strategy.root_device)
        if float(trainer.strategy.reduce(hot, reduce_op="max")) == 0:
            return []
        return local or [Trip(sorted(reasons)[0], "collapse", {"on_another_rank": 1.0})]

    def _forget(self, trainer: L.Trainer, name: str, trip: Trip) -> None:
        """A good checkpoint that trips what the rollback is for: recorded, never a rollback point
        again, and set aside out of every *.ckpt pattern (kept for inspection)."""
        aside = f"{name}.collapsed"
        self._record(
            trainer,
            Trip("collapsed_checkpoint", "warning", trip.values),
            action=f"skipped {name}: {trip.detector} trips on it at once (set aside as {aside})",
            extra={"checkpoint": f"{self.ckpt_dir.name}/{name}", "trips": trip.detector},
        )
        self.good = [n for n in self.good if n != name]
        if trainer.is_global_zero:
            (self.ckpt_dir / name).replace(self.ckpt_dir / aside)

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
