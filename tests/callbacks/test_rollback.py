"""RollbackGuard end to end on tiny data: NaN injection, corrupt good checkpoint, max_rollbacks, restart."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Checkpoint

from callbacks.fault import FaultInjection
from callbacks.rollback import STILL_LEARNING
from callbacks.stats import StepStatistics
from lvm.guard.detectors import CollapsedStart
from lvm.runtime.rundir import RUN_OUTPUTS, RunDirTaken
from lvm.training.run import run
from tests.helpers import (
    ROOT,
    TINY,
    cfg_for,
    compose_cfg,
    events,
    steps_per_epoch,
    train_cli,
)

GUARDED = [
    "guard=rollback",
    "logger.flush_every=5",
    "trainer.max_epochs=4",
    # A tiny model this young scores below any sensible val floor: only the injected faults trip.
    "guard.rollback.detectors.val_floor=null",
    "guard.rollback.detectors.val_drop=null",
    "guard.rollback.detectors.below_copy_last=null",
]


def test_nan_injection_rolls_back_and_recovers(tmp_path):
    run(cfg_for(*GUARDED, "trainer.max_epochs=1"), tmp_path / "probe")
    n = steps_per_epoch(tmp_path / "probe")
    results = run(cfg_for(*GUARDED), tmp_path / "run", extra_callbacks=[FaultInjection([n + 1])])
    ev = events(tmp_path / "run")
    rollback = [e for e in ev if e["action"] == "rollback"]
    assert len(rollback) == 1, ev
    assert rollback[0]["detector"] == "nonfinite" and rollback[0]["where"] == "train"
    assert rollback[0]["checkpoint"].endswith("good-epoch00.ckpt")
    assert rollback[0]["step"] <= n + 1 + 5  # in-epoch: within one flushed window
    assert rollback[0]["backoff"]["target_frac_factor"] == 0.5 and rollback[0]["backoff"]["lambda_max_factor"] == 0.5
    assert results["epochs_completed"] == 4
    assert all(torch.isfinite(v).all() for v in torch.load(results["last_checkpoint"], weights_only=True)["state_dict"].values())
    assert math.isfinite(results["final"]["val/cos"])
    last = torch.load(results["last_checkpoint"], weights_only=True)
    guard_state = next(v for k, v in last["callbacks"].items() if k.startswith("RollbackGuard"))
    ramp_state = next(v for k, v in last["callbacks"].items() if k.startswith("RampSchedule"))
    assert guard_state["rollbacks"] == 1 and ramp_state["lambda_max_factor"] == 0.5


def test_the_guards_decisions_do_not_depend_on_the_callback_order(tmp_path, monkeypatch):
    """The same NaN fault with the run's callbacks in reverse order (the checkpoint callbacks keep
    theirs: Lightning runs them after all others, in their given order): the rollback happens at the
    same step, and last.ckpt holds the same weights and guard state (the statistics hand each window
    to the guard inside their own hook; last.ckpt is written by a Lightning Checkpoint)."""
    import lvm.training.build as build_module

    run(cfg_for(*GUARDED, "trainer.max_epochs=1"), tmp_path / "probe")
    n = steps_per_epoch(tmp_path / "probe")
    runs = {}
    for order in ("built", "reversed"):
        if order == "reversed":
            built = build_module.build_callbacks

            def reversed_callbacks(*args, **kwargs):
                c = built(*args, **kwargs)
                others = [x for x in c.all if not isinstance(x, Checkpoint)][::-1]
                return build_module.RunCallbacks(
                    others + [x for x in c.all if isinstance(x, Checkpoint)], c.spike, c.guard, c.skip_report, c.resume
                )

            monkeypatch.setattr(build_module, "build_callbacks", reversed_callbacks)
        results = run(cfg_for(*GUARDED, "trainer.max_epochs=2"), tmp_path / order, extra_callbacks=[FaultInjection([n + 2])])
        last = torch.load(results["last_checkpoint"], weights_only=True)
        guard_state = next(v for k, v in last["callbacks"].items() if k.startswith("RollbackGuard"))
        runs[order] = ([(e["step"], e["action"]) for e in events(tmp_path / order)], last["state_dict"], guard_state)
    (ev, weights, guard), (ev_r, weights_r, guard_r) = runs["built"], runs["reversed"]
    assert ev == ev_r and any(action == "rollback" for _, action in ev), (ev, ev_r)
    assert guard == guard_r and all(torch.equal(weights[k], weights_r[k]) for k in weights)


def test_guard_decides_on_every_step_of_the_epoch(tmp_path):
    """Lightning validates before on_train_epoch_end: the last partial window of per-step rows must
    reach the guard's detectors before it decides at validation end and saves a good checkpoint."""
    seen: list[tuple[int, int]] = []

    class Probe(L.Callback):
        def on_validation_end(self, trainer, pl_module):
            if not trainer.sanity_checking:
                stats = next(c for c in trainer.callbacks if isinstance(c, StepStatistics))
                seen.append((trainer.global_step, len(stats.buffer._steps)))

    run(cfg_for("+experiment=p6b_v2", "trainer.max_epochs=2", "logger.flush_every=1000"), tmp_path, extra_callbacks=[Probe()])
    assert [unflushed for _, unflushed in seen] == [0, 0] and seen[0][0] > 0


@pytest.mark.parametrize("damage", ["truncated", "text"])
def test_corrupt_good_checkpoint_falls_back_to_older(tmp_path, damage):
    run(cfg_for(*GUARDED, "trainer.max_epochs=1"), tmp_path / "probe")
    n = steps_per_epoch(tmp_path / "probe")

    class CorruptNewestGood(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 2 * n + 1:
                newest = tmp_path / "run" / "checkpoints" / "good-epoch01.ckpt"
                newest.write_bytes(newest.read_bytes()[:1000] if damage == "truncated" else b"hello")

    run(cfg_for(*GUARDED), tmp_path / "run", extra_callbacks=[CorruptNewestGood(), FaultInjection([2 * n + 1])])
    ev = events(tmp_path / "run")
    skipped = [e for e in ev if e["detector"] == "corrupt_checkpoint"]
    assert skipped and "good-epoch01.ckpt" in skipped[0]["action"]
    rollback = next(e for e in ev if e["action"] == "rollback")
    assert rollback["checkpoint"].endswith("good-epoch00.ckpt")


def test_max_rollbacks_stops_cleanly(tmp_path):
    run(cfg_for(*GUARDED, "trainer.max_epochs=1"), tmp_path / "probe")
    n = steps_per_epoch(tmp_path / "probe")
    results = run(
        cfg_for(*GUARDED, "guard.rollback.max_rollbacks=1", "trainer.max_epochs=6"),
        tmp_path / "run",
        extra_callbacks=[FaultInjection([n + 1, 2 * n + 1])],
    )
    actions = [e["action"] for e in events(tmp_path / "run") if e["severity"] == "collapse"]
    assert actions == ["rollback", "stop"]
    assert results["epochs_completed"] < 6 and results["status"] == "stopped: max_rollbacks"
    assert Path(results["best_checkpoint"]).is_file()
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values())  # never the NaN model


def test_a_stopped_run_is_not_resumed(tmp_path):
    """ckpt_path=last or auto on a run the guard stopped: refused (RunDirTaken, exit 2), nothing
    written. Before:
    it trained again from the last checkpoint before the stop, dropped the stop from events.jsonl
    and ended `completed`."""
    run(cfg_for(*GUARDED, "trainer.max_epochs=1"), tmp_path / "probe")
    n = steps_per_epoch(tmp_path / "probe")
    args = (*GUARDED, "guard.rollback.max_rollbacks=0", "trainer.max_epochs=3")
    first = run(cfg_for(*args), tmp_path / "run", extra_callbacks=[FaultInjection([n + 1])])
    assert first["status"] == "stopped: max_rollbacks"
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    for resume in ("last", "auto"):
        with pytest.raises(RunDirTaken) as refused:
            run(cfg_for(*args, f"ckpt_path={resume}"), tmp_path / "run")
        assert "ended `stopped: max_rollbacks`" in str(refused.value) and "best-epoch00.ckpt" in str(refused.value)
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()} == before


def test_a_checkpoint_of_a_stopped_run_trains_no_further(tmp_path, caplog):
    """A checkpoint whose guard state says the run was stopped (saved after a stop at validation),
    resumed in a new directory: no step, the same status, and a line saying how to train on. Before:
    it trained the remaining epochs and still ended `stopped`."""
    run(cfg_for(*GUARDED, "trainer.max_epochs=1"), tmp_path / "first")
    ckpt = torch.load(tmp_path / "first" / "checkpoints" / "last.ckpt", weights_only=True)
    guard = next(k for k in ckpt["callbacks"] if k.startswith("RollbackGuard"))
    ckpt["callbacks"][guard]["stopped"] = "max_rollbacks"
    torch.save(ckpt, tmp_path / "stopped.ckpt")
    with caplog.at_level("WARNING"):
        results = run(cfg_for(*GUARDED, "trainer.max_epochs=3", f"ckpt_path={tmp_path / 'stopped.ckpt'}"), tmp_path / "new")
    assert results["status"] == "stopped: max_rollbacks" and results["epochs_completed"] == 1
    assert results["global_step"] == ckpt["global_step"] and not list((tmp_path / "new" / "checkpoints").glob("*.ckpt"))
    assert "resuming it trains no further" in caplog.text


def test_a_model_still_learning_is_not_rolled_back_to_its_start(tmp_path):
    """Below the val floor and copy-last before any healthy validation: warnings, no rollback to
    the starting weights, and no good checkpoint of that epoch."""
    run(cfg_for("+experiment=p6b_v2", "trainer.max_epochs=2", "model.context_skip=false"), tmp_path)  # a tiny plain model: val cos ~0.05
    ev = events(tmp_path)
    assert ev and {e["detector"] for e in ev} <= set(STILL_LEARNING)
    assert all(e["severity"] == "warning" and e["action"] == "warning" for e in ev)
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("good-*")) == ["good-initial.ckpt"]


@pytest.mark.parametrize("data", ["synthetic", "anisotropic"])
def test_constant_output_is_caught_and_never_saved_as_good(tmp_path, data):
    """A model whose output is one fixed direction (the data's mean: the best constant) from the
    middle of epoch 1. Before the diversity and contrastive-accuracy detectors nothing tripped on
    it (on anisotropic data it keeps a high val cosine) and the guard saved the collapsed epochs as
    good checkpoints, deleting the healthy ones."""
    guarded = [f"data={data}", *GUARDED]
    run(cfg_for(*guarded, "trainer.max_epochs=1"), tmp_path / "probe")
    n = steps_per_epoch(tmp_path / "probe")
    onset = n + 2
    results = run(
        cfg_for(
            *guarded,
            "trainer.max_epochs=3",
            "guard.rollback.detectors.start_step=0",
            "logger.flush_every=2",
            "+fault=inject",
            f"fault.constant_from_step={onset}",
        ),
        tmp_path / "run",
    )
    ev = events(tmp_path / "run")
    acted = [e for e in ev if e["severity"] == "collapse"]
    assert acted and acted[0]["action"] == "rollback", ev
    assert acted[0]["detector"] in ("low_diversity", "contrastive_chance") and acted[0]["where"] == "train"
    assert onset <= acted[0]["step"] <= onset + 2 and acted[0]["checkpoint"].endswith("good-epoch00.ckpt")  # one window
    assert len(acted) == 1 and results["status"] == "completed"  # the rollback lifted the fault
    # Every good checkpoint on disk, and the last, predicts with spread (none is the collapsed model).
    for path in [*(tmp_path / "run" / "checkpoints").glob("good-*.ckpt"), Path(results["last_checkpoint"])]:
        head = torch.load(path, weights_only=True)["state_dict"]["model.head.3.weight"]
        assert head.abs().max() > 0, path.name


def test_nan_before_the_first_validation_rolls_back_to_the_start(tmp_path):
    """The weights a run starts from are its first rollback point (before: "no good checkpoint
    yet", and the run trained on NaN weights to the end)."""
    results = run(cfg_for(*GUARDED, "trainer.max_epochs=2"), tmp_path, extra_callbacks=[FaultInjection([2])])
    rollback = [e for e in events(tmp_path) if e["action"] == "rollback"]
    assert len(rollback) == 1 and rollback[0]["detector"] == "nonfinite" and rollback[0]["epoch"] == 0
    assert rollback[0]["checkpoint"] == "checkpoints/good-initial.ckpt"
    assert results["status"] == "completed" and math.isfinite(results["final"]["val/cos"])
    assert all(torch.isfinite(v).all() for v in torch.load(results["last_checkpoint"], weights_only=True)["state_dict"].values())


class CollapseAtTheEnd(L.Callback):
    """After the last epoch's validation (and its good checkpoint), before last.ckpt: the output
    layer and context skip negated (`negate`: pred -> -pred, both cosines negative, spread kept)
    or set so that every prediction is one vector."""

    def __init__(self, negate: bool = False) -> None:
        self.negate = negate

    @torch.no_grad()
    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == trainer.max_epochs - 1:
            out, skip = pl_module.model.head[-1], pl_module.model.skip_weights
            if self.negate:
                for p in (out.weight, out.bias, skip):
                    p.neg_()
            else:
                out.weight.zero_()
                skip.zero_()
                out.bias.copy_(torch.nn.functional.normalize(torch.ones_like(out.bias), dim=0))


@pytest.fixture(scope="module")
def collapsed(tmp_path_factory):
    """A guarded run (2 epochs) whose last.ckpt is a constant-output model, its good checkpoints
    (good-epoch00, good-epoch01) healthy; and the same run's last.ckpt with NaN weights."""
    src = tmp_path_factory.mktemp("collapsed") / "run"
    run(cfg_for(*GUARDED, "trainer.max_epochs=2", "threads=1"), src, extra_callbacks=[CollapseAtTheEnd()])
    ckpt = torch.load(src / "checkpoints" / "last.ckpt", weights_only=True)
    ckpt["state_dict"] = {k: torch.full_like(v, math.nan) if v.is_floating_point() else v for k, v in ckpt["state_dict"].items()}
    torch.save(ckpt, src.parent / "nan.ckpt")
    return src


@pytest.mark.parametrize(
    "kind, detector, value", [("constant", "constant_output", "diversity=0,"), ("nan", "nonfinite", "finite_weights=0,")]
)
def test_collapsed_start_in_a_new_directory_is_refused(tmp_path, collapsed, kind, detector, value):
    """Before: the guard saved the collapsed weights as good-initial.ckpt, rolled back to them three
    times and ended `stopped: max_rollbacks`. Now: refused before training, naming detector, value and
    checkpoint, and the directory keeps no record of the attempt."""
    ckpt = collapsed / "checkpoints" / "last.ckpt" if kind == "constant" else collapsed.parent / "nan.ckpt"
    with pytest.raises(CollapsedStart) as refused:
        run(cfg_for(*GUARDED, f"ckpt_path={ckpt}", "threads=1"), tmp_path / "new")
    message = str(refused.value)
    assert f"checkpoint {ckpt}:" in message and f"({detector}: {value}" in message and "\n" not in message
    assert not [name for name in RUN_OUTPUTS if (tmp_path / "new" / name).exists()]


def test_collapsed_resume_rolls_back_at_once_to_its_own_good_checkpoint(tmp_path, collapsed, caplog):
    """A resume of the run's own collapsed last.ckpt: one rollback before the first step, said."""
    own = tmp_path / "own"
    shutil.copytree(collapsed, own)
    with caplog.at_level("WARNING"):
        results = run(cfg_for(*GUARDED, "ckpt_path=last", "trainer.max_epochs=3", "threads=1"), own)
    acted = [e for e in events(own) if e["severity"] == "collapse"]
    assert [(e["action"], e["where"], e["detector"]) for e in acted] == [("rollback", "start", "constant_output")]
    assert acted[0]["checkpoint"] == "checkpoints/good-epoch01.ckpt" and acted[0]["step"] == 2 * steps_per_epoch(own)
    assert "the starting weights" in caplog.text and "rolled back to checkpoints/good-epoch01.ckpt" in caplog.text
    assert results["status"] == "completed" and results["guard"]["rollbacks"] == 1


def test_a_target_that_trips_the_same_detector_is_skipped_for_an_older_one(tmp_path, collapsed):
    """The newest good checkpoint holds the collapsed weights: skipped (recorded, dropped from the
    good checkpoints), the rollback goes to the older one. Before: restored again and again."""
    own = tmp_path / "own"
    shutil.copytree(collapsed, own)
    good = torch.load(own / "checkpoints" / "good-epoch01.ckpt", weights_only=True)
    good["state_dict"] = torch.load(own / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    torch.save(good, own / "checkpoints" / "good-epoch01.ckpt")
    results = run(cfg_for(*GUARDED, "ckpt_path=last", "trainer.max_epochs=3", "threads=1"), own)
    ev = events(own)
    skipped = [e for e in ev if e["detector"] == "collapsed_checkpoint"]
    assert [(e["checkpoint"], e["trips"]) for e in skipped] == [("checkpoints/good-epoch01.ckpt", "constant_output")]
    assert [e["checkpoint"] for e in ev if e["action"] == "rollback"] == ["checkpoints/good-epoch00.ckpt"]
    assert results["status"] == "completed"
    last = torch.load(results["last_checkpoint"], weights_only=True)
    guard_state = next(v for k, v in last["callbacks"].items() if k.startswith("RollbackGuard"))
    assert "good-epoch01.ckpt" not in guard_state["good"] and not (own / "checkpoints" / "good-epoch01.ckpt").exists()
    assert (own / "checkpoints" / "good-epoch01.ckpt.collapsed").is_file()  # set aside, not deleted


def test_a_collapse_the_start_check_lets_through_is_not_restored_again(tmp_path, collapsed):
    """Negated outputs (both cosines negative, spread kept: no start detector trips) from another
    run: its start is good-initial, and the first window trips negative_cosines. Before: three
    rollbacks to those same weights, then max_rollbacks. Now: good-initial trips it at once, is
    skipped, and with no good checkpoint left the run stops at its first decision."""
    run(cfg_for(*GUARDED, "trainer.max_epochs=2", "threads=1"), tmp_path / "src", extra_callbacks=[CollapseAtTheEnd(negate=True)])
    args = (*GUARDED, f"ckpt_path={tmp_path / 'src' / 'checkpoints' / 'last.ckpt'}", "guard.rollback.detectors.start_step=0")
    results = run(cfg_for(*args, "logger.flush_every=2", "threads=1"), tmp_path / "new")
    ev = [e for e in events(tmp_path / "new") if e["severity"] == "collapse" or e["detector"] == "collapsed_checkpoint"]
    assert [e["action"].split(":")[0] for e in ev] == ["skipped good-initial.ckpt", "stop"], ev
    assert ev[1]["reason"] == "no good checkpoint left to roll back to" and ev[1]["detector"] in ("negative_cosines", "contrastive_chance")
    assert results["status"] == "stopped: no good checkpoint" and results["guard"]["rollbacks"] == 0


def test_cli_refuses_a_collapsed_checkpoint_with_exit_2_and_one_line(tmp_path, collapsed):
    """`python -m lvm.train ckpt_path=<collapsed> guard=rollback`: bad input, exit 2, one stderr
    line naming detector, value and checkpoint (before: exit 3 after three rollbacks)."""
    ckpt = collapsed / "checkpoints" / "last.ckpt"
    proc = train_cli(*TINY, *GUARDED, f"ckpt_path={ckpt}", "threads=1", f"hydra.run.dir={tmp_path / 'cli'}", cwd=ROOT)
    named = [line for line in proc.stderr.splitlines() if "constant_output" in line]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(named) == 1 and named[0].startswith(f"lvm.train: checkpoint {ckpt}: collapsed weights (constant_output: diversity=0,")
    assert not [name for name in RUN_OUTPUTS if (tmp_path / "cli" / name).exists()]


def test_restart_after_kill_takes_the_same_decisions(tmp_path):
    run(cfg_for(*GUARDED, "trainer.max_epochs=1"), tmp_path / "probe")
    n = steps_per_epoch(tmp_path / "probe")
    faults = (n + 1, 3 * n + 1)  # one in epoch 1, one in epoch 3
    args = (*GUARDED, "guard.rollback.max_rollbacks=1")
    run(cfg_for(*args), tmp_path / "whole", extra_callbacks=[FaultInjection(faults)])
    # The same run killed after epoch 1 (its last.ckpt holds the guard's state), then resumed.
    run(cfg_for(*args, "trainer.max_epochs=2"), tmp_path / "killed", extra_callbacks=[FaultInjection(faults)])
    run(cfg_for(*args, "ckpt_path=last"), tmp_path / "killed", extra_callbacks=[FaultInjection(faults)])

    def decisions(d):
        return [
            (e["step"], e["detector"], e["action"], Path(e.get("checkpoint", "")).name) for e in events(d) if e["severity"] == "collapse"
        ]

    assert decisions(tmp_path / "whole") == decisions(tmp_path / "killed")
    assert [d[2] for d in decisions(tmp_path / "whole")] == ["rollback", "stop"]


def test_recovery_experiment_resumes_a_v1_checkpoint_under_v2(tmp_path, caplog):
    """The recovery takes the checkpoint's model (here the plain one, without the default context
    skip) and v2's loss settings."""
    run(
        cfg_for("+experiment=p6b_v1", "trainer.max_epochs=2", "callbacks.epoch_checkpoints.save_top_k=-1", "model.context_skip=false"),
        tmp_path / "v1",
    )
    epoch0 = tmp_path / "v1" / "checkpoints" / "epoch00.ckpt"
    v1_weights = torch.load(epoch0, weights_only=True)["state_dict"]
    caplog.clear()
    with caplog.at_level("INFO"):
        results = run(cfg_for("+experiment=p6b_v2_recovery", f"ckpt={epoch0}", "trainer.max_epochs=4"), tmp_path / "rec")
    rows = [json.loads(line) for line in (tmp_path / "rec" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]  # continues after the checkpoint's epoch
    assert "Restored all states from the checkpoint" in caplog.text
    assert "epoch 3 (0-based): stage 1, margin=0.030" in caplog.text  # the v2 table (v1 would say 0.040)
    assert results["name"] == "p6b_v2_recovery"
    cfg = torch.load(results["last_checkpoint"], weights_only=True)["hyper_parameters"]["config"]
    assert cfg["loss"]["gamma"] == 4.0 and cfg["loss"]["lambda_max"] == 0.02
    assert cfg["model"]["context_skip"] is False and "ckpt_model=true: the model settings" in caplog.text
    assert any(
        not torch.equal(v, v1_weights[k]) for k, v in torch.load(results["last_checkpoint"], weights_only=True)["state_dict"].items()
    )


@pytest.mark.slow
def test_two_process_ddp_rolls_back_together(tmp_path):
    """gloo DDP on CPU: a fault on rank 0 only; both ranks restore the same checkpoint and finish."""
    run_dir = tmp_path / "ddp"
    off = [f"guard.rollback.detectors.{k}=null" for k in ("val_floor", "val_drop", "below_copy_last", "orthogonal_eps")]
    proc = train_cli(
        "+experiment=p6b_v2",
        *TINY,
        "trainer.max_epochs=3",
        "logger.flush_every=2",
        "guard.rollback.detectors.start_step=0",
        "guard.rollback.detectors.negative_cosines=false",
        *off,
        "+fault=inject",
        "fault.nan_at_steps=[3]",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.strategy=ddp",
        f"hydra.run.dir={run_dir}",
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ev = events(run_dir)
    rollbacks = [e for e in ev if e["action"] == "rollback"]
    assert rollbacks and rollbacks[0]["detector"] == "nonfinite"
    assert rollbacks[0]["checkpoint"].endswith("good-epoch00.ckpt")
    results = json.loads((run_dir / "results.json").read_text())
    assert results["epochs_completed"] == 3 and math.isfinite(results["final"]["val/cos"])


@pytest.mark.slow
def test_two_process_ddp_refuses_a_collapsed_start_on_both_ranks(tmp_path, collapsed):
    """gloo DDP: both ranks probe the same weights and refuse alike (exit 2, nothing left)."""
    ckpt = collapsed / "checkpoints" / "last.ckpt"
    args = ("trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp", f"hydra.run.dir={tmp_path / 'ddp'}")
    proc = train_cli(*TINY, *GUARDED, f"ckpt_path={ckpt}", "threads=1", *args, cwd=ROOT)
    refusals = [line for line in proc.stderr.splitlines() if line.startswith("lvm.train: ")]
    assert proc.returncode == 2 and len(refusals) == 2 and len(set(refusals)) == 1, proc.stderr[-3000:]
    assert "(constant_output: diversity=0," in refusals[0]
    assert not [name for name in RUN_OUTPUTS if (tmp_path / "ddp" / name).exists()]


@pytest.mark.slow
@pytest.mark.parametrize(
    "fault, action",
    [
        (["+fault=inject", "fault.constant_from_step=4"], "rollback"),
        (["+fault=inject", "fault.nan_batch_at_steps=[4]", "guard.spike.drop=true", "guard.spike.min_history=2"], "dropped update"),
    ],
)
def test_two_process_ddp_drills_take_the_same_decision_on_both_ranks(tmp_path, fault, action):
    """The constant-output and NaN-record drills under gloo DDP, the fault on rank 0 only: the
    guard acts once, at the fault, and both ranks end with the same weights' validation."""
    run_dir = tmp_path / "ddp"
    proc = train_cli(
        "+experiment=p6b_v2",
        *TINY,
        "trainer.max_epochs=3",
        "logger.flush_every=2",
        "guard.rollback.detectors.start_step=0",
        *[f"guard.rollback.detectors.{k}=null" for k in ("val_floor", "val_drop", "below_copy_last")],
        *fault,
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.strategy=ddp",
        f"hydra.run.dir={run_dir}",
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    acted = [e for e in events(run_dir) if e["severity"] == "collapse" or e["action"] == "dropped update"]
    assert [e["action"] for e in acted] == [action], acted
    out = proc.stdout + proc.stderr
    finals = sorted(line.split("final val cos ")[-1] for line in out.splitlines() if "of 2 finished" in line)
    assert len(finals) == 2 and finals[0] == finals[1], out[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["32", "bf16-mixed"])
def test_collapse_drill(tmp_path, precision):
    """The documented drill on the built-in data: unguarded v1-stress collapses, the guard recovers,
    with the same decision (epoch, checkpoint, back-off) in fp32 and in bf16."""

    def val_cos(run_dir):
        return [json.loads(line)["val/cos"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]

    common = ["+experiment=p6b_v1_stress", "trainer.max_epochs=4", "trainer.enable_progress_bar=false", f"trainer.precision={precision}"]
    none = compose_cfg("train", *common, "guard=none")
    guarded = compose_cfg("train", *common, "guard=rollback")
    run(none, tmp_path / "none")
    assert min(val_cos(tmp_path / "none")) < 0.1  # collapsed: below the guard's val floor
    results = run(guarded, tmp_path / "rollback")
    ev = events(tmp_path / "rollback")
    rollback = next(e for e in ev if e["action"] == "rollback")
    assert rollback["epoch"] == 1 and rollback["checkpoint"].endswith("good-epoch00.ckpt")
    assert rollback["backoff"]["hold_stage"] == 0
    assert val_cos(tmp_path / "rollback")[-1] > 0.5 and results["best_val_cos"] > 0.5


def test_the_run_wires_the_spike_check_and_the_fault_as_the_guards_listeners(tmp_path):
    """Callbacks never look each other up: the run hands the guard built from guard.rollback the
    ramp it backs off and the callbacks it tells of a rollback (RollbackListener)."""
    from callbacks import ExactResume, RampSchedule, RollbackGuard, SkipReport, SpikeCheck
    from lvm.training.build import build_data, build_fit

    cfg = cfg_for("guard=rollback", "+fault=inject", "fault.nan_at_steps=[3]")
    fit = build_fit(cfg, build_data(cfg), tmp_path)
    of = {type(c): c for c in fit.trainer.callbacks}
    guard = of[RollbackGuard]
    # What the run reads when the fit ends, it is handed by name (it never searches trainer.callbacks).
    named = fit.callbacks
    assert (named.guard, named.spike, named.skip_report, named.resume) == (guard, of[SpikeCheck], of[SkipReport], of[ExactResume])
    assert guard.listeners == [of[SpikeCheck], of[FaultInjection]] and guard.schedule is of[RampSchedule]
    assert of[FaultInjection].steps == {3} and of[FaultInjection].ckpt_dir == tmp_path / "checkpoints"
    bare = build_fit(cfg_for("guard=rollback", "guard.spike=null"), build_data(cfg), tmp_path / "b").trainer
    assert [c for c in bare.callbacks if isinstance(c, RollbackGuard)][0].listeners == []
    assert not any(isinstance(c, FaultInjection) for c in bare.callbacks)  # no +fault: no fault callback


class WeightsAtRollback(L.Callback):
    """At the first batch after each rollback in events.jsonl: the module's weights and those of
    the checkpoint it names."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir, self.seen = run_dir, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        rollbacks = [e for e in events(self.run_dir) if e["action"] == "rollback"]
        if len(rollbacks) > len(self.seen):
            ckpt = torch.load(self.run_dir / rollbacks[-1]["checkpoint"], weights_only=True)["state_dict"]
            self.seen.append(({k: v.clone() for k, v in pl_module.state_dict().items()}, ckpt))


@pytest.mark.slow
def test_a_rollback_inside_a_compiled_run_restores_the_good_weights(tmp_path):
    """compile=true compiles the model in place: its checkpoints have the plain keys (no
    `_orig_mod.`), and the guard's rollback loads them into the compiled model."""
    run(cfg_for(*GUARDED, "trainer.max_epochs=1"), tmp_path / "probe")
    n = steps_per_epoch(tmp_path / "probe")
    probe = WeightsAtRollback(tmp_path / "run")
    run(cfg_for(*GUARDED, "trainer.max_epochs=2", "compile=true"), tmp_path / "run", extra_callbacks=[FaultInjection([n + 1]), probe])
    [(weights, good)] = probe.seen
    plain = torch.load(tmp_path / "probe" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert set(good) == set(plain) == set(weights)
    assert all(torch.equal(weights[k], good[k]) for k in good)
