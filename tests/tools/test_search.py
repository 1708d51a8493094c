"""lvm.tools.search: a small search on tiny data prunes, resumes without repeating finished trials and
writes its summary; without Optuna it names the extra to install."""

from __future__ import annotations

import csv
import json
import sys

import pytest
from hydra import compose, initialize_config_dir

from lvm.runtime.errors import LvmError
from tests.helpers import ROOT, TINY, hparams_session, run_module

optuna = pytest.importorskip("optuna")

SEARCH = [
    "+search=p6b_v2",
    *[o for o in TINY if not o.startswith("trainer.max_epochs")],
    "trainer.max_epochs=3",
    "threads=1",
    "search/pruner=halving",
    "search.pruner.reduction_factor=4",
    "search.sampler.n_startup_trials=2",
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
        if t.state == optuna.trial.TrialState.COMPLETE:  # no rollback, no dropped update: the objective is the metric
            assert results["guard"]["dropped_updates"] == 0 and t.value == pytest.approx(results["best_val_cos"])

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
    from lvm.tools.search import Search, trial_overrides, work
    from tests.helpers import ROOT

    def failing_run(*args, **kwargs):
        raise RunFailed("RuntimeError: boom in epoch 0")

    monkeypatch.setattr(lvm.training.run, "run", failing_run)
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("study", overrides=["+search=p6b_v2", "search.trials=2", f"out={tmp_path}", "search.enqueue_defaults=false"])
        search = Search(cfg, trial_overrides(SEARCH[1:]))
        search.out.mkdir(parents=True, exist_ok=True)
        work(search, 0)
    trials = trials_of(tmp_path)
    assert [t.state for t in trials] == [optuna.trial.TrialState.FAIL] * 2
    assert all(t.user_attrs["status"] == "failed: RuntimeError: boom in epoch 0" for t in trials)


def conf_dir():
    """Hydra initialised on conf/, as lvm.tools.search's main is (the search composes each trial)."""
    return initialize_config_dir(str(ROOT / "conf"), version_base="1.3")


def test_the_objective_charges_the_guards_rollbacks_and_dropped_updates_not_the_skip_rules_batches(tmp_path):
    """The skip rule zeroing a batch's directional term is the recipe at work; a rollback or a
    dropped update is the guard rescuing it (the search charged the skip rule's batches before)."""
    from lvm.tools.search import Search

    with conf_dir():
        search = Search(compose("study", ["+search=p6b_v2", f"out={tmp_path}"]), [])
    values = {"rollbacks": 1, "dropped_updates": 3, "skipped_batches": 500}
    assert search.score(0.6, values) == pytest.approx(0.6 - 0.02 * 1 - 0.001 * 3)
    assert search.score(0.6, {"rollbacks": None, "dropped_updates": None, "skipped_batches": 500}) == 0.6


@pytest.mark.parametrize(
    "override,message",
    [
        ("+search.sampler.n_startup=2", "search.sampler: .*unexpected keyword argument 'n_startup'"),
        ("search/pruner=halving", None),
        ("search.pruner.n_startup_trials=-1", "search.pruner: .*startup"),
    ],
)
def test_the_sampler_and_pruner_come_from_config_and_a_bad_setting_is_one_line(override, message, tmp_path):
    import optuna

    from lvm.tools.search import Search, make_sampler

    with conf_dir():
        cfg = compose("study", ["+search=p6b_v2", f"out={tmp_path}", override])
        if message is not None:
            with pytest.raises(LvmError, match=message):
                Search(cfg, [])
            return
        search = Search(cfg, [])
    study = search.study(worker=2)
    assert isinstance(study.pruner, optuna.pruners.SuccessiveHalvingPruner)
    assert isinstance(study.sampler, optuna.samplers.TPESampler)

    # Worker k draws as a sampler seeded seed + k does (the preset's seed is 0).
    def first(sampler):
        return optuna.create_study(sampler=sampler).ask().suggest_float("x", 0, 1)

    assert first(make_sampler(search.s["sampler"], 2)) == first(optuna.samplers.TPESampler(seed=2))
    assert first(make_sampler(search.s["sampler"], 2)) != first(make_sampler(search.s["sampler"], 1))
