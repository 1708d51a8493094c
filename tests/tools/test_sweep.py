"""Sweeps summarise themselves: summary.csv / .md / heatmap per multirun, one TensorBoard run and
hparams session per job, failed jobs reported, DDP refused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from lvm.runtime.cli import EXIT_INTERRUPTED
from tests.helpers import (
    ROOT,
    TINY,
    check_tensorboard_runs,
    hparams_session,
    job_dirs,
    run_module,
    sweep_rows,
    train_cli,
)


def test_grid_sweep_summarised_and_regenerated(tmp_path):
    sweep = tmp_path / "sweep"
    proc = train_cli(
        "-m",
        "+experiment=p6b_v2",
        "loss.gamma=4,8",
        "loss.lambda_max=0.02,0.05",
        *TINY,
        "trainer.max_epochs=1",
        f"hydra.sweep.dir={sweep}",
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(job_dirs(sweep)) == 4
    table = sweep_rows(sweep)
    assert [r["job"] for r in table] == ["0", "1", "2", "3"]
    expected = [f"loss.gamma={g} loss.lambda_max={m}" for g in (4, 8) for m in (0.02, 0.05)]
    assert [r["overrides"] for r in table] == expected
    for r, job in zip(table, job_dirs(sweep)):
        assert r["status"] == "completed" and job.name.startswith(r["job"] + "_")
        results = json.loads((job / "results.json").read_text())
        assert float(r["best_val_cos"]) == pytest.approx(results["best_val_cos"], abs=1e-4)
        assert r["verdict"] == ("; ".join(results["verdict"]["warnings"]) or "ok")  # each job's own verdict
        assert float(r["wall_time_s"]) == pytest.approx(results["wall_time_s"], abs=0.01) and results["wall_time_s"] > 0
        for key in ("final_val_cos", "margin_last", "r5", "rollbacks", "events", "skipped_batches"):
            float(r[key])
    # The slot-linear baseline of each job's own results.json; the same data, so the same value.
    slot = [json.loads((job / "results.json").read_text())["baselines"]["val"]["slot_linear"] for job in job_dirs(sweep)]
    assert [float(r["slot_linear_val_cos"]) for r in table] == slot and len(set(slot)) == 1 and 0 < slot[0] < 1
    md = (sweep / "summary.md").read_text()
    assert md.count("| completed |") == 4 and all(e in md for e in expected)
    png = sweep / "summary_heatmap.png"
    assert png.read_bytes()[:4] == b"\x89PNG"
    check_tensorboard_runs(sweep)
    assert len({tuple(hparams_session(job / "tb")[0][k] for k in ("loss.gamma", "loss.lambda_max")) for job in job_dirs(sweep)}) == 4

    for name in ("summary.csv", "summary.md", "summary_heatmap.png"):
        (sweep / name).unlink()
    report = run_module("lvm.tools.sweep_report", str(sweep), "metric=final_val_cos", timeout=120)
    assert report.returncode == 0, report.stderr[-3000:]
    assert sweep_rows(sweep) == table and png.is_file() and (sweep / "summary.md").is_file()


def test_failed_job_reported_and_sweep_goes_on(tmp_path):
    sweep = tmp_path / "sweep"
    proc = train_cli("-m", "+experiment=p6b_v2", "loss.gamma=4,-1", *TINY, "trainer.max_epochs=1", f"hydra.sweep.dir={sweep}", cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ok, failed = sweep_rows(sweep)
    assert ok["overrides"] == "loss.gamma=4" and ok["status"] == "completed"
    assert failed["overrides"] == "loss.gamma=-1" and failed["status"].startswith("failed: ")
    assert "loss.gamma must be > 0" in failed["status"] and failed["best_val_cos"] == ""
    results = json.loads((job_dirs(sweep)[1] / "results.json").read_text())
    assert results["status"].startswith("failed: ") and "loss.gamma" in results["error"]
    assert not (sweep / "summary_heatmap.png").exists()  # only gamma varies
    log = (job_dirs(sweep)[0] / "train.log").read_text()  # each job's log holds its own lines only
    assert "Run completed" in log and "loss.gamma must be" not in log


def test_ddp_multirun_refused(tmp_path):
    sweep = tmp_path / "sweep"
    proc = train_cli("-m", "loss.gamma=4,8", *TINY, "trainer.strategy=ddp", "trainer.devices=2", f"hydra.sweep.dir={sweep}", cwd=ROOT)
    assert proc.returncode != 0
    assert "relaunch the whole sweep" in proc.stderr and "trainer.strategy=ddp" in proc.stderr
    assert "without -m" in proc.stderr and "hydra/launcher=slurm_gpu" in proc.stderr  # the two ways that work
    assert "Traceback" not in proc.stderr
    assert not sweep.exists()  # refused in the parent, before any job


def test_heatmap_has_a_panel_per_other_swept_setting(tmp_path):
    """gamma x clamp x ramp: one gamma x clamp panel per ramp preset, values placed, never averaged."""
    import math

    from lvm.tools.sweep import Job, heatmap_panels, metric_grid, plot_heatmap

    axes = ("loss.gamma", "loss.lambda_max")

    jobs = []
    for r, ramp in enumerate(("p6b_v1", "p6b_v2")):
        for g, gamma in enumerate((4.0, 8.0)):
            for m, lam in enumerate((0.02, 0.05)):
                value = None if (r, g, m) == (1, 1, 1) else 0.5 + r / 10 + g / 100 + m / 1000
                jobs.append(
                    Job(
                        len(jobs),
                        [f"loss.gamma={gamma}", f"loss.lambda_max={lam}", f"ramp={ramp}", "trainer.max_epochs=1"],
                        {},
                        {"loss.gamma": gamma, "loss.lambda_max": lam},
                        "ok",
                        {"best_val_cos": value},
                    )
                )
    panels = heatmap_panels(jobs, axes)
    assert list(panels) == ["ramp=p6b_v1", "ramp=p6b_v2"] and [len(p) for p in panels.values()] == [4, 4]
    v1 = metric_grid(panels["ramp=p6b_v1"], "best_val_cos", axes, [4.0, 8.0], [0.02, 0.05])
    assert v1.tolist() == [[0.5, 0.501], [0.51, 0.511]]
    # The axes come from config: swapped, the grid is the transpose.
    swapped = metric_grid(panels["ramp=p6b_v1"], "best_val_cos", axes[::-1], [0.02, 0.05], [4.0, 8.0])
    assert swapped.tolist() == [[0.5, 0.51], [0.501, 0.511]]
    v2 = metric_grid(panels["ramp=p6b_v2"], "best_val_cos", axes, [4.0, 8.0], [0.02, 0.05])
    assert v2[0].tolist() == [0.6, 0.601] and v2[1, 0] == 0.61 and math.isnan(v2[1, 1])  # the failed job
    png = tmp_path / "h.png"
    assert plot_heatmap(jobs, "best_val_cos", axes, png) and png.read_bytes()[:4] == b"\x89PNG"
    assert not plot_heatmap(jobs[:2], "best_val_cos", axes, tmp_path / "none.png")  # gamma does not vary


def test_the_report_takes_the_heatmap_axes_the_sweep_was_run_with(tmp_path):
    from omegaconf import OmegaConf

    from lvm.runtime.errors import ConfigError
    from lvm.tools.sweep import SweepSummary, sweep_axes

    job = tmp_path / "0_x" / ".hydra"
    job.mkdir(parents=True)
    OmegaConf.save({"hydra": {"callbacks": {"sweep_summary": {"axes": ["optim.optimizer.lr", "loss.gamma"]}}}}, job / "hydra.yaml")
    assert sweep_axes(tmp_path) == ["optim.optimizer.lr", "loss.gamma"]
    with pytest.raises(ConfigError, match="give axes="):
        sweep_axes(tmp_path / "0_x")
    with pytest.raises(ConfigError, match="sweep_summary.axes"):
        SweepSummary("best_val_cos", ["loss.gamma"])


def test_ctrl_c_stops_a_sequential_sweep_in_one_line(tmp_path):
    """Ctrl-C ended the running job (`interrupted`, resumable) and the sweep went on to the next."""
    sweep = tmp_path / "sweep"
    args = ["-m", "loss.gamma=4,8", *TINY, "trainer.max_epochs=200", f"hydra.sweep.dir={sweep}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "lvm.train", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 120
    while not list(sweep.glob("*/metrics.jsonl")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)  # the first job has trained an epoch
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_INTERRUPTED, err[-2000:]
    assert err.strip().splitlines()[-1] == "lvm.train: interrupted (Ctrl-C)" and "Traceback" not in err
    (job,) = job_dirs(sweep)  # the second job never started
    assert json.loads((job / "results.json").read_text())["status"] == "interrupted"
    assert (job / "checkpoints" / "last.ckpt").is_file()
