"""`python -m lvm.tools.compare`: runs side by side against their baselines (table and plot), bad input."""

from __future__ import annotations

import json

import pytest

from lvm.runtime.errors import ConfigError, LvmError
from lvm.tools.compare import compare
from lvm.tools.runs import read_steps
from lvm.training.run import run
from tests.helpers import cfg_for, run_module

BASE = {"copy_last": 0.52, "mean_context": 0.608, "slot_linear": 0.615}


def fake_run(path, name, values, status="completed"):
    path.mkdir(parents=True)
    rows = [{"epoch": e, "val/cos": v} for e, v in enumerate(values)]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in reversed(rows)))  # any order
    (path / "results.json").write_text(json.dumps({"name": name, "status": status, "baselines": {"val": BASE}}))
    return str(path)


def test_table_and_plot(tmp_path):
    a = fake_run(tmp_path / "a", "p6_baseline", [0.61, 0.614, 0.612])
    b = fake_run(tmp_path / "b", "p6b_v1", [0.598, 0.467], "stopped: max_rollbacks")
    paths = compare([a, b], None, "val/cos", "val", "built-in", str(tmp_path / "out" / "cmp"))
    md = (tmp_path / "out" / "cmp.md").read_text().splitlines()
    assert md[0] == "# built-in"
    assert md[4] == "| p6_baseline | 0.6100 | 0.6140 | 0.6120 | 0.6140 | completed |"
    assert md[5] == "| p6b_v1 | 0.5980 | 0.4670 |  | 0.5980 | stopped: max_rollbacks |"
    assert md[-1] == "Baselines (val): copy_last 0.5200, mean_context 0.6080, slot_linear 0.6150"
    assert open(paths["png"], "rb").read(4) == b"\x89PNG"
    with pytest.raises(ConfigError, match="labels"):
        compare([a, b], ["one"], "val/cos", "val", None, str(tmp_path / "x"))
    with pytest.raises(LvmError, match="no epoch has 'ood/cos'"):
        compare([a], None, "ood/cos", "val", None, str(tmp_path / "x"))


def test_cli_names_a_missing_run(tmp_path):
    proc = run_module("lvm.tools.compare", f"runs=[{tmp_path / 'nope'}]", f"out={tmp_path / 'o'}", timeout=120, threads=1)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "not a finished run directory" in proc.stderr


def test_per_step_panels_from_a_real_run(tmp_path):
    run(cfg_for("trainer.max_epochs=1"), tmp_path / "r")
    tags = ["train/raw_norm", "train/dir_grad_share", "train/lambda_eff"]
    paths = compare([str(tmp_path / "r")], ["tiny"], "val/cos", "val", None, str(tmp_path / "c"), tags, 5)
    assert open(paths["steps"], "rb").read(4) == b"\x89PNG"
    steps, values = read_steps(tmp_path / "r", ["train/dir_grad_share"])["train/dir_grad_share"]
    assert steps == list(range(len(steps))) and all(0 <= v <= 1 for v in values)
    with pytest.raises(LvmError, match="no scalar 'train/nope'"):
        read_steps(tmp_path / "r", ["train/nope"])
