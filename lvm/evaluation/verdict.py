"""How a finished run's model compares: its best and last epochs beside the baselines, with a
warning, naming the checkpoint to use, when the last model is below mean of context or has fallen
well below the best. results.json's `verdict`, the run's last log lines and the sweep and search
summaries all say it."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

# A last model this far below the best epoch's val cos is a warning (the recipe lost ground).
DROP_FROM_BEST = 0.02


def best_epoch(rows: Sequence[Mapping[str, Any]], best_val_cos: float | None) -> int | None:
    """The epoch of metrics.jsonl whose val cos is the best checkpoint's score (the first such)."""
    if best_val_cos is None:
        return None
    return next((int(r["epoch"]) for r in rows if r.get("val/cos") is not None and math.isclose(r["val/cos"], best_val_cos)), None)


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def verdict(best: Mapping[str, Any], last: Mapping[str, Any], baselines: Mapping[str, float]) -> dict[str, Any]:
    """`best` and `last`: {epoch, val_cos, checkpoint} (None where unknown); `baselines`: the val cos of
    copy_last, mean_context and slot_linear. Warnings name the checkpoint to use instead of the last."""
    mean_context = baselines.get("mean_context")
    if _finite(best["val_cos"]) and (mean_context is None or best["val_cos"] >= mean_context):
        use = f"use {best['checkpoint']} (epoch {best['epoch']}, val cos {best['val_cos']:.4f})"
    else:
        use = "no checkpoint of this run beats mean of context"
    warnings = []
    if not _finite(last["val_cos"]):
        warnings.append(f"the last model has no finite val cos: {use}")
    else:
        if mean_context is not None and last["val_cos"] < mean_context:
            warnings.append(f"the last model (val cos {last['val_cos']:.4f}) is below mean of context ({mean_context:.4f}): {use}")
        if _finite(best["val_cos"]) and last["val_cos"] < best["val_cos"] - DROP_FROM_BEST:
            gap = best["val_cos"] - last["val_cos"]
            warnings.append(f"the last model (val cos {last['val_cos']:.4f}) is {gap:.4f} below the best: {use}")
    return {"best": dict(best), "last": dict(last), "baselines": dict(baselines), "warnings": warnings}


def verdict_lines(v: Mapping[str, Any]) -> list[str]:
    """The verdict's closing log lines (the warnings are logged after them, as warnings)."""

    def said(m: Mapping[str, Any]) -> str:
        value = "none" if m["val_cos"] is None else f"{m['val_cos']:.4f}"
        return f"val cos {value} (epoch {m['epoch']}, {m['checkpoint']})"

    b = v["baselines"]
    names = {"copy_last": "copy-last", "mean_context": "mean of context", "slot_linear": "slot-linear"}
    return [
        f"best {said(v['best'])}; last {said(v['last'])}",
        "baselines, val cos: " + ", ".join(f"{names.get(k, k)} {x:.4f}" for k, x in b.items()),
    ]


def verdict_word(v: Mapping[str, Any] | None) -> str:
    """One cell for a summary table: ok, or the warnings."""
    if not v:
        return ""
    return "; ".join(v["warnings"]) or "ok"
