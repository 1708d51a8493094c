"""Reading a finished run back (lvm/tools/runs.py): its status from results.json, whatever state the file is in."""

from __future__ import annotations

import json

from lvm.runtime.rundir import read_results
from lvm.tools.runs import run_values


def test_a_results_file_gives_its_status_and_values(tmp_path):
    results = {"status": "stopped: max_rollbacks", "best_val_cos": 0.61, "final": {"val/cos": 0.6}, "guard": {"skipped_batches": 3}}
    (tmp_path / "results.json").write_text(json.dumps(results))
    assert read_results(tmp_path) == (results, "stopped: max_rollbacks")
    values, status = run_values(tmp_path)
    assert status == "stopped: max_rollbacks"
    assert (values["best_val_cos"], values["final_val_cos"], values["skipped_batches"], values["rollbacks"]) == (0.61, 0.6, 3, 0)


def test_a_missing_truncated_or_status_less_file_is_a_failed_status_naming_it(tmp_path):
    assert read_results(tmp_path) == ({}, "failed: no results.json")
    path = tmp_path / "results.json"
    path.write_text('{"status": "completed", "best_val')  # cut short by a full disk
    results, status = read_results(tmp_path)
    assert results == {} and status.startswith(f"failed: {path} is not readable JSON")
    path.write_text(json.dumps({"best_val_cos": 0.5}))  # no status: not a results file lvm wrote
    assert read_results(tmp_path) == ({}, f"failed: {path} has no status")
    values, status = run_values(tmp_path)
    assert status == f"failed: {path} has no status" and values["best_val_cos"] is None
