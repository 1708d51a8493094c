"""Reading finished runs back: their results and guard record as summary values, and their per-step TensorBoard scalars."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lvm.evaluation.verdict import verdict_word
from lvm.guard.events import read_events, summarize_events
from lvm.runtime.errors import LvmError
from lvm.runtime.rundir import read_results


def run_values(run_dir: Path) -> tuple[dict[str, Any], str]:
    """A run directory's METRICS and verdict (results.json and events.jsonl; None where missing) and status."""
    results, status = read_results(run_dir)
    record = summarize_events(read_events(run_dir / "events.jsonl"))
    final = results.get("final", {})
    values = {
        "best_val_cos": results.get("best_val_cos"),
        "final_val_cos": final.get("val/cos"),
        "slot_linear_val_cos": results.get("baselines", {}).get("val", {}).get("slot_linear"),
        "margin_last": final.get("mini5cat/margin_last"),
        "r5": final.get("mini5cat/r5"),
        "rollbacks": record["rollbacks"],
        "events": record["events"],
        "skipped_batches": results.get("guard", {}).get("skipped_batches"),
        "dropped_updates": results.get("guard", {}).get("dropped_updates"),
        "wall_time_s": results.get("wall_time_s"),
        "verdict": verdict_word(results.get("verdict")),
    }
    return values, status


def read_steps(run_dir: Path, tags: list[str]) -> dict[str, tuple[list[int], list[float]]]:
    """Per-step scalars of a run's TensorBoard log (every step: lvm logs each one), read once."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    have = acc.Tags()["scalars"]
    out = {}
    for tag in tags:
        if tag not in have:
            raise LvmError(f"{run_dir}/tb: no scalar {tag!r} (has {sorted(have)})")
        events = acc.Scalars(tag)
        out[tag] = ([e.step for e in events], [e.value for e in events])
    return out
