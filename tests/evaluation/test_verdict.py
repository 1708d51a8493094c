"""The verdict of a finished run (lvm/evaluation/verdict.py): best and last beside the baselines."""

from __future__ import annotations

import math

from lvm.evaluation.verdict import best_epoch, verdict, verdict_lines, verdict_word

BASE = {"copy_last": 0.52, "mean_context": 0.608, "slot_linear": 0.615}
BEST = {"epoch": 2, "val_cos": 0.6102, "checkpoint": "ckpts/best-epoch02.ckpt"}


def last(val_cos):
    return {"epoch": 5, "val_cos": val_cos, "checkpoint": "ckpts/last.ckpt"}


def test_a_healthy_last_model_has_no_warning():
    v = verdict(BEST, last(0.6095), BASE)
    assert v["warnings"] == [] and verdict_word(v) == "ok"
    assert v["best"] == BEST and v["baselines"] == BASE
    assert verdict_lines(v) == [
        "best val cos 0.6102 (epoch 2, ckpts/best-epoch02.ckpt); last val cos 0.6095 (epoch 5, ckpts/last.ckpt)",
        "baselines, val cos: copy-last 0.5200, mean of context 0.6080, slot-linear 0.6150",
    ]


def test_a_last_model_below_mean_of_context_and_far_below_the_best_names_the_checkpoint_to_use():
    """make train's p6b_v2 once ended at 0.5485 with mean of context at 0.608 and said nothing."""
    v = verdict(BEST, last(0.5485), BASE)
    use = "use ckpts/best-epoch02.ckpt (epoch 2, val cos 0.6102)"
    assert v["warnings"] == [
        f"the last model (val cos 0.5485) is below mean of context (0.6080): {use}",
        f"the last model (val cos 0.5485) is 0.0617 below the best: {use}",
    ]


def test_a_nan_or_collapsed_run_is_never_called_ok():
    nan = verdict(BEST, last(float("nan")), BASE)
    assert nan["warnings"] == ["the last model has no finite val cos: use ckpts/best-epoch02.ckpt (epoch 2, val cos 0.6102)"]
    collapsed = verdict({**BEST, "val_cos": 0.40}, last(-0.078), BASE)  # v1 at the original's shape
    assert all(w.endswith("no checkpoint of this run beats mean of context") for w in collapsed["warnings"])
    assert len(collapsed["warnings"]) == 2 and verdict_word(collapsed) != "ok"


def test_the_best_epoch_is_the_metrics_row_with_the_best_score():
    rows = [{"epoch": 0, "val/cos": 0.60}, {"epoch": 1, "val/cos": 0.6102}, {"epoch": 2, "val/cos": math.nan}, {"epoch": 3}]
    assert best_epoch(rows, 0.6102) == 1 and best_epoch(rows, None) is None and best_epoch(rows, 0.7) is None
