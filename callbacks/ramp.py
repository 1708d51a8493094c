"""RampSchedule: sets the directional margin and target_frac from a table of stages, by epoch."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import lightning as L

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RampStage:
    """Applies while epoch < until (in the table's numbering); until=None means forever."""

    until: int | None
    margin: float
    target_frac: float


def parse_stages(stages: Sequence[Mapping[str, Any]]) -> list[RampStage]:
    """Stages from config dicts, checked: `until` strictly increasing, only the last open-ended."""
    out = [RampStage(s["until"], float(s["margin"]), float(s["target_frac"])) for s in stages]
    if not out:
        raise ValueError("ramp.stages is empty; give at least one stage")
    bounds = [s.until for s in out[:-1]]
    if any(b is None for b in bounds):
        raise ValueError("ramp.stages: only the last stage may have until: null")
    if any(b2 <= b1 for b1, b2 in zip(bounds, bounds[1:])):
        raise ValueError(f"ramp.stages: 'until' epochs must increase strictly (got {bounds})")
    if out[-1].until is not None:
        raise ValueError("ramp.stages: the last stage must have until: null (it applies to all later epochs)")
    if not all(math.isfinite(s.margin) and math.isfinite(s.target_frac) and s.target_frac >= 0 for s in out):
        raise ValueError("ramp.stages: margins must be finite and target_frac finite and >= 0")
    return out


def stage_index(epoch: int, stages: Sequence[RampStage]) -> int:
    """Index of the stage applying at `epoch` (in the table's numbering)."""
    for i, s in enumerate(stages):
        if s.until is None or epoch < s.until:
            return i
    return len(stages) - 1


class RampSchedule(L.Callback):
    """The one owner of the directional knobs: each train epoch it writes the current stage's
    margin and target_frac, and the clamp lambda_max, into the module's knobs (its `set_knobs`); after a rollback
    the guard asks it to back off (`back_off`). `ramp=constant` is a one-stage table: no ramp.

    `epoch_base` states the table's numbering: 0 means Lightning's current_epoch as is (the
    original code's convention), 1 means the first epoch is epoch 1 (the original's prose).
    """

    def __init__(self, stages: Sequence[Mapping[str, Any]], epoch_base: int, lambda_max: float) -> None:
        if epoch_base not in (0, 1):
            raise ValueError(f"ramp.epoch_base must be 0 or 1 (got {epoch_base})")
        self.stages = parse_stages(stages)
        self.epoch_base = epoch_base
        self.lambda_max = lambda_max
        self.stage: int | None = None
        # Back-off after rollbacks: hold a lower stage until an epoch; cumulative factors (the
        # product of every rollback's scale) on target_frac and lambda_max.
        self.hold_stage: int | None = None
        self.hold_until: int | None = None
        self.target_frac_factor = 1.0
        self.lambda_max_factor = 1.0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A run resumed mid-epoch does not start that epoch again: set its knobs here.
        self.apply(trainer.current_epoch, pl_module)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.apply(trainer.current_epoch, pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pl_module.log("ramp/stage", float(self.stage), on_step=False, on_epoch=True)

    def apply(self, epoch: int, pl_module: L.LightningModule) -> None:
        """Write the knobs for Lightning epoch `epoch` (back-off included) into the module."""
        idx = stage_index(epoch + self.epoch_base, self.stages)
        if self.hold_until is not None and epoch < self.hold_until:
            idx = min(idx, self.hold_stage)
        s = self.stages[idx]
        pl_module.set_knobs(s.margin, s.target_frac * self.target_frac_factor, self.lambda_max * self.lambda_max_factor)
        if idx != self.stage:
            log.info(
                "[Ramp] epoch %d (%d-based): stage %d, margin=%.3f target_frac=%.2f",
                epoch + self.epoch_base,
                self.epoch_base,
                idx,
                s.margin,
                pl_module.knobs.target_frac,
            )
        self.stage = idx

    def back_off(
        self, epoch: int, pl_module: L.LightningModule, hold_epochs: int, target_frac_scale: float, lambda_max_scale: float
    ) -> dict[str, Any]:
        """After a rollback: hold the stage before the current one for `hold_epochs` more epochs and
        scale target_frac and lambda_max by this rollback's scales; returns what now applies."""
        self.hold_stage = max((self.stage or 0) - 1, 0)
        self.hold_until = epoch + 1 + hold_epochs
        self.target_frac_factor *= target_frac_scale
        self.lambda_max_factor *= lambda_max_scale
        self.apply(epoch, pl_module)
        return {
            "hold_stage": self.hold_stage,
            "hold_until_epoch": self.hold_until,
            "target_frac_factor": self.target_frac_factor,
            "lambda_max_factor": self.lambda_max_factor,
            "lambda_max": pl_module.knobs.lambda_max,
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "hold_stage": self.hold_stage,
            "hold_until": self.hold_until,
            "target_frac_factor": self.target_frac_factor,
            "lambda_max_factor": self.lambda_max_factor,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.stage = state_dict["stage"]
        self.hold_stage = state_dict["hold_stage"]
        self.hold_until = state_dict["hold_until"]
        self.target_frac_factor = state_dict["target_frac_factor"]
        self.lambda_max_factor = state_dict["lambda_max_factor"]
