"""SIGTERM and SIGUSR1 (a scheduler's preemption): save a resumable last.ckpt, write the status, exit 4."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import lightning as L
import pytest
import torch

from lvm.runtime.cli import EXIT_PREEMPTED
from lvm.runtime.signals import StopSignals
from lvm.training.run import run
from tests.helpers import ROOT, TINY, cfg_for, history, steps_per_epoch, train_cli


def test_stop_signals_are_recorded_while_entered_and_restored_after():
    before = signal.getsignal(signal.SIGUSR1)
    with StopSignals() as s:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert s.received == "SIGUSR1"
    assert signal.getsignal(signal.SIGUSR1) == before


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_signal_saves_a_resumable_checkpoint_and_exits_preempted(tmp_path, sig):
    run_dir = tmp_path / "run"
    args = [*TINY, "trainer.max_epochs=200", f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "lvm.train", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 120
    while not (run_dir / "metrics.jsonl").is_file() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)  # training has run an epoch: the handlers are in place
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, err[-2000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "preempted" and results["epochs_completed"] < 200
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == results["global_step"]  # saved at the step it stopped, mid-epoch or not
    resumed = train_cli(
        *TINY, f"trainer.max_epochs={results['epochs_completed'] + 1}", "ckpt_path=last", f"hydra.run.dir={run_dir}", cwd=ROOT
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    final = json.loads((run_dir / "results.json").read_text())
    # The resume finishes the epoch it stopped in (a stop at its last batch leaves only its
    # validation and row), so one more epoch has reached its end.
    assert final["status"] == "completed" and final["epochs_completed"] == results["epochs_completed"] + 1
    assert final["global_step"] >= last["global_step"]
    epochs = [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert epochs == list(range(results["epochs_completed"] + 1))


def test_a_signal_during_validation_stops_at_the_epoch_end_with_its_row_and_checkpoint(tmp_path):
    """Lightning's own SIGTERM handling raised right after the validation, before the epoch's row
    and last.ckpt: the run then resumed from the epoch before and lost that epoch's row."""

    class TermDuringValidation(L.Callback):
        def on_validation_start(self, trainer, pl_module):
            if trainer.current_epoch == 1:
                os.kill(os.getpid(), signal.SIGTERM)

    results = run(cfg_for("trainer.max_epochs=4"), tmp_path, extra_callbacks=[TermDuringValidation()])
    assert results["status"] == "preempted"
    assert json.loads((tmp_path / "results.json").read_text())["status"] == "preempted"
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == results["global_step"] == 2 * steps_per_epoch(tmp_path)
    assert [r["epoch"] for r in history(tmp_path)] == [0, 1]
    run(cfg_for("trainer.max_epochs=3", "ckpt_path=last"), tmp_path)
    assert [r["epoch"] for r in history(tmp_path)] == [0, 1, 2]


def test_a_signal_at_an_epochs_last_batch_stops_after_its_validation(tmp_path):
    """Stopping at the last batch itself would resume as if the epoch had ended, without its
    validation and metrics row: the stop waits for the epoch's end."""

    class UsrAtLastBatch(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.current_epoch == 1 and batch_idx == trainer.num_training_batches - 1:
                os.kill(os.getpid(), signal.SIGUSR1)

    results = run(cfg_for("trainer.max_epochs=4"), tmp_path, extra_callbacks=[UsrAtLastBatch()])
    assert results["status"] == "preempted" and results["epochs_completed"] == 2
    assert [r["epoch"] for r in history(tmp_path)] == [0, 1]
    run(cfg_for("trainer.max_epochs=3", "ckpt_path=last"), tmp_path)
    assert [r["epoch"] for r in history(tmp_path)] == [0, 1, 2]
