"""lvm.tools.drill: one drill end to end (the fast suite), the quick set (slow), and the scoring on hand-made runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lvm.tools.drill import Drill, assess
from tests.helpers import run_module


def test_the_nan_batch_drill_meets_every_goal(tmp_path):
    """The fast suite's drill: one fault, guarded and not, beside its control (the quick set: below)."""
    out = tmp_path / "drills"
    proc = run_module("lvm.tools.drill", "quick=true", "only=[nan_batch]", f"out={out}", "threads=1", timeout=900)
    summary = json.loads((out / "drills.json").read_text())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (row,) = summary["drills"]
    assert row["drill"] == "nan_batch" and row["detected"] and row["action"] == "dropped update" and row["actions"] == 1, row
    assert row["latency_steps"] == 0 and row["missed"] == [] and row["final_off"] is None, row  # unguarded, one NaN poisons for good
    assert row["final_on"] >= row["final_control"] - 0.01, row
    assert len(summary["controls"]) == 1 and summary["controls"][0]["false_alarms"] == 0
    assert "Every goal met: yes" in (out / "drills.md").read_text()
    commands = [line for log in out.rglob("*.log") for line in log.read_text().splitlines() if line.startswith("$ -m lvm.train")]
    assert len(commands) == 3 and all(" threads=1 " in c for c in commands), commands  # the tool's threads setting


@pytest.mark.slow
def test_quick_drills_meet_every_goal(tmp_path):
    out = tmp_path / "drills"
    proc = run_module("lvm.tools.drill", "quick=true", f"out={out}", timeout=900)
    summary = json.loads((out / "drills.json").read_text())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {r["drill"]: r for r in summary["drills"]}
    assert set(rows) == {"constant_output", "constant_output_anisotropic", "nan_batch"}
    for name, r in rows.items():
        expected = "dropped update" if name == "nan_batch" else "rollback"  # a bad record needs no rollback
        assert r["detected"] and r["action"] == expected and r["actions"] == 1, (name, r)
        assert 0 <= r["latency_steps"] <= 50 and r["missed"] == [], (name, r)
        assert r["final_on"] >= r["final_control"] - 0.01, (name, r)
        assert Path(r["plot"]).is_file()
    assert rows["nan_batch"]["latency_steps"] == 0  # the NaN batch's own update was the one skipped
    # Unguarded, the faults stay: the constant model keeps its cosine on anisotropic data, one NaN
    # record poisons the weights for good.
    assert rows["nan_batch"]["final_off"] is None
    assert rows["constant_output_anisotropic"]["final_off"] < rows["constant_output_anisotropic"]["final_control"]
    assert summary["controls"] and all(c["false_alarms"] == 0 for c in summary["controls"])
    assert "Every goal met: yes" in (out / "drills.md").read_text()


def test_scoring_names_each_missed_goal(tmp_path):
    drill = Drill("d", "p6b_v2", (), (), 1, 0.5, "skip", True, "p6b_v2", None, False)
    event = {"severity": "collapse", "detector": "low_diversity", "where": "train", "action": "rollback"}
    control = {"status": "completed", "final": {"val/cos": 0.60}}

    def score(name, on_events, final_on):
        (tmp_path / name).mkdir()
        (tmp_path / name / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in on_events))
        layout = {"drill": drill, "onset": 150, "steps_per_epoch": 100, "flush_every": 50, "on": name, "off": "off", "control": "ctl"}
        results = {
            name: {"status": "completed", "final": {"val/cos": final_on}},
            "off": {"status": "completed", "final": {}},
            "ctl": control,
        }
        return assess(layout, results, tmp_path, 0.01)

    ok = score("ok", [{**event, "step": 180}], 0.595)
    assert ok["detected"] and ok["latency_steps"] == 30 and ok["missed"] == []
    assert score("missed", [], 0.40)["missed"][0] == "not detected"
    late = score("late", [{**event, "step": 210}], 0.60)  # 60 steps: over one window, and in the next epoch
    assert late["missed"] == ["acted 60 steps after onset (goal: <= 50, before the epoch ends)"]
    # An event before the onset is not a detection of this fault; ending 0.05 below the control is a miss.
    early = score("early", [{**event, "step": 120}], 0.55)
    assert early["missed"] == ["not detected", "final val cos 0.5500 vs control 0.6000 (goal: at most 0.01 below)"]


def test_scoring_of_a_killed_and_of_a_moved_run(tmp_path):
    control = {"status": "completed", "final": {"val/cos": 0.60}}

    def score(drill, name, on, on_events=()):
        (tmp_path / name).mkdir(exist_ok=True)
        (tmp_path / name / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in on_events))
        layout = {"drill": drill, "onset": 150, "steps_per_epoch": 100, "flush_every": 50, "on": name, "off": "off", "control": "ctl"}
        return assess(layout, {name: on, "off": {"status": "completed", "final": {}}, "ctl": control}, tmp_path, 0.01)

    killed = Drill("k", "p6b_v2", (), (), 1, 0.5, "skip", True, "p6b_v2", ("kill",), False)
    done = {"status": "completed", "final": {"val/cos": 0.60}}
    row = score(killed, "k1", {**done, "interrupted": {"exit_code": -9, "moved_from": None}, "resumed_from": {"step": 140}})
    assert row["action"] == "resumed from step 140" and row["latency_steps"] == 10 and row["exact"] and row["missed"] == []
    # The first invocation ended by itself (the kill never came), or the resume lost more than a window.
    row = score(killed, "k2", {**done, "interrupted": {"exit_code": 0, "moved_from": None}, "resumed_from": {"step": 140}})
    assert row["missed"] == ["not resumed after the kill"]
    row = score(
        killed,
        "k3",
        {**done, "final": {"val/cos": 0.5999}, "interrupted": {"exit_code": -9, "moved_from": None}, "resumed_from": {"step": 90}},
    )
    assert row["missed"] == ["lost 60 steps to the kill (goal: <= 50)"] and not row["exact"]

    moved = Drill("m", "p6b_v2", (), (), 1, 0.5, "skip", True, "p6b_v2", ("trainer.max_epochs=1",), True)
    rollback = {
        "severity": "collapse",
        "detector": "nonfinite",
        "where": "train",
        "action": "rollback",
        "step": 160,
        "checkpoint": "checkpoints/good-epoch00.ckpt",
    }
    gone = tmp_path / "m.before_move"
    on = {**done, "interrupted": {"exit_code": 0, "moved_from": str(gone)}}
    # The restored good checkpoint may be rotated out later (keep_good): the record is what counts.
    assert score(moved, "m1", on, [rollback])["missed"] == []
    corrupt = {
        "severity": "warning",
        "detector": "corrupt_checkpoint",
        "action": "skipped good-epoch01.ckpt: cannot be loaded",
        "step": 160,
    }
    assert score(moved, "m2", on, [corrupt, rollback])["missed"] == [
        "a restore failed after the move: skipped good-epoch01.ckpt: cannot be loaded"
    ]
    gone.mkdir()
    assert score(moved, "m3", on, [])["missed"][:3] == [
        "not detected",
        f"{gone} still exists after the move",
        "no checkpoint was restored after the move",
    ]
