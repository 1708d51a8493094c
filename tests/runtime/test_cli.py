"""Command-line conventions shared by the entry points."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lvm.runtime.cli import EXIT_INTERRUPTED, exit_code_for, positional_override, run_entry_point
from tests.helpers import run_module


def test_a_bare_first_argument_is_the_store():
    assert positional_override(["prog", "a/b.npz", "seed=1"], "store") == ["prog", "store='a/b.npz'", "seed=1"]
    assert positional_override(["prog", "it's.npz"], "store") == ["prog", "store='it\\'s.npz'"]
    assert positional_override(["prog", "store=x.npz"], "store") == ["prog", "store=x.npz"]
    assert positional_override(["prog", "--help"], "store") == ["prog", "--help"]


def test_every_training_status_has_its_exit_code():
    """Ctrl-C's `interrupted` is 130, the shell's code for SIGINT (it was Lightning's exit 1, read as 2: bad input)."""
    codes = {"completed": 0, "failed: boom": 1, "stopped: max_rollbacks": 3, "preempted": 4, "interrupted": 130}
    assert {status: exit_code_for(status) for status in codes} == codes


def test_ctrl_c_outside_a_training_is_one_line_and_exit_130(capsys, monkeypatch):
    """Ctrl-C in a set-up or a tool's work ended in Python's KeyboardInterrupt traceback."""

    def main():
        raise KeyboardInterrupt

    monkeypatch.setattr(sys, "argv", ["/somewhere/lvm-evaluate"])
    monkeypatch.setattr(sys.modules["__main__"], "__spec__", None)  # a console script
    with pytest.raises(SystemExit) as stop:
        run_entry_point(main)
    assert stop.value.code == EXIT_INTERRUPTED
    assert capsys.readouterr().err == "lvm-evaluate: interrupted (Ctrl-C)\n"


@pytest.mark.parametrize(
    "module,args,words",
    [
        ("lvm.tools.sweep_report", ["/nowhere/sweep"], "/nowhere/sweep: no such directory"),
        ("lvm.tools.sweep_report", ["/tmp", "metric=accuracy"], "must be one of"),
        ("lvm.bench", ["bench.steps=0"], "bench.steps"),
        pytest.param("lvm.bench", ["model.heads=3"], "model.d_model", marks=pytest.mark.slow),
        pytest.param("lvm.bench", ["no_such_key=1"], "no_such_key", marks=pytest.mark.slow),
    ],
)
def test_every_tool_answers_bad_input_with_one_line_and_exit_2(module, args, words):
    """lvm.bench and lvm.tools.sweep_report follow the same convention as train, evaluate, build and diagnose."""
    proc = run_module(module, *args, timeout=120, threads=1)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and words in proc.stderr, proc.stderr[-2000:]


@pytest.mark.parametrize(
    "script,args,words",
    [
        ("lvm-sweep-report", ["/nowhere/sweep"], "/nowhere/sweep: no such directory"),
        ("lvm-evaluate", ["predictor=nope"], "predictor must be one of"),
    ],
)
def test_console_scripts_find_the_configs(script, args, words):
    """A console script's module is not __main__: its configs must still be found (a relative
    config_path was read as a Python package and every script failed with 'conf' not found)."""
    path = Path(sys.executable).parent / script
    if not path.is_file():
        pytest.skip(f"{script} is not installed beside {sys.executable}")
    proc = subprocess.run([str(path), *args], capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert words in proc.stderr and "not found" not in proc.stderr, proc.stderr[-2000:]
