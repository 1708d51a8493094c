"""Torch threads from the CPUs a process may use (its affinity), shared among parallel sweep jobs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from lvm.runtime import threads as T
from lvm.runtime.errors import ConfigError
from lvm.runtime.launchers import JOBLIB_LAUNCHER, sweep_jobs
from tests.helpers import ROOT, TINY


def test_auto_is_the_affinity_divided_among_jobs(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5})
    assert T.thread_count("auto") == 6
    assert T.thread_count("auto", jobs=4) == 1 and T.thread_count("auto", jobs=2) == 3
    assert T.thread_count("auto", jobs=12) == 1  # never 0
    assert T.thread_count(3, jobs=4) == 3  # a number is taken as given


@pytest.mark.parametrize("bad", [0, -2, "many", 1.5, True])
def test_bad_setting_is_named(bad):
    with pytest.raises(ConfigError, match="threads must be auto or an integer >= 1"):
        T.thread_count(bad)


def test_set_threads_sets_torch(monkeypatch):
    before = torch.get_num_threads()
    try:
        assert T.set_threads(1) == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_parallel_sweep_jobs_share_the_machine(monkeypatch):
    monkeypatch.setattr(T, "usable_cpus", lambda: 8)
    joblib = lambda n: SimpleNamespace(launcher=SimpleNamespace(_target_=JOBLIB_LAUNCHER, n_jobs=n))  # noqa: E731
    assert sweep_jobs(joblib(3)) == 3
    assert sweep_jobs(joblib(-1)) == 8  # joblib: CPUs + 1 + n_jobs
    assert sweep_jobs(SimpleNamespace(launcher=SimpleNamespace(_target_="basic"))) == 1


def test_training_uses_the_cpus_it_may_use(tmp_path):
    """Under `taskset -c 0` a training takes one torch thread (before: torch's default, every core)."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs 2 CPUs to tell the affinity from the machine")
    if shutil.which("taskset") is None:
        pytest.skip("needs taskset (util-linux)")
    proc = subprocess.run(
        ["taskset", "-c", "0", sys.executable, "-m", "lvm.train", *TINY, "trainer.max_epochs=1", f"hydra.run.dir={tmp_path}"],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "torch threads: 1 (threads=auto, 1 usable CPUs" in (tmp_path / "train.log").read_text()
