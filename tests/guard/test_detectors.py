"""Collapse detectors on hand-made statistics."""

import math

import pytest
import torch

from lvm.guard.detectors import (
    Streaks,
    check_probe,
    check_start,
    check_training,
    check_validation,
    detector_problems,
)
from lvm.model.module import batch_health
from lvm.runtime.objects import build, to_plain
from tests.helpers import compose_cfg, unit_rows

CFG = {
    "start_step": 0,
    "tail_steps": 3,
    "nonfinite": True,
    "negative_cosines": True,
    "orthogonal_eps": 0.05,
    "raw_norm_floor": 0.01,
    "raw_norm_ceiling": 10.0,
    "max_drops_per_window": 3,
    "diversity_floor": 0.2,
    "ca_floor": 0.6,
    "lambda_pinned_steps": 3,
    "val_floor": 0.1,
    "val_drop": 0.15,
    "below_copy_last": 0.2,
    "below_mean_context": 0.15,
    "val_diversity_floor": 0.2,
    "val_ca_floor": 0.6,
    "constant_floor": 0.001,
}


def row(pos=0.5, neg=0.45, lam=0.01, lam_max=0.05, raw_norm=0.6, margin=0.02, loss=0.01, diversity=0.8, ca=0.95):
    return {
        "train/loss": loss,
        "train/mse": loss,
        "train/pos": pos,
        "train/neg": neg,
        "train/gap": pos - neg,
        "train/lambda_eff": lam,
        "train/lambda_max": lam_max,
        "train/raw_norm": raw_norm,
        "train/margin": margin,
        "train/diversity": diversity,
        "train/ca": ca,
    }


def val(cos=0.5, copy_last=0.52, mini_cos=None, mean_context=0.6, diversity=0.8, ca=0.95):
    out = {
        "val/cos": cos,
        "val/cos_copy_last": copy_last,
        "mini5cat/cos": cos if mini_cos is None else mini_cos,
        "mini5cat/mean_context_cos": mean_context,
        "mini5cat/diversity": diversity,
        "mini5cat/ca": ca,
    }
    return out


def probed(cos=0.5, neg=0.45, diversity=0.8, ca=0.95, raw_norm=0.6, mse=0.01, finite_weights=1.0):
    """A probe of weights (callbacks/rollback.py's `probe`, plus finite_weights)."""
    return {
        "finite_weights": finite_weights,
        "mse": mse,
        "cos": cos,
        "neg": neg,
        "raw_norm": raw_norm,
        "diversity": diversity,
        "ca": ca,
        "cos_copy_last": 0.52,
        "mean_context_cos": 0.6,
        "margin": 0.02,
        "windows": 256.0,
    }


def names(trips):
    return [t.detector for t in trips]


def test_healthy_window_trips_nothing():
    streaks = Streaks()
    assert check_training([row() for _ in range(5)], CFG, streaks) == [] and streaks == Streaks()


def test_seed_collapse_signature():
    # Late epoch 3 of the seed: pos -0.058, neg -0.519, gap +0.46.
    trips = check_training([row(pos=-0.058, neg=-0.519)] * 4, CFG, Streaks())
    assert names(trips) == ["negative_cosines"] and trips[0].severity == "collapse"
    assert math.isclose(trips[0].values["gap"], 0.461)


def test_single_negative_batch_is_not_a_collapse():
    rows = [row()] * 9 + [row(pos=-0.05, neg=-0.1)]
    assert check_training(rows, CFG, Streaks()) == []


def test_orthogonal_escape_and_raw_norm():
    trips = check_training([row(pos=0.03, neg=-0.02, raw_norm=0.005)] * 3, CFG, Streaks())
    assert set(names(trips)) == {"orthogonal_escape", "raw_norm_collapse"}
    # Near-zero cosines with a gap below the margin are an untrained model, not an escape.
    assert check_training([row(pos=0.01, neg=0.0)] * 3, CFG, Streaks()) == []


def test_nonfinite_is_reported_first():
    trips = check_training([row(), row(loss=float("nan"))], CFG, Streaks())
    assert names(trips) == ["nonfinite"]


def test_lambda_pinned_counts_across_windows_and_resets():
    pinned_row = row(lam=0.05, lam_max=0.05)
    streaks = Streaks()
    assert check_training([pinned_row] * 2, CFG, streaks) == [] and streaks.pinned == 2
    trips = check_training([pinned_row] * 2, CFG, streaks)
    assert names(trips) == ["lambda_pinned"] and trips[0].severity == "warning" and streaks.pinned == 4
    check_training([row()], CFG, streaks)
    assert streaks.pinned == 0


def test_dropped_updates_stay_out_of_the_means_and_a_burst_of_them_is_a_collapse():
    nan_batch = {**row(loss=float("nan"), pos=float("nan")), "train/update_dropped": 1.0}
    taken = {**row(), "train/update_dropped": 0.0}
    # One NaN batch whose update was skipped: the weights never took it, nothing trips.
    assert check_training([taken] * 4 + [nan_batch] + [taken] * 4, CFG, Streaks()) == []
    # More skips in one window than the limit (3 here): the weights are somewhere bad.
    assert check_training([taken, nan_batch, taken, nan_batch, nan_batch], CFG, Streaks()) == []
    trips = check_training([taken] + [nan_batch] * 4, CFG, Streaks())
    assert names(trips) == ["spike_burst"] and trips[0].values["dropped"] == 4.0
    # Without the skip (no update_dropped column) a NaN row is a collapse at once.
    assert names(check_training([row(), row(loss=float("nan"))], CFG, Streaks())) == ["nonfinite"]


def test_exploding_raw_norm():
    assert names(check_training([row(raw_norm=40.0)] * 3, CFG, Streaks())) == ["raw_norm_explosion"]


def test_validation_detectors():
    assert check_validation(val(0.5), 0.55, CFG) == []
    assert names(check_validation(val(-0.05), 0.48, CFG)) == ["val_floor", "val_drop", "below_copy_last", "below_mean_context"]
    assert names(check_validation(val(0.46, mean_context=0.6), 0.58, CFG)) == []
    assert names(check_validation(val(0.44, mean_context=0.6), 0.58, CFG)) == ["below_mean_context"]
    assert names(check_validation(val(0.39), 0.55, CFG)) == ["val_drop", "below_mean_context"]
    assert names(check_validation(val(0.31), None, CFG)) == ["below_copy_last", "below_mean_context"]
    off = {**CFG, "val_floor": None, "val_drop": None, "below_copy_last": None, "below_mean_context": None}
    assert check_validation(val(-0.5, diversity=0.9, ca=0.9), 0.6, off) == []
    assert names(check_validation(val(float("nan")), 0.6, CFG)) == ["nonfinite"]


def test_constant_output_on_anisotropic_data_trips_diversity_and_contrastive_accuracy():
    # The hostile case: on data whose vectors share a direction, a constant output keeps val cos
    # 0.70 against a best of 0.75 (no floor, drop or baseline detector trips); its spread is 0 and
    # its contrastive accuracy chance.
    constant = val(0.70, copy_last=0.72, mean_context=0.75, diversity=0.0, ca=0.5)
    assert names(check_validation(constant, 0.75, CFG)) == ["val_low_diversity", "val_contrastive_chance"]
    trips = check_training([row(diversity=0.0, ca=0.5)] * 5, CFG, Streaks())
    assert names(trips) == ["low_diversity", "contrastive_chance"]
    # A collapse in the window's last rows trips at this flush, not one window later; one odd
    # batch among them does not.
    late = [row()] * 47 + [row(diversity=0.0, ca=0.5)] * 3
    assert names(check_training(late, CFG, Streaks())) == ["low_diversity", "contrastive_chance"]
    assert check_training([row()] * 47 + [row(diversity=0.0, ca=0.5), row(), row()], CFG, Streaks()) == []
    # Without mini-5CAT's figures those validation detectors have nothing to read.
    bare = {k: v for k, v in constant.items() if not k.startswith("mini5cat/")}
    assert check_validation(bare, 0.75, CFG) == []


def test_a_nan_figure_trips_its_detector():
    assert names(check_validation(val(0.5, diversity=float("nan"), ca=float("nan")), 0.5, CFG)) == [
        "val_low_diversity",
        "val_contrastive_chance",
    ]


def test_detector_settings_are_checked_at_start_up():
    assert detector_problems(CFG, mini5cat=True) == []
    bad = {**CFG, "diversity_floor": -1, "start_step": 1.5, "typo": 3}
    problems = detector_problems(bad, mini5cat=True)
    assert problems == ["guard.rollback.detectors.typo: no such detector setting (known: " + ", ".join(sorted(CFG)) + ")"]
    del bad["typo"]
    problems = detector_problems(bad, mini5cat=False)
    assert any("diversity_floor must be null or a finite number >= 0 (got -1)" in p for p in problems)
    assert any("start_step must be null or an integer >= 0 (got 1.5)" in p for p in problems)
    assert any("read mini-5CAT's figures" in p for p in problems)
    # The shipped guard's settings are complete and valid.
    shipped = compose_cfg("train", "+experiment=p6b_v2").guard.rollback.detectors
    assert set(shipped) == set(CFG) and detector_problems(dict(shipped), mini5cat=True) == []


@pytest.mark.parametrize("setting", ["guard.rollback.detectors.ca_floor=-0.1", "callbacks.mini5cat=null"])
def test_bad_detector_settings_refuse_to_start(setting):
    from lvm.runtime.errors import ConfigError
    from lvm.training.config import validate

    with pytest.raises(ConfigError, match="guard.rollback.detectors"):
        validate(compose_cfg("train", "+experiment=p6b_v2", setting))


def test_start_check_counts_only_what_an_untrained_model_never_shows():
    # An untrained model: cos ~0, CA at chance, low spread. Nothing trips, trained or not.
    untrained = probed(cos=-0.03, neg=-0.02, diversity=0.03, ca=0.5, raw_norm=16.0)
    assert check_start(untrained, CFG, trained=False) == [] and check_start(untrained, CFG, trained=True) == []
    # One vector for every window: a constant output, from weights that trained only.
    constant = probed(diversity=0.0, ca=0.5)
    trips = check_start(constant, CFG, trained=True)
    assert names(trips) == ["constant_output"] and trips[0].values == {"diversity": 0.0, "limit": 0.001}
    assert check_start(constant, CFG, trained=False) == [] and check_start(constant, {**CFG, "constant_floor": None}, trained=True) == []
    # Non-finite weights or predictions, whether they trained or not.
    assert names(check_start(probed(finite_weights=0.0), CFG, trained=False)) == ["nonfinite"]
    assert names(check_start(probed(mse=float("nan"), diversity=float("nan")), CFG, trained=True)) == ["nonfinite"]


def test_a_probe_judges_what_weights_of_that_age_can_show():
    negative = probed(cos=-0.4, neg=-0.35)
    assert check_probe(negative, CFG, 0.5, step=0) == []  # never trained: a starting point
    # Trained, before start_step (an untrained model's cosines are spared, as in training): the
    # validation detectors only; from start_step on, the window detectors too.
    young = {**CFG, "start_step": 100}
    assert names(check_probe(negative, young, 0.5, step=50)) == ["val_floor", "val_drop", "below_copy_last", "below_mean_context"]
    assert names(check_probe(negative, young, 0.5, step=100))[:2] == ["negative_cosines", "val_floor"]
    assert check_probe(probed(), CFG, 0.5, step=100) == []
    assert names(check_probe(probed(diversity=0.0, ca=0.5), CFG, None, step=100)) == [
        "constant_output",
        "low_diversity",
        "contrastive_chance",
        "val_low_diversity",
        "val_contrastive_chance",
    ]


@pytest.mark.parametrize("dim", [768, 4096])
def test_untrained_models_are_far_above_the_constant_floor(dim):
    """The floor that refuses a trained model's constant output at the start: the untrained model
    of least spread (the original's P6: 0.02 at D = 768, 0.011 at 4096; model=small 0.5) spreads
    its predictions at least 10x more."""
    torch.manual_seed(0)
    net = build("model", to_plain(compose_cfg("train", "model=p6").model), dim=dim).eval()
    context, target = torch.from_numpy(unit_rows(256 * 5, dim).reshape(256, 5, dim)), torch.from_numpy(unit_rows(256, dim, seed=1))
    with torch.no_grad():
        diversity, _ = batch_health(net(context)[1], target)
    floor = compose_cfg("train", "guard=rollback").guard.rollback.detectors.constant_floor
    assert diversity > 10 * floor
