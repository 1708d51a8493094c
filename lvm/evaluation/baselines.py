"""The reference predictors shown beside every model: the oracle (pred = target), copy-last, mean
of context and slot-linear (one least-squares weight per context slot, fitted on the train split).
The math is in lvm/evaluation/metrics.py; this file fits it on a split and scores whole splits."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from lvm.data.store import Windows
from lvm.evaluation import metrics as M
from lvm.evaluation.fivecat import Predictor
from lvm.runtime.errors import LvmError

BASELINES = ("copy_last", "mean_context", "slot_linear")


def fit_slot_linear(train: Windows, batch_size: int) -> torch.Tensor:
    """Slot-linear weights [K] (float64) by least squares on every window of `train`."""
    if not len(train):
        raise LvmError("the slot-linear baseline is fitted on the train split, which has no window")
    return M.fit_slot_weights((b["context"], b["target"]) for b in train.batches(batch_size))


def reference_predictors(weights: torch.Tensor) -> dict[str, Predictor]:
    """The oracle and the baselines as predictors of batches (slot-linear with `weights`)."""
    return {
        "oracle": lambda b: b["target"],
        "copy_last": lambda b: M.copy_last(b["context"]),
        "mean_context": lambda b: M.mean_context(b["context"]),
        "slot_linear": lambda b: M.slot_linear(b["context"], weights),
    }


def baseline_cosines(splits: Mapping[str, Windows], weights: torch.Tensor, batch_size: int) -> dict[str, dict[str, float]]:
    """Mean cos(pred, target) of each baseline on every window of each split that has windows."""
    predictors = {k: v for k, v in reference_predictors(weights).items() if k in BASELINES}
    out = {}
    for name, windows in splits.items():
        if not len(windows):
            continue
        sums = dict.fromkeys(predictors, 0.0)
        for b in windows.batches(batch_size):
            for k, predict in predictors.items():
                sums[k] += M.cos(predict(b), b["target"]).double().sum().item()
        out[name] = {k: v / len(windows) for k, v in sums.items()}
    return out
