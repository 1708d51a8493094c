"""Collapse detectors: plain functions over statistics the training step and validation already compute.

Each returns the trips it finds; a trip names its detector, the values that tripped it and whether
it is a collapse (the guard acts) or a warning (recorded only). Thresholds come from
`guard.detectors` in the config; a threshold of null switches that detector off.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

Severity = Literal["collapse", "warning"]
# Every collapse detector, in a fixed order (ranks exchange which ones tripped as a multi-hot vector).
COLLAPSE_DETECTORS = (
    "nonfinite", "negative_cosines", "orthogonal_escape", "raw_norm_collapse", "val_floor", "val_drop", "below_copy_last",
)


@dataclass(frozen=True)
class Trip:
    detector: str
    severity: Severity
    values: dict[str, float] = field(default_factory=dict)


def _mean(rows: Sequence[Mapping[str, float]], key: str) -> float:
    return sum(r[key] for r in rows) / len(rows)


def check_training(rows: Sequence[Mapping[str, float]], cfg: Mapping[str, Any], pinned_steps: int) -> tuple[list[Trip], int]:
    """Trips in a window of per-step rows (train/* statistics) and the updated pinned-lambda count.

    Window means, not single batches: one odd batch is the skip rule's business, a window of them
    is a collapse.
    """
    trips: list[Trip] = []
    if not rows:
        return trips, pinned_steps
    trips = check_nonfinite(rows, cfg)
    if trips:
        return trips, pinned_steps
    pos, neg, gap = _mean(rows, "train/pos"), _mean(rows, "train/neg"), _mean(rows, "train/gap")
    if cfg["negative_cosines"] and pos < 0 and neg < 0:
        trips.append(Trip("negative_cosines", "collapse", {"pos": pos, "neg": neg, "gap": gap}))
    eps = cfg["orthogonal_eps"]
    margin = _mean(rows, "train/margin")
    if eps is not None and abs(pos) < eps and abs(neg) < eps and gap >= margin:
        trips.append(Trip("orthogonal_escape", "collapse", {"pos": pos, "neg": neg, "gap": gap, "margin": margin}))
    floor = cfg["raw_norm_floor"]
    raw_norm = _mean(rows, "train/raw_norm")
    if floor is not None and raw_norm < floor:
        trips.append(Trip("raw_norm_collapse", "collapse", {"raw_norm": raw_norm, "floor": floor}))
    limit = cfg["lambda_pinned_steps"]
    for r in rows:
        pinned = r["train/lambda_eff"] >= r["train/lambda_max"] * (1 - 1e-6)
        pinned_steps = pinned_steps + 1 if pinned else 0
    if limit is not None and pinned_steps > limit:
        trips.append(Trip("lambda_pinned", "warning", {"steps": float(pinned_steps), "lambda_max": rows[-1]["train/lambda_max"]}))
    return trips, pinned_steps


def check_nonfinite(rows: Sequence[Mapping[str, float]], cfg: Mapping[str, Any]) -> list[Trip]:
    """A NaN or inf in any row (no warm-up: a non-finite model is collapsed from step 0)."""
    bad = next((r for r in rows if not all(map(math.isfinite, r.values()))), None) if cfg["nonfinite"] else None
    return [] if bad is None else [Trip("nonfinite", "collapse", {"loss": bad["train/loss"], "mse": bad["train/mse"]})]


def check_validation(val_cos: float, copy_last_cos: float, best_cos: float | None, cfg: Mapping[str, Any]) -> list[Trip]:
    """Trips from the epoch's val cosine: absolute floor, drop from the best, deficit to copy-last."""
    trips: list[Trip] = []
    if not math.isfinite(val_cos):
        return [Trip("nonfinite", "collapse", {"val_cos": val_cos})]
    floor = cfg["val_floor"]
    if floor is not None and val_cos < floor:
        trips.append(Trip("val_floor", "collapse", {"val_cos": val_cos, "floor": floor}))
    drop = cfg["val_drop"]
    if drop is not None and best_cos is not None and val_cos < best_cos - drop:
        trips.append(Trip("val_drop", "collapse", {"val_cos": val_cos, "best": best_cos, "drop": drop}))
    deficit = cfg["below_copy_last"]
    if deficit is not None and val_cos < copy_last_cos - deficit:
        trips.append(Trip("below_copy_last", "collapse", {"val_cos": val_cos, "copy_last": copy_last_cos, "deficit": deficit}))
    return trips
