"""Collapse detectors: plain functions over statistics the training step and validation already compute.

Each returns the trips it finds; a trip names its detector, the values that tripped it and whether
it is a collapse (the guard acts) or a warning (recorded only). Thresholds come from
`guard.rollback.detectors` in the config; a threshold of null switches that detector off.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from lvm.runtime.errors import LvmError

Severity = Literal["collapse", "warning"]
# Every collapse detector, in a fixed order (ranks exchange which ones tripped as a multi-hot vector).
COLLAPSE_DETECTORS = (
    "nonfinite",
    "spike_burst",
    "negative_cosines",
    "orthogonal_escape",
    "raw_norm_collapse",
    "raw_norm_explosion",
    "low_diversity",
    "contrastive_chance",
    "val_floor",
    "val_drop",
    "below_copy_last",
    "below_mean_context",
    "val_low_diversity",
    "val_contrastive_chance",
    "constant_output",
)
# Settings of validation detectors that read mini-5CAT's figures (callbacks.mini5cat must be on).
MINI5CAT_SETTINGS = ("below_mean_context", "val_diversity_floor", "val_ca_floor")


@dataclass(frozen=True)
class Trip:
    detector: str
    severity: Severity
    values: dict[str, float] = field(default_factory=dict)


class CollapsedStart(LvmError):
    """The weights a guarded run starts from are collapsed and its directory holds no good
    checkpoint to roll back to: refused before training, as bad input (exit 2)."""


def _mean(rows: Sequence[Mapping[str, float]], key: str) -> float:
    return sum(r[key] for r in rows) / len(rows)


@dataclass
class Streaks:
    """Runs of consecutive steps that continue across windows (kept in the guard's checkpoints)."""

    pinned: int = 0  # lambda_eff at lambda_max


def dropped(row: Mapping[str, float]) -> bool:
    """Whether this step's update was dropped (guard.spike.drop): the weights never took it."""
    return row.get("train/update_dropped", 0.0) > 0


def check_training(rows: Sequence[Mapping[str, float]], cfg: Mapping[str, Any], streaks: Streaks) -> list[Trip]:
    """Trips in a window of per-step rows (train/* statistics); updates `streaks`.

    Window means, not single batches: one odd batch is the skip rule's business, a window of them
    is a collapse. Steps whose update was dropped are left out of the means (their batch was the
    anomaly, and the weights never took it); more of them in one window than `max_drops_per_window`
    is a collapse of its own (a burst of spikes: the weights are somewhere bad, not one batch).
    """
    trips: list[Trip] = []
    n_dropped = sum(map(dropped, rows))
    limit = cfg["max_drops_per_window"]
    if limit is not None and n_dropped > limit:
        trips.append(Trip("spike_burst", "collapse", {"dropped": float(n_dropped), "limit": float(limit)}))
    rows = [r for r in rows if not dropped(r)]
    if not rows:
        return trips
    nonfinite = check_nonfinite(rows, cfg)
    if nonfinite:
        return trips + nonfinite
    trips += window_trips(rows, cfg)
    limit = cfg["lambda_pinned_steps"]
    for r in rows:
        pinned = r["train/lambda_eff"] >= r["train/lambda_max"] * (1 - 1e-6)
        streaks.pinned = streaks.pinned + 1 if pinned else 0
    if limit is not None and streaks.pinned > limit:
        trips.append(Trip("lambda_pinned", "warning", {"steps": float(streaks.pinned), "lambda_max": rows[-1]["train/lambda_max"]}))
    return trips


def window_trips(rows: Sequence[Mapping[str, float]], cfg: Mapping[str, Any]) -> list[Trip]:
    """The collapse detectors on the means of finite rows (train/pos, neg, gap, margin, diversity,
    ca, raw_norm): a training window, or a probe of weights as one row (`check_probe`)."""
    trips: list[Trip] = []
    pos, neg, gap = _mean(rows, "train/pos"), _mean(rows, "train/neg"), _mean(rows, "train/gap")
    if cfg["negative_cosines"] and pos < 0 and neg < 0:
        trips.append(Trip("negative_cosines", "collapse", {"pos": pos, "neg": neg, "gap": gap}))
    eps = cfg["orthogonal_eps"]
    margin = _mean(rows, "train/margin")
    if eps is not None and abs(pos) < eps and abs(neg) < eps and gap >= margin:
        trips.append(Trip("orthogonal_escape", "collapse", {"pos": pos, "neg": neg, "gap": gap, "margin": margin}))
    # A constant output shows in every batch (diversity exactly 0, CA at chance): the window's
    # newest `tail_steps` rows alone may trip, so a collapse late in a window is acted on at its flush.
    tail = rows[-cfg["tail_steps"] :]
    for name, key, floor in (
        ("low_diversity", "train/diversity", cfg["diversity_floor"]),
        ("contrastive_chance", "train/ca", cfg["ca_floor"]),
    ):
        value, newest = _mean(rows, key), _mean(tail, key)
        if floor is not None and min(value, newest) < floor:
            trips.append(Trip(name, "collapse", {"window": value, "newest": newest, "floor": floor}))
    raw_norm = _mean(rows, "train/raw_norm")
    floor, ceiling = cfg["raw_norm_floor"], cfg["raw_norm_ceiling"]
    if floor is not None and raw_norm < floor:
        trips.append(Trip("raw_norm_collapse", "collapse", {"raw_norm": raw_norm, "floor": floor}))
    if ceiling is not None and raw_norm > ceiling:
        trips.append(Trip("raw_norm_explosion", "collapse", {"raw_norm": raw_norm, "ceiling": ceiling}))
    return trips


def check_nonfinite(rows: Sequence[Mapping[str, float]], cfg: Mapping[str, Any]) -> list[Trip]:
    """A NaN or inf in any row whose update was taken (no warm-up: a non-finite model is collapsed
    from step 0)."""
    bad = next((r for r in rows if not dropped(r) and not all(map(math.isfinite, r.values()))), None) if cfg["nonfinite"] else None
    return [] if bad is None else [Trip("nonfinite", "collapse", {"loss": bad["train/loss"], "mse": bad["train/mse"]})]


def check_validation(metrics: Mapping[str, float], best_cos: float | None, cfg: Mapping[str, Any]) -> list[Trip]:
    """Trips from an epoch's validation: the val cosine's absolute floor, its drop from the run's
    best, its deficit to the copy-last and mean-of-context baselines, and mini-5CAT's prediction
    diversity and contrastive accuracy (a constant output can keep a high cosine on data whose
    vectors share a common direction; it cannot keep either of these). `metrics`: the epoch's
    logged values (val/cos, val/cos_copy_last, mini5cat/*); a mini-5CAT figure that is absent is
    not checked (start-up validation refuses those detectors without mini-5CAT)."""
    val_cos = metrics["val/cos"]
    if not math.isfinite(val_cos):
        return [Trip("nonfinite", "collapse", {"val_cos": val_cos})]
    trips: list[Trip] = []

    def below(name: str, value: float | None, limit: float | None, **values: float) -> None:
        if value is not None and limit is not None and not value >= limit:  # a NaN figure trips too
            trips.append(Trip(name, "collapse", {"value": value, "limit": limit, **values}))

    below("val_floor", val_cos, cfg["val_floor"])
    if cfg["val_drop"] is not None and best_cos is not None:
        below("val_drop", val_cos, best_cos - cfg["val_drop"], best=best_cos)
    if cfg["below_copy_last"] is not None:
        below("below_copy_last", val_cos, metrics["val/cos_copy_last"] - cfg["below_copy_last"])
    base = metrics.get("mini5cat/mean_context_cos")
    if cfg["below_mean_context"] is not None and base is not None:  # mini-5CAT's cos: the baseline's windows
        below("below_mean_context", metrics["mini5cat/cos"], base - cfg["below_mean_context"], baseline=base)
    below("val_low_diversity", metrics.get("mini5cat/diversity"), cfg["val_diversity_floor"])
    below("val_contrastive_chance", metrics.get("mini5cat/ca"), cfg["val_ca_floor"])
    return trips


def check_start(stats: Mapping[str, float], cfg: Mapping[str, Any], trained: bool) -> list[Trip]:
    """Collapse evidence in weights before they train (a guarded run's starting weights), from a
    probe of their predictions on a fixed sample of val windows (`stats`: callbacks/rollback.py's
    `probe`): non-finite weights or predictions, and, for weights that `trained`, a constant output
    (prediction diversity below `constant_floor`: exactly 0 when every prediction is one vector).
    Only what a random initialisation never shows: an untrained model is below every val floor and
    baseline, at chance contrastive accuracy, and reads a diversity as low as 0.01 (the original's
    P6 at D = 4096); weights that never trained are a starting point, judged by nonfinite alone."""
    if cfg["nonfinite"] and not (stats["finite_weights"] and all(map(math.isfinite, stats.values()))):
        return [Trip("nonfinite", "collapse", {"finite_weights": stats["finite_weights"], "mse": stats["mse"]})]
    floor = cfg["constant_floor"]
    if trained and floor is not None and stats["diversity"] < floor:
        return [Trip("constant_output", "collapse", {"diversity": stats["diversity"], "limit": floor})]
    return []


def check_probe(stats: Mapping[str, float], cfg: Mapping[str, Any], best_cos: float | None, step: int) -> list[Trip]:
    """Every collapse detector a probe of weights saved at global step `step` can judge (a rollback
    target, checked as soon as it is loaded): `check_start`'s; for weights that trained, the
    window detectors on the probe as one row (from `start_step` on, as in training) and the
    validation detectors on its figures (`best_cos`: the run's best val cosine)."""
    trips = check_start(stats, cfg, trained=step > 0)
    if step == 0 or any(t.detector == "nonfinite" for t in trips):
        return trips
    pos, neg = stats["cos"], stats["neg"]
    if step >= cfg["start_step"]:
        row = {"train/pos": pos, "train/neg": neg, "train/gap": pos - neg, "train/margin": stats["margin"]}
        row |= {f"train/{k}": stats[k] for k in ("diversity", "ca", "raw_norm")}
        trips += window_trips([row], cfg)
    figures = {
        "val/cos": pos,
        "val/cos_copy_last": stats["cos_copy_last"],
        "mini5cat/cos": pos,
        "mini5cat/mean_context_cos": stats["mean_context_cos"],
        "mini5cat/diversity": stats["diversity"],
        "mini5cat/ca": stats["ca"],
    }
    return trips + check_validation(figures, best_cos, cfg)


def detector_problems(cfg: Mapping[str, Any], mini5cat: bool) -> list[str]:
    """What is wrong with `guard.rollback.detectors` (every problem, named)."""
    known = {
        "start_step",
        "tail_steps",
        "nonfinite",
        "negative_cosines",
        "orthogonal_eps",
        "raw_norm_floor",
        "raw_norm_ceiling",
        "max_drops_per_window",
        "diversity_floor",
        "ca_floor",
        "lambda_pinned_steps",
        "val_floor",
        "val_drop",
        "below_copy_last",
        "below_mean_context",
        "val_diversity_floor",
        "val_ca_floor",
        "constant_floor",
    }
    problems = [
        f"guard.rollback.detectors.{k}: no such detector setting (known: {', '.join(sorted(known))})" for k in cfg if k not in known
    ]
    problems += [f"guard.rollback.detectors.{k} is missing" for k in sorted(known - set(cfg))]
    if problems:
        return problems
    for k in (
        "orthogonal_eps",
        "raw_norm_floor",
        "raw_norm_ceiling",
        "diversity_floor",
        "ca_floor",
        "val_drop",
        "below_copy_last",
        "below_mean_context",
        "val_diversity_floor",
        "val_ca_floor",
        "val_floor",
        "constant_floor",
    ):
        v = cfg[k]
        if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v) and (v >= 0 or k == "val_floor")):
            problems.append(f"guard.rollback.detectors.{k} must be null or a finite number >= 0 (got {v!r})")
    for k in ("start_step", "lambda_pinned_steps", "max_drops_per_window"):
        v = cfg[k]
        if v is not None and not (isinstance(v, int) and v >= 0):
            problems.append(f"guard.rollback.detectors.{k} must be null or an integer >= 0 (got {v!r})")
    if not (isinstance(cfg["tail_steps"], int) and cfg["tail_steps"] >= 1):
        problems.append(f"guard.rollback.detectors.tail_steps must be an integer >= 1 (got {cfg['tail_steps']!r})")
    needs = [k for k in MINI5CAT_SETTINGS if cfg[k] is not None]
    if needs and not mini5cat:
        problems.append(
            f"guard.rollback.detectors.{', '.join(needs)} read mini-5CAT's figures: turn callbacks.mini5cat on or set them to null"
        )
    return problems
