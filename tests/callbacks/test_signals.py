"""SIGTERM and SIGUSR1 (a scheduler's preemption) and Ctrl-C (SIGINT): save a resumable last.ckpt,
write the status, exit 4 (130 for Ctrl-C); a second Ctrl-C ends the process at once."""

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

from lvm.evaluation import suite
from lvm.evaluation.suite import evaluate_checkpoint
from lvm.runtime.cli import EXIT_INTERRUPTED, EXIT_PREEMPTED, exit_code_for
from lvm.runtime.signals import StopSignals
from lvm.training.run import run
from tests.helpers import ROOT, TINY, cfg_for, history, steps_per_epoch, train_cli


def test_stop_signals_are_recorded_while_entered_and_restored_after():
    before = signal.getsignal(signal.SIGUSR1)
    with StopSignals() as s:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert s.received == "SIGUSR1"
    assert signal.getsignal(signal.SIGUSR1) == before


def test_a_first_ctrl_c_is_recorded_and_gives_sigint_its_default_action_back():
    missed = []  # a SIGINT that StopSignals lets through lands here, not in pytest's KeyboardInterrupt
    before = signal.signal(signal.SIGINT, lambda signum, frame: missed.append(signum))
    try:
        mine = signal.getsignal(signal.SIGINT)
        with StopSignals() as s:
            os.kill(os.getpid(), signal.SIGINT)
            assert s.received == "SIGINT" and not missed
            assert signal.getsignal(signal.SIGINT) == signal.SIG_DFL  # a second one would kill
            s.take_over()  # at fit start: keeps the default for SIGINT
            assert signal.getsignal(signal.SIGINT) == signal.SIG_DFL
        assert signal.getsignal(signal.SIGINT) == mine
    finally:
        signal.signal(signal.SIGINT, before)


# A second Ctrl-C while the first waits for its save: the process dies of SIGINT (the shell's 130),
# also when Lightning's teardown has put lvm's handler back. Neither exit 0 nor lvm's 2.
SECOND_CTRL_C = """
import os, signal, sys, time
from lvm.runtime.signals import StopSignals
with StopSignals() as s:
    os.kill(os.getpid(), signal.SIGINT)
    print(s.received, flush=True)
    if sys.argv[1] == "restored":
        signal.signal(signal.SIGINT, s._handle)
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(30)
print("survived", flush=True)
"""


@pytest.mark.parametrize("handler", ["default", "restored"])
def test_a_second_ctrl_c_kills_at_once(handler):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", SECOND_CTRL_C, handler], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGINT, proc.stderr[-2000:]
    assert proc.stdout == "SIGINT\n" and time.monotonic() - start < 20


@pytest.mark.parametrize(
    ("sig", "status", "code"),
    [
        (signal.SIGTERM, "preempted", EXIT_PREEMPTED),
        pytest.param(signal.SIGUSR1, "preempted", EXIT_PREEMPTED, marks=pytest.mark.slow),  # the SIGTERM path; fast: in-process above
        pytest.param(signal.SIGINT, "interrupted", EXIT_INTERRUPTED, marks=pytest.mark.slow),  # fast: in-process below
    ],
    ids=["SIGTERM", "SIGUSR1", "SIGINT"],
)
def test_signal_saves_a_resumable_checkpoint_and_exits_with_its_status(tmp_path, sig, status, code):
    """SIGINT (Ctrl-C) went to Lightning's KeyboardInterrupt shutdown: exit 2, no results.json, the
    epoch's steps lost."""
    run_dir = tmp_path / "run"
    args = [*TINY, "trainer.max_epochs=200", "eval.after_fit=true", f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "lvm.train", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 120
    while not (run_dir / "metrics.jsonl").is_file() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)  # training has run an epoch: the handlers are in place
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err[-2000:]
    assert "KeyboardInterrupt" not in err
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == status and results["epochs_completed"] < 200
    assert "5cat" not in results  # the post-fit evaluation is skipped, as the user asked to stop
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


def test_ctrl_c_mid_epoch_saves_at_the_step_and_ends_interrupted_without_the_evaluation(tmp_path):
    """Ctrl-C went to Lightning's KeyboardInterrupt shutdown (sys.exit(1): lvm's exit 2), without
    results.json and with the epoch's steps lost."""

    class CtrlC(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.current_epoch == 1 and batch_idx == 2:
                os.kill(os.getpid(), signal.SIGINT)

    missed = []  # a SIGINT that StopSignals lets through lands here, not in pytest's KeyboardInterrupt
    before = signal.signal(signal.SIGINT, lambda signum, frame: missed.append(signum))
    try:
        results = run(cfg_for("trainer.max_epochs=4", "eval.after_fit=true"), tmp_path, extra_callbacks=[CtrlC()])
    finally:
        signal.signal(signal.SIGINT, before)
    assert results["status"] == "interrupted" and not missed
    assert exit_code_for(results["status"]) == EXIT_INTERRUPTED
    written = json.loads((tmp_path / "results.json").read_text())
    assert written["status"] == "interrupted" and "5cat" not in written
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == results["global_step"] == steps_per_epoch(tmp_path) + 3  # the batch it came in
    run(cfg_for("trainer.max_epochs=3", "ckpt_path=last"), tmp_path)
    assert [r["epoch"] for r in history(tmp_path)] == [0, 1, 2]


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


def test_ctrl_c_in_the_post_fit_evaluation_keeps_the_fit_and_a_resume_runs_it(tmp_path, monkeypatch):
    """Ctrl-C in the post-fit 5CAT (after StopSignals) ended in a bare KeyboardInterrupt: no
    results.json for a finished fit."""
    evaluated = []

    def ctrl_c_at_the_second(path, *args, **kwargs):
        if evaluated:
            raise KeyboardInterrupt  # what Python's own SIGINT handler raises
        evaluated.append(path)
        return evaluate_checkpoint(path, *args, **kwargs)

    monkeypatch.setattr(suite, "evaluate_checkpoint", ctrl_c_at_the_second)
    try:
        results = run(cfg_for("trainer.max_epochs=2", "eval.after_fit=true"), tmp_path)
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C in the post-fit 5CAT escaped the run")
    written = json.loads((tmp_path / "results.json").read_text())
    assert written["status"] == results["status"] == "interrupted" and written["fit_status"] == "completed"
    assert exit_code_for(written["status"]) == EXIT_INTERRUPTED
    assert written["epochs_completed"] == 2 and "5cat" not in written
    monkeypatch.setattr(suite, "evaluate_checkpoint", evaluate_checkpoint)
    resumed = run(cfg_for("trainer.max_epochs=2", "eval.after_fit=true", "ckpt_path=last"), tmp_path)
    assert resumed["status"] == "completed" and resumed["global_step"] == written["global_step"]  # no step trained again
    assert set(resumed["5cat"]) == {"best", "last"}
    assert [r["epoch"] for r in history(tmp_path)] == [0, 1]
