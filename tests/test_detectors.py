"""Collapse detectors on hand-made statistics."""

import math

from lvm.detectors import check_training, check_validation

CFG = {
    "start_step": 0, "nonfinite": True, "negative_cosines": True, "orthogonal_eps": 0.05,
    "raw_norm_floor": 0.01, "lambda_pinned_steps": 3, "val_floor": 0.1, "val_drop": 0.15, "below_copy_last": 0.2,
}


def row(pos=0.5, neg=0.45, lam=0.01, lam_max=0.05, raw_norm=0.6, margin=0.02, loss=0.01):
    return {"train/loss": loss, "train/mse": loss, "train/pos": pos, "train/neg": neg, "train/gap": pos - neg,
            "train/lambda_eff": lam, "train/lambda_max": lam_max, "train/raw_norm": raw_norm, "train/margin": margin}


def names(trips):
    return [t.detector for t in trips]


def test_healthy_window_trips_nothing():
    trips, pinned = check_training([row() for _ in range(5)], CFG, 0)
    assert trips == [] and pinned == 0


def test_seed_collapse_signature():
    # Late epoch 3 of the seed: pos -0.058, neg -0.519, gap +0.46.
    trips, _ = check_training([row(pos=-0.058, neg=-0.519)] * 4, CFG, 0)
    assert names(trips) == ["negative_cosines"] and trips[0].severity == "collapse"
    assert math.isclose(trips[0].values["gap"], 0.461)


def test_single_negative_batch_is_not_a_collapse():
    rows = [row()] * 9 + [row(pos=-0.05, neg=-0.1)]
    assert check_training(rows, CFG, 0)[0] == []


def test_orthogonal_escape_and_raw_norm():
    trips, _ = check_training([row(pos=0.03, neg=-0.02, raw_norm=0.005)] * 3, CFG, 0)
    assert set(names(trips)) == {"orthogonal_escape", "raw_norm_collapse"}
    # Near-zero cosines with a gap below the margin are an untrained model, not an escape.
    assert check_training([row(pos=0.01, neg=0.0)] * 3, CFG, 0)[0] == []


def test_nonfinite_is_reported_first():
    trips, _ = check_training([row(), row(loss=float("nan"))], CFG, 0)
    assert names(trips) == ["nonfinite"]


def test_lambda_pinned_counts_across_windows_and_resets():
    pinned_row = row(lam=0.05, lam_max=0.05)
    trips, n = check_training([pinned_row] * 2, CFG, 0)
    assert trips == [] and n == 2
    trips, n = check_training([pinned_row] * 2, CFG, n)
    assert names(trips) == ["lambda_pinned"] and trips[0].severity == "warning" and n == 4
    assert check_training([row()], CFG, n)[1] == 0


def test_validation_detectors():
    assert check_validation(0.5, 0.52, 0.55, CFG) == []
    assert names(check_validation(-0.05, 0.52, 0.48, CFG)) == ["val_floor", "val_drop", "below_copy_last"]
    assert names(check_validation(0.39, 0.52, 0.55, CFG)) == ["val_drop"]
    assert names(check_validation(0.31, 0.52, None, CFG)) == ["below_copy_last"]
    off = {**CFG, "val_floor": None, "val_drop": None, "below_copy_last": None}
    assert check_validation(-0.5, 0.5, 0.6, off) == []
    assert names(check_validation(float("nan"), 0.5, 0.6, CFG)) == ["nonfinite"]
