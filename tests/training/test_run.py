"""A run's directory under hostile use (lvm/training/run.py with lvm/runtime/rundir.py): one writer,
and ckpt_path=auto after a kill before the first last.ckpt or with a corrupt last.ckpt."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lvm.runtime.errors import LvmError
from lvm.training.run import run
from tests.callbacks.test_resume import Kill, KillAtStep
from tests.helpers import ROOT, TINY, cfg_for, history, hold_lock, train_cli

# Same weights, batches and dropout masks on every try: two runs of it can be compared row by row.
GUARDED = ["guard=rollback", "trainer.deterministic=true", "model.dropout=0.1", "callbacks.resume.every_n_steps=null"]


def test_a_second_process_is_refused_naming_the_holder_and_writes_nothing(tmp_path):
    holder = hold_lock(tmp_path)
    try:
        r = train_cli(*TINY, f"hydra.run.dir={tmp_path}", "ckpt_path=auto", "threads=1")
    finally:
        holder.kill()
        holder.wait()
    assert r.returncode == 2, r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith(f"lvm.train: run directory {tmp_path} is in use by another run (pid {holder.pid} on host ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.lock"]  # the holder's: no log, no .hydra/ of the refused run


def test_a_run_refused_by_a_finished_run_leaves_its_log_and_launch_record_as_they_were(tmp_path):
    first = train_cli(*TINY, f"hydra.run.dir={tmp_path}", "threads=1", "trainer.max_epochs=1")
    assert first.returncode == 0, first.stderr[-3000:]
    kept = {p: p.read_bytes() for p in [tmp_path / "train.log", *(tmp_path / ".hydra").iterdir()]}
    assert {p.name for p in kept} == {"train.log", "config.yaml", "hydra.yaml", "overrides.yaml"}
    assert "Run completed" in (tmp_path / "train.log").read_text()
    r = train_cli(*TINY, f"hydra.run.dir={tmp_path}", "threads=1", "seed=7")
    assert r.returncode == 2 and "already holds a run" in r.stderr, r.stderr[-3000:]
    assert {p: p.read_bytes() for p in kept} == kept  # its overrides still say how the run there was launched
    assert "- seed=7" not in (tmp_path / ".hydra" / "overrides.yaml").read_text()


def test_killed_before_its_first_last_ckpt_auto_starts_over(tmp_path, caplog):
    with pytest.raises(Kill):
        run(cfg_for(*GUARDED), tmp_path, extra_callbacks=[KillAtStep(2)])
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["good-initial.ckpt"]
    assert (tmp_path / "config.yaml").is_file() and (tmp_path / "tb").is_dir()
    with caplog.at_level(logging.WARNING):
        results = run(cfg_for(*GUARDED, "ckpt_path=auto"), tmp_path)
    assert "no checkpoint beyond its initial weights: starting the run over" in caplog.text
    fresh = run(cfg_for(*GUARDED), tmp_path / "fresh")
    assert results["status"] == "completed" and "resumed_from" not in results
    assert history(tmp_path) == history(tmp_path / "fresh") and results["best_val_cos"] == fresh["best_val_cos"]


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("two")
    run(cfg_for(*GUARDED), d)
    return d


def corrupt_copy(src: Path, dst: Path) -> Path:
    """A copy of the run `src` whose last.ckpt lost its second half (a write cut short), file times kept."""
    subprocess.run(["cp", "-a", str(src), str(dst)], check=True)
    last = dst / "checkpoints" / "last.ckpt"
    data = last.read_bytes()
    stat = last.stat()
    last.write_bytes(data[: len(data) // 2])
    os.utime(last, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    return last


def test_a_corrupt_last_ckpt_refused_by_last_and_auto_falls_back_to_the_newest_intact(two_epochs, tmp_path, caplog):
    run_dir = tmp_path / "run"
    last = corrupt_copy(two_epochs, run_dir)
    cut = last.read_bytes()
    with pytest.raises(LvmError, match=rf"checkpoint {last}: cannot be loaded, truncated or corrupt"):
        run(cfg_for(*GUARDED, "ckpt_path=last", "trainer.max_epochs=3"), run_dir)
    intact = sorted((p for p in (run_dir / "checkpoints").glob("*.ckpt") if p.name != "last.ckpt"), key=lambda p: p.stat().st_mtime_ns)[-1]
    with caplog.at_level(logging.WARNING):
        results = run(cfg_for(*GUARDED, "ckpt_path=auto", "trainer.max_epochs=3"), run_dir)
    said = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("ckpt_path=auto: checkpoint"))
    assert "set aside as last.ckpt.corrupt" in said and f"resuming from {intact} (epoch 1, step " in said
    assert "are trained again (metrics.jsonl reached step" in said
    assert (run_dir / "checkpoints" / "last.ckpt.corrupt").read_bytes() == cut  # kept for inspection
    assert results["status"] == "completed" and results["resumed_from"]["checkpoint"] == str(intact)
    assert [r["epoch"] for r in history(run_dir)] == [0, 1, 2]
    assert history(run_dir)[:2] == history(two_epochs)  # the epochs before the fallback point are kept once


def test_auto_with_a_corrupt_last_ckpt_and_nothing_to_fall_back_to_is_refused(two_epochs, tmp_path):
    run_dir = tmp_path / "run"
    last = corrupt_copy(two_epochs, run_dir)
    for p in (run_dir / "checkpoints").glob("*.ckpt"):
        if p != last:
            p.write_bytes(b"not a checkpoint")
    with pytest.raises(LvmError, match="ckpt_path=auto found no other readable checkpoint"):
        run(cfg_for(*GUARDED, "ckpt_path=auto"), run_dir)
    assert last.is_file()  # refused: nothing renamed, nothing deleted


@pytest.mark.slow
def test_two_trainings_in_one_directory_one_is_refused_and_the_other_keeps_its_record(tmp_path):
    """A real second process, started with ckpt_path=auto once the first has written last.ckpt."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = [*TINY, "trainer.max_epochs=150", f"hydra.run.dir={tmp_path}", "threads=1"]
    first = subprocess.Popen(
        [sys.executable, "-m", "lvm.train", *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "checkpoints" / "last.ckpt").exists():
            assert time.monotonic() < deadline and first.poll() is None, "the first run never wrote last.ckpt"
            time.sleep(0.2)
        second = train_cli(*args, "ckpt_path=auto")
        assert first.poll() is None, "the first run ended before the second started: lengthen it"
        assert second.returncode == 2 and f"in use by another run (pid {first.pid} on host " in second.stderr
    finally:
        first.wait(timeout=300)
    assert first.returncode == 0, first.stderr
    assert [r["epoch"] for r in history(tmp_path)] == list(range(150))
    assert not (tmp_path / "run.lock").exists()


@pytest.mark.slow
def test_kill_9_before_the_first_last_ckpt_then_auto_completes(tmp_path):
    """A real kill -9 as soon as the guard has written the initial weights, then ckpt_path=auto."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = [*TINY, *GUARDED, "trainer.max_epochs=6", f"hydra.run.dir={tmp_path}", "threads=1"]
    victim = subprocess.Popen([sys.executable, "-m", "lvm.train", *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (tmp_path / "checkpoints" / "good-initial.ckpt").exists():
        assert time.monotonic() < deadline and victim.poll() is None
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not (tmp_path / "checkpoints" / "last.ckpt").exists() and (tmp_path / "run.lock").exists()
    r = train_cli(*args, "ckpt_path=auto")
    assert r.returncode == 0, r.stderr
    assert [row["epoch"] for row in history(tmp_path)] == list(range(6)) and not (tmp_path / "run.lock").exists()
