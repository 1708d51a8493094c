"""The guard's record of a run: events.jsonl read back and summed up (results.json, sweep summaries, drills)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lvm.runtime.files import read_jsonl


def summarize_events(events: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """What a run's guard record (events.jsonl rows) adds up to: rollbacks, stops, and how often
    each detector tripped as a collapse and as a warning (results.json, the sweep summary, lvm.tools.drill)."""

    def count(severity: str) -> dict[str, int]:
        out: dict[str, int] = {}
        for e in events:
            if e.get("severity") == severity:
                out[e["detector"]] = out.get(e["detector"], 0) + 1
        return out

    return {
        "rollbacks": sum(e.get("action") == "rollback" for e in events),
        "stops": sum(e.get("action") == "stop" for e in events),
        "collapses": count("collapse"),
        "warnings": count("warning"),
        "events": len(events),
    }


def read_events(path: Path) -> list[dict[str, Any]]:
    """The guard's events of a run (none when the file is missing)."""
    return read_jsonl(path)


def guard_policy(guard: Mapping[str, Any]) -> str:
    """The name of the guard a run's `guard` config builds, for its record: rollback (collapse
    detection and rollback), skip (the v2 skip rule alone) or none."""
    if guard.get("rollback") is not None:
        return "rollback"
    return "skip" if guard.get("skip_rule") is not None else "none"
