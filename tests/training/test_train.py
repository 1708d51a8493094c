"""End to end: every experiment composes and trains on tiny data; resume; multirun; start-up errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lvm.runtime.errors import ConfigError, LvmError, RunFailed
from lvm.tools.runs import read_steps
from lvm.training.build import build_data
from lvm.training.run import run
from tests.helpers import ROOT, TINY, cfg_for, history, train_cli


@pytest.mark.parametrize("experiment", ["p6_baseline", "p6b_v1", "p6b_v2", "p6b_v2_1", "p6b_v2_2", "p6b_v2_3"])
def test_experiment_trains_end_to_end(experiment, tmp_path):
    results = run(cfg_for(f"+experiment={experiment}"), tmp_path)
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert "last.ckpt" in ckpts and any(n.startswith("best-epoch") for n in ckpts)
    assert results["epochs_completed"] == 2 and results["name"] == experiment
    assert -1 <= results["best_val_cos"] <= 1  # a tiny 2-epoch model: recorded, not necessarily good
    rows = history(tmp_path)
    assert [r["epoch"] for r in rows] == [0, 1]
    for key in ("val/cos", "ood/cos", "mini5cat/r5", "mini5cat/margin_last", "mini5cat/copy_last_cos", "mini5cat/slot_linear_cos"):
        assert key in rows[-1]
    events = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in (
        "train/pos",
        "train/neg",
        "train/gap",
        "train/lambda_eff",
        "train/frac_of_mse",
        "train/skipped",
        "train/penalties",
        "val/cos",
    ):
        assert tag in tags
    # Logged every step.
    steps = [e.step for e in acc.Scalars("train/loss")]
    assert len(steps) == results["global_step"]
    assert acc.PluginTagToContent("custom_scalars")  # the layout
    assert acc.PluginTagToContent("hparams")  # the hparams tab
    # Checkpoints load under torch's default weights_only rules, with the config inside.
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["hyper_parameters"]["config"]["name"] == experiment


def test_every_epoch_checkpoints_on_request(tmp_path):
    run(cfg_for("callbacks.epoch_checkpoints.save_top_k=-1"), tmp_path)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert {"epoch00.ckpt", "epoch01.ckpt", "last.ckpt"} <= set(names)
    assert torch.load(tmp_path / "checkpoints" / "epoch00.ckpt", weights_only=True)["epoch"] == 0
    run(cfg_for(), tmp_path / "default")  # save_top_k 0 by default: best and last only
    assert not [p.name for p in (tmp_path / "default" / "checkpoints").iterdir() if p.name.startswith("epoch")]


def test_directional_state_follows_experiment(tmp_path, caplog):
    with caplog.at_level("INFO"):
        run(cfg_for("+experiment=p6b_v2", "trainer.max_epochs=1"), tmp_path)
    text = caplog.text
    assert "[P6b dir] λ_eff=" in text and "[Mini-5CAT] Margin:" in text
    assert "stage 0, margin=0.020 target_frac=0.10" in text
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    callbacks = ckpt["callbacks"]
    assert any(k.startswith("SkipReport") for k in callbacks)
    assert any(k.startswith("RampSchedule") for k in callbacks)


def test_resume_continues_at_right_epoch_and_stage(tmp_path, caplog):
    run(cfg_for("+experiment=p6b_v1", "trainer.max_epochs=2"), tmp_path)
    first = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert first["epoch"] == 1  # last.ckpt is the newest epoch even when it was not the best
    caplog.clear()
    with caplog.at_level("INFO"):
        results = run(cfg_for("+experiment=p6b_v1", "trainer.max_epochs=4", "ckpt_path=last"), tmp_path)
    rows = history(tmp_path)
    assert [r["epoch"] for r in rows] == [0, 1, 2, 3]
    assert rows[2]["step"] == first["global_step"] + (rows[1]["step"] - rows[0]["step"])
    assert results["global_step"] == 2 * first["global_step"]
    # v1 ramp (0-based): epochs 2-4 are stage 1 (margin 0.04); the resumed run starts there.
    assert "epoch 2 (0-based): stage 1, margin=0.040" in caplog.text
    assert "epoch 0 (0-based)" not in caplog.text  # no epoch was trained again
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    ramp_state = next(v for k, v in last["callbacks"].items() if k.startswith("RampSchedule"))
    assert ramp_state["stage"] == 1 and ramp_state["hold_until"] is None


def test_corrupt_checkpoint_named(tmp_path):
    bad = tmp_path / "broken.ckpt"
    for content in (b"not a checkpoint at all", b"hello"):  # b"hello" was a bare KeyError
        bad.write_bytes(content)
        with pytest.raises(LvmError, match="broken.ckpt: cannot be loaded"):
            run(cfg_for(f"ckpt_path={bad}"), tmp_path / "run")
    with pytest.raises(LvmError, match="no such file"):
        run(cfg_for("ckpt_path=last"), tmp_path / "fresh")


def test_checkpoint_from_other_model_or_dim_named(tmp_path):
    run(cfg_for("trainer.max_epochs=1"), tmp_path / "a")
    last = tmp_path / "a" / "checkpoints" / "last.ckpt"
    with pytest.raises(LvmError, match="D=16 vectors, the data has D=24"):
        run(cfg_for(f"ckpt_path={last}", "data.synthetic.dim=24"), tmp_path / "b")
    with pytest.raises(LvmError, match="model.d_model=16 in the checkpoint vs 32"):
        run(cfg_for(f"ckpt_path={last}", "model.d_model=32"), tmp_path / "c")


def test_cli_errors_are_one_clear_line(tmp_path):
    proc = train_cli("data=store_npz", f"data.path={tmp_path / 'missing.npz'}", f"hydra.run.dir={tmp_path / 'r'}", cwd=ROOT)
    assert proc.returncode != 0
    assert "data.path" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow  # fast: tests/tools/test_sweep.py's grid sweep
def test_multirun_two_jobs(tmp_path):
    sweep = tmp_path / "sweep"
    proc = train_cli("-m", "+experiment=p6b_v2", "loss.gamma=4,8", *TINY, "trainer.max_epochs=1", f"hydra.sweep.dir={sweep}", cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert len(jobs) == 2
    for job, gamma in zip(jobs, (4.0, 8.0)):
        assert job.name.startswith(("0_", "1_")) and len(job.name) <= 130  # long override lists are cut and hashed
        assert (job / "checkpoints" / "last.ckpt").is_file()
        assert list((job / "tb").glob("events.out.tfevents.*"))
        rows = [json.loads(line) for line in (job / "metrics.jsonl").read_text().splitlines() if line.strip()]
        best = max(r["val/cos"] for r in rows if "val/cos" in r)  # the per-epoch history, read independently
        assert json.loads((job / "results.json").read_text())["best_val_cos"] == pytest.approx(best)
        assert OmegaConf.load(job / "config.yaml").loss.gamma == gamma


def files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


def test_resume_elsewhere_never_touches_the_source_run(tmp_path):
    """The README's `ckpt_path=<old>/last.ckpt hydra.run.dir=<new>` and a copied run directory:
    the source's good checkpoints (rollback points) survive the new run's pruning."""
    guarded = (
        "+experiment=p6b_v2",
        "guard.rollback.detectors.val_floor=null",
        "guard.rollback.detectors.val_drop=null",
        "guard.rollback.detectors.below_copy_last=null",
        "guard.rollback.keep_good=1",
    )
    src = tmp_path / "src"
    run(cfg_for(*guarded), src)
    before = files(src / "checkpoints")
    assert "good-epoch01.ckpt" in before
    run(cfg_for(*guarded, "trainer.max_epochs=4", f"ckpt_path={src / 'checkpoints' / 'last.ckpt'}"), tmp_path / "new")
    copy = tmp_path / "copy"
    shutil.copytree(src, copy)
    run(cfg_for(*guarded, "trainer.max_epochs=4", "ckpt_path=last"), copy)
    assert files(src / "checkpoints") == before
    assert "good-epoch03.ckpt" in files(copy / "checkpoints")
    state = torch.load(copy / "checkpoints" / "last.ckpt", weights_only=True)["callbacks"]
    guard = next(v for k, v in state.items() if k.startswith("RollbackGuard"))
    assert guard["good"] == ["good-epoch03.ckpt"]  # names in its own directory, not paths


def test_a_run_directory_holding_a_run_is_refused_and_left_untouched(tmp_path):
    run(cfg_for("trainer.max_epochs=1"), tmp_path)
    before = files(tmp_path / "checkpoints") | {"config.yaml": (tmp_path / "config.yaml").read_bytes()}
    with pytest.raises(ConfigError, match="already holds a run .*ckpt_path=last.*overwrite=true"):
        run(cfg_for("trainer.max_epochs=1", "seed=1"), tmp_path)
    # A resume refused for a D mismatch writes nothing either.
    with pytest.raises(LvmError, match="D=16 vectors, the data has D=24"):
        run(cfg_for("trainer.max_epochs=2", "ckpt_path=last", "data.synthetic.dim=24"), tmp_path)
    assert files(tmp_path / "checkpoints") | {"config.yaml": (tmp_path / "config.yaml").read_bytes()} == before
    results = run(cfg_for("trainer.max_epochs=1", "seed=1", "overwrite=true"), tmp_path)
    assert results["status"] == "completed" and OmegaConf.load(tmp_path / "config.yaml").seed == 1
    assert [r["epoch"] for r in history(tmp_path)] == [0]  # the old run's rows went with it


def test_auto_resumes_or_starts_fresh(tmp_path):
    fresh = run(cfg_for("trainer.max_epochs=1", "ckpt_path=auto"), tmp_path)
    assert fresh["status"] == "completed" and fresh["epochs_completed"] == 1
    again = run(cfg_for("trainer.max_epochs=2", "ckpt_path=auto"), tmp_path)
    assert again["epochs_completed"] == 2 and [r["epoch"] for r in history(tmp_path)] == [0, 1]


def test_a_failure_during_training_is_recorded(tmp_path):
    class Boom(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 3:
                raise RuntimeError("disk on fire")

    with pytest.raises(RunFailed, match="disk on fire"):
        run(cfg_for(), tmp_path, extra_callbacks=[Boom()])
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["status"] == "failed: RuntimeError: disk on fire"
    assert "Traceback" in results["traceback"] and "on_train_batch_start" in results["traceback"]


def test_cli_exit_codes_follow_the_status(tmp_path):
    """0 completed, 2 refused (nothing written), 3 stopped by the guard; results.json says which."""
    ok = train_cli(*TINY, "trainer.max_epochs=1", f"hydra.run.dir={tmp_path / 'ok'}", cwd=ROOT)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert json.loads((tmp_path / "ok" / "results.json").read_text())["status"] == "completed"
    again = train_cli(*TINY, "trainer.max_epochs=1", f"hydra.run.dir={tmp_path / 'ok'}", cwd=ROOT)
    assert again.returncode == 2 and "already holds a run" in again.stderr and "Traceback" not in again.stderr
    stop = train_cli(
        "+experiment=p6b_v2",
        *TINY,
        "guard.rollback.max_rollbacks=0",
        "+fault=inject",
        "fault.nan_at_steps=[8]",
        "logger.flush_every=1",
        f"hydra.run.dir={tmp_path / 'stop'}",
        cwd=ROOT,
    )
    assert stop.returncode == 3, stop.stderr[-2000:]
    results = json.loads((tmp_path / "stop" / "results.json").read_text())
    assert results["status"] == "stopped: max_rollbacks"
    record = results["guard"]  # events.jsonl summed up
    assert record["policy"] == "rollback" and record["rollbacks"] == 0 and record["stops"] == 1
    assert record["collapses"] == {"nonfinite": 1}
    _, skipped = read_steps(tmp_path / "stop", ["train/skipped"])["train/skipped"]
    assert record["skipped_batches"] == sum(v > 0 for v in skipped)  # the per-step log, counted here
    last = torch.load(tmp_path / "stop" / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["epoch"] == 0 and all(torch.isfinite(v).all() for v in last["state_dict"].values())  # not the NaN model


def test_start_up_names_every_broken_object_at_once(tmp_path):
    """Validation builds each object from its config node: one error lists the model's, the loss's
    and the window's problems together, before any data is read."""
    with pytest.raises(ConfigError) as e:
        run(cfg_for("model.heads=3", "loss.gamma=0", "window.context=1", "data.path=/nowhere.npz"), tmp_path)
    for setting in ("model.d_model", "loss.gamma", "window.context"):
        assert setting in str(e.value)
    assert not any(tmp_path.iterdir())


def test_results_hold_the_baselines_computed_independently(tmp_path):
    """results.json's baselines: slot-linear weights by numpy least squares on the train windows,
    and every baseline's mean val / ood cosine by numpy."""
    cfg = cfg_for("trainer.max_epochs=1")
    results = run(cfg, tmp_path)
    splits = build_data(cfg)
    train = splits["train"].gather(torch.arange(len(splits["train"])))
    c, t = train["context"].double().numpy(), train["target"].double().numpy()
    w, *_ = np.linalg.lstsq(c.transpose(0, 2, 1).reshape(-1, c.shape[1]), t.reshape(-1), rcond=None)
    b = results["baselines"]
    np.testing.assert_allclose(b["slot_weights"], w, atol=1e-6)
    for split in ("val", "ood"):
        batch = splits[split].gather(torch.arange(len(splits[split])))
        c, t = batch["context"].double().numpy(), batch["target"].double().numpy()

        def unit(p):
            return p / np.linalg.norm(p, axis=1, keepdims=True)

        for name, pred in (("copy_last", c[:, -1]), ("mean_context", unit(c.mean(1))), ("slot_linear", unit(np.einsum("nkd,k->nd", c, w)))):
            assert b[split][name] == pytest.approx(float(np.mean(np.sum(pred * t, 1))), abs=1e-5)
    assert json.loads((tmp_path / "results.json").read_text())["baselines"] == b


def test_every_ending_says_how_the_model_compares_with_the_baselines(tmp_path, caplog):
    """results.json's verdict and the run's last lines: best (epoch, val cos, checkpoint), last, the
    val baselines, and a warning naming the checkpoint to use when the last model is below mean of
    context (a TINY model after two epochs is), each checked against the run's own records."""
    with caplog.at_level("INFO"):
        results = run(cfg_for(), tmp_path)
    v = json.loads((tmp_path / "results.json").read_text())["verdict"]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    best_row = max(rows, key=lambda r: r["val/cos"])
    assert v["best"] == {
        "epoch": best_row["epoch"],
        "val_cos": pytest.approx(best_row["val/cos"]),
        "checkpoint": results["best_checkpoint"],
    }
    assert v["last"] == {
        "epoch": rows[-1]["epoch"],
        "val_cos": pytest.approx(rows[-1]["val/cos"]),
        "checkpoint": results["last_checkpoint"],
    }
    assert v["baselines"] == results["baselines"]["val"]
    assert rows[-1]["val/cos"] < v["baselines"]["mean_context"]  # so the warning must be there
    assert any("below mean of context" in w for w in v["warnings"])
    said = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "lvm.training.run"]
    assert said[-1 - len(v["warnings"])][1].startswith("baselines, val cos: copy-last ")
    assert said[len(said) - len(v["warnings"]) :] == [("WARNING", w) for w in v["warnings"]]


def test_a_moved_run_keeps_its_best_checkpoint(tmp_path):
    """Resumed in a moved directory, Lightning forgot the checkpoints it had ranked: the next
    validation became "best" beside the real one (two best files; the old one never pruned)."""
    src, moved = tmp_path / "src", tmp_path / "moved"
    run(cfg_for("trainer.max_epochs=2"), src)
    shutil.move(src, moved)
    results = run(cfg_for("trainer.max_epochs=3", "ckpt_path=last"), moved)
    val = [r["val/cos"] for r in history(moved)]
    best = int(np.argmax(val))
    assert len(val) == 3
    assert sorted(p.name for p in (moved / "checkpoints").glob("best-epoch*.ckpt")) == [f"best-epoch{best:02d}.ckpt"]
    assert results["best_checkpoint"] == str(moved / "checkpoints" / f"best-epoch{best:02d}.ckpt")
    assert results["best_val_cos"] == pytest.approx(val[best])
