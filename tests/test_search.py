"""lvm.tools.search: a small search on tiny data prunes, resumes without repeating finished trials and
writes its summary; without Optuna it names the extra to install."""

from __future__ import annotations

import csv
import json
import sys

import pytest

from lvm.runtime.errors import LvmError
from tests.helpers import TINY, hparams_session, run_module

optuna = pytest.importorskip("optuna")

SEARCH = [
    "+search=p6b_v2",
    *[o for o in TINY if not o.startswith("trainer.max_epochs")],
    "trainer.max_epochs=3",
    "threads=1",
    "search.pruner.name=halving",
    "search.pruner.reduction_factor=4",
    "search.sampler.startup_trials=2",
]


def trials_of(out):
    study = optuna.load_study(study_name="p6b_v2", storage=f"sqlite:///{out / 'study.db'}")
    return study.get_trials(deepcopy=False)


def test_search_prunes_resumes_and_summarises(tmp_path):
    out = tmp_path / "search"
    first = run_module("lvm.tools.search", *SEARCH, "search.trials=3", f"out={out}", timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    done = {t.number: (out / f"trial_{t.number:03d}" / "results.json").stat().st_mtime for t in trials_of(out)}
    assert sorted(done) == [0, 1, 2]
    # An interruption left a trial running: it is recorded as failed and its recipe tried again.
    study = optuna.load_study(study_name="p6b_v2", storage=f"sqlite:///{out / 'study.db'}")
    cut = study.ask({"loss.gamma": optuna.distributions.FloatDistribution(1.0, 16.0, log=True)})
    second = run_module("lvm.tools.search", *SEARCH, "search.trials=6", f"out={out}", timeout=900)
    assert second.returncode == 0, second.stderr[-3000:]
    trials = trials_of(out)
    states = {t.number: t.state for t in trials}
    assert states[cut.number] == optuna.trial.TrialState.FAIL
    finished = [t for t in trials if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]
    assert len(finished) == 6
    assert any(t.params.get("loss.gamma") == cut.params["loss.gamma"] and t.number > cut.number for t in finished)
    # The first three trials were not run again.
    assert all((out / f"trial_{n:03d}" / "results.json").stat().st_mtime == m for n, m in done.items())
    pruned = [t for t in finished if t.state == optuna.trial.TrialState.PRUNED]
    assert pruned, "the aggressive pruner pruned nothing"
    for t in pruned:  # a pruned trial's run ended cleanly and says so
        results = json.loads((out / f"trial_{t.number:03d}" / "results.json").read_text())
        assert results["status"] == "stopped: pruned" and results["epochs_completed"] < 3
        assert (out / f"trial_{t.number:03d}" / "checkpoints" / "last.ckpt").is_file()
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert len(rows) == len(trials) and {r["state"] for r in rows} >= {"complete", "pruned", "fail"}
    by_trial = {int(r["trial"]): r for r in rows}
    for t in finished:
        results = json.loads((out / f"trial_{t.number:03d}" / "results.json").read_text())
        assert float(by_trial[t.number]["best_val_cos"]) == pytest.approx(results["best_val_cos"])
        assert float(by_trial[t.number]["loss.gamma"]) == pytest.approx(t.params["loss.gamma"])
        # TensorBoard's hparams tab compares the trials: each run's session holds its parameters.
        values, metrics = hparams_session(out / f"trial_{t.number:03d}" / "tb")
        assert values["loss.gamma"] == pytest.approx(t.params["loss.gamma"]) and values["ramp"] == t.params["ramp"]
        assert values["optim.optimizer.lr"] == pytest.approx(t.params["optim.optimizer.lr"]) and "hparams/best_val_cos" in metrics
        if t.state == optuna.trial.TrialState.COMPLETE:  # no rollback here: the objective is the metric
            assert t.value == pytest.approx(results["best_val_cos"] - 0.001 * results["guard"]["skipped_batches"])
    md = (out / "summary.md").read_text()
    assert "pruning saved" in md and "Best: trial" in md
    for name in ("history.png", "objective_pair.png"):
        assert (out / name).is_file(), name
    complete = [t for t in finished if t.state == optuna.trial.TrialState.COMPLETE]
    assert (out / "importances.png").is_file() == (len(complete) >= 2)  # importances need two complete trials


def test_search_without_optuna_names_the_extra(monkeypatch):
    from lvm.tools.search import need_optuna

    monkeypatch.setitem(sys.modules, "optuna", None)
    with pytest.raises(LvmError, match=r"install the search extra \(pip install -e '.\[search\]'"):
        need_optuna()


def test_search_needs_a_preset():
    proc = run_module("lvm.tools.search", timeout=120)
    assert proc.returncode == 2 and "+search=p6b_v2" in proc.stderr


def test_failed_trials_are_recorded_and_the_exit_code_says_none_completed(tmp_path):
    out = tmp_path / "search"
    proc = run_module("lvm.tools.search", *SEARCH, "search.trials=2", "optim.optimizer.weight_decay=-1", f"out={out}", timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]  # every trial was refused at start: none completed
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert [r["state"] for r in rows] == ["fail", "fail"]
    assert all("optim.optimizer: Invalid weight_decay value" in r["status"] for r in rows)


def test_a_trial_that_fails_in_training_is_recorded_and_the_search_goes_on(tmp_path, monkeypatch):
    """A failure after a run has started is a RunFailed, not an LvmError: before, it escaped
    Optuna's catch list and ended the whole search."""
    from hydra import compose, initialize_config_dir

    import lvm.training.run
    from lvm.runtime.errors import RunFailed
    from lvm.tools.search import Search, work
    from tests.helpers import ROOT

    def failing_run(*args, **kwargs):
        raise RunFailed("RuntimeError: boom in epoch 0")

    monkeypatch.setattr(lvm.training.run, "run", failing_run)
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("study", overrides=["+search=p6b_v2", "search.trials=2", f"out={tmp_path}", "search.enqueue_defaults=false"])
        search = Search(cfg, [o for o in SEARCH[1:] if not o.startswith("search.")])
        search.out.mkdir(parents=True, exist_ok=True)
        work(search, 0)
    trials = trials_of(tmp_path)
    assert [t.state for t in trials] == [optuna.trial.TrialState.FAIL] * 2
    assert all(t.user_attrs["status"] == "failed: RuntimeError: boom in epoch 0" for t in trials)
