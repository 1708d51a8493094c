"""Launchers: resume with ckpt_path=auto, DDP only where a launcher can start ranks, GPU pinning of
parallel jobs, missing plugins named with their extra, the SLURM presets down to the sbatch script.

Tests that need hydra-joblib-launcher (extra `sweep`) or hydra-submitit-launcher (extra `slurm`)
skip when it is not installed."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from lvm.runtime import launchers
from lvm.runtime.errors import ConfigError
from lvm.runtime.launchers import own_gpu, resume_on_requeue
from lvm.training.run import run
from tests.helpers import (
    ROOT,
    TINY,
    cfg_for,
    check_tensorboard_runs,
    compose_cfg,
    history,
    job_dirs,
    sweep_rows,
    train_cli,
)

HAS_JOBLIB = (
    importlib.util.find_spec("hydra_plugins") is not None and importlib.util.find_spec("hydra_plugins.hydra_joblib_launcher") is not None
)
HAS_SUBMITIT = (
    importlib.util.find_spec("hydra_plugins") is not None
    and importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is not None
    and importlib.util.find_spec("submitit") is not None
)
needs_joblib = pytest.mark.skipif(not HAS_JOBLIB, reason="extra `sweep` (hydra-joblib-launcher) not installed")
needs_submitit = pytest.mark.skipif(not HAS_SUBMITIT, reason="extra `slurm` (hydra-submitit-launcher) not installed")


def trainer_cfg(**trainer):
    return OmegaConf.create({"trainer": {"strategy": "auto", "devices": 1, "accelerator": "auto", **trainer}})


# ckpt_path=auto: what a requeued job runs with


def test_auto_resume_starts_fresh_then_continues(tmp_path, caplog):
    with caplog.at_level("INFO"):
        first = run(cfg_for("ckpt_path=auto", "trainer.max_epochs=1"), tmp_path)
    assert "ckpt_path=auto: no" in caplog.text and "starting fresh" in caplog.text
    caplog.clear()
    with caplog.at_level("INFO"):
        second = run(cfg_for("ckpt_path=auto", "trainer.max_epochs=2"), tmp_path)  # the "requeued" job
    assert "ckpt_path=auto: resuming from" in caplog.text and "(epoch 0, step" in caplog.text
    assert [r["epoch"] for r in history(tmp_path)] == [0, 1]  # epoch 0 not trained or recorded twice
    assert second["epochs_completed"] == 2 and second["global_step"] == 2 * first["global_step"]
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 1


def test_submitit_jobs_default_to_auto_resume():
    cfg = OmegaConf.create({"ckpt_path": None})
    resume_on_requeue(cfg, SimpleNamespace(launcher=SimpleNamespace(_target_=launchers.SLURM_LAUNCHER)))
    assert cfg.ckpt_path == "auto"
    for target, given, expected in [(launchers.BASIC_LAUNCHER, None, None), (launchers.SLURM_LAUNCHER, "/x.ckpt", "/x.ckpt")]:
        cfg = OmegaConf.create({"ckpt_path": given})
        resume_on_requeue(cfg, SimpleNamespace(launcher=SimpleNamespace(_target_=target)))
        assert cfg.ckpt_path == expected


# DDP and multirun


@pytest.mark.parametrize("trainer", [{"strategy": "ddp"}, {"devices": 2}, {"devices": "0,1"}, {"num_nodes": 2}])
@pytest.mark.parametrize("launcher", [launchers.BASIC_LAUNCHER, launchers.JOBLIB_LAUNCHER])
def test_ddp_refused_under_local_launchers(trainer, launcher):
    with pytest.raises(ConfigError, match="hydra/launcher=slurm_gpu") as e:
        launchers.refuse_ddp_multirun(trainer_cfg(**trainer), launcher)
    assert "without -m" in str(e.value) and launcher.rsplit(".", 1)[-1] in str(e.value)
    launchers.refuse_ddp_multirun(trainer_cfg(**trainer), launchers.SLURM_LAUNCHER)  # one allocation per job: allowed
    launchers.refuse_ddp_multirun(trainer_cfg(), launcher)  # single device: allowed


def test_devices_auto_is_ddp_only_with_several_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert launchers.is_ddp(trainer_cfg(devices="auto")) and not launchers.is_ddp(trainer_cfg(devices="auto", accelerator="cpu"))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert not launchers.is_ddp(trainer_cfg(devices="auto")) and not launchers.is_ddp(trainer_cfg(devices=[3]))


def test_slurm_tasks_must_follow_the_trainer():
    launcher = OmegaConf.create({"_target_": launchers.SLURM_LAUNCHER, "tasks_per_node": 4, "nodes": 2})
    launchers.check_slurm_tasks(trainer_cfg(strategy="ddp", devices=4, num_nodes=2), launcher)
    with pytest.raises(ConfigError, match=r"tasks_per_node=4 .* trainer\.devices=2"):
        launchers.check_slurm_tasks(trainer_cfg(strategy="ddp", devices=2, num_nodes=2), launcher)
    with pytest.raises(ConfigError, match=r"trainer\.devices=auto"):
        launchers.check_slurm_tasks(trainer_cfg(devices="auto"), launcher)


def test_ddp_preset_composes():
    cfg = cfg_for("trainer=ddp")
    assert cfg.trainer.strategy == "ddp" and cfg.trainer.devices == "auto" and cfg.trainer.num_nodes == 1
    assert cfg.trainer.max_epochs == 2 and cfg.trainer.gradient_clip_val == 1.0  # the default trainer underneath


# Missing plugins


def test_launcher_choice_read_from_the_command_line():
    assert launchers.launcher_choice(["-m", "hydra/launcher=joblib", "loss.gamma=4,8"]) == "joblib"
    assert launchers.launcher_choice(["+experiment=p6b_v2"]) is None


def test_missing_plugin_named_with_its_extra(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if "launcher" in name else real(name, *a))
    for choice, extra in [("joblib", "sweep"), ("parallel", "sweep"), ("slurm_gpu", "slurm"), ("submitit_slurm", "slurm")]:
        msg = launchers.missing_launcher_plugin(choice)
        assert f"hydra/launcher={choice}" in msg and f"pip install -e '.[{extra}]'" in msg
    assert launchers.missing_launcher_plugin("basic") is None and launchers.missing_launcher_plugin(None) is None


@pytest.mark.skipif(HAS_JOBLIB, reason="the plugin is installed")
def test_cli_without_joblib_plugin_says_what_to_install(tmp_path):
    proc = train_cli("-m", "hydra/launcher=joblib", "loss.gamma=4,8", f"hydra.sweep.dir={tmp_path / 's'}", cwd=ROOT)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "pip install -e '.[sweep]'" in proc.stderr and "hydra-joblib-launcher" in proc.stderr


# Parallel local jobs (joblib)


def test_parallel_jobs_get_a_gpu_each(monkeypatch, tmp_path):
    """Job numbers 0 and 2 both prefer GPU 0 of 2: while job 0 holds it, job 2 takes GPU 1."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)

    def hc(num):
        return SimpleNamespace(
            launcher=SimpleNamespace(_target_=launchers.JOBLIB_LAUNCHER),
            sweep=SimpleNamespace(dir=str(tmp_path)),
            job=SimpleNamespace(num=num),
        )

    a, b = trainer_cfg(), trainer_cfg()
    with own_gpu(a, hc(0)), own_gpu(b, hc(2)):
        assert list(a.trainer.devices) == [0] and list(b.trainer.devices) == [1]
    c = trainer_cfg()
    with own_gpu(c, hc(2)):
        assert list(c.trainer.devices) == [0]  # released at job end
    cpu = trainer_cfg(accelerator="cpu")
    with own_gpu(cpu, hc(1)):
        assert cpu.trainer.devices == 1  # CPU jobs are left alone
    basic = trainer_cfg()
    with own_gpu(basic, SimpleNamespace(launcher=SimpleNamespace(_target_=launchers.BASIC_LAUNCHER))):
        assert basic.trainer.devices == 1  # sequential jobs keep the default device


def test_default_parallel_jobs(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    assert launchers.default_jobs() == 3
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert launchers.default_jobs() == 4
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert launchers.default_jobs() == 1


@pytest.mark.slow
@needs_joblib
def test_joblib_sweep_runs_in_workers_and_is_summarised(tmp_path):
    sweep_dir = tmp_path / "sweep"
    proc = train_cli(
        "-m",
        "hydra/launcher=parallel",
        "hydra.launcher.n_jobs=2",
        "+experiment=p6b_v2",
        "loss.gamma=4,8",
        *TINY,
        "trainer.max_epochs=1",
        f"hydra.sweep.dir={sweep_dir}",
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Joblib.Parallel(n_jobs=2" in proc.stdout + proc.stderr
    assert [r["status"] for r in sweep_rows(sweep_dir)] == ["completed", "completed"]  # written by on_multirun_end in the parent
    check_tensorboard_runs(sweep_dir)
    pids = {int(p.name.split(".")[-2]) for p in sweep_dir.glob("*/tb/events.out.tfevents.*")}
    assert len(pids) == 2  # two loky workers


# SLURM presets (no cluster here: composed, instantiated and rendered to the sbatch script)


def sbatch_script(monkeypatch, tmp_path: Path, *overrides: str) -> str:
    """The sbatch script submitit would submit for this config, built the way the launcher builds it."""
    import submitit
    import submitit.slurm.slurm as slurm
    from hydra.utils import instantiate
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    monkeypatch.setattr(slurm.SlurmExecutor, "affinity", classmethod(lambda cls: 1))  # pretend srun exists
    cfg = compose_cfg("train", *overrides, f"hydra.sweep.dir={tmp_path}", return_hydra_config=True)
    launchers.check_multirun(cfg)
    params = dict(instantiate(cfg.hydra.launcher).params)
    executor = submitit.AutoExecutor(
        folder=params.pop("submitit_folder"), cluster="slurm", slurm_max_num_timeout=params.pop("max_num_timeout")
    )
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
    return executor._executor._make_submission_file_text("python -u -m submitit.core._submit x", "uid")


@needs_submitit
def test_slurm_gpu_preset_follows_the_ddp_trainer(monkeypatch, tmp_path):
    text = sbatch_script(
        monkeypatch,
        tmp_path,
        "hydra/launcher=slurm_gpu",
        "trainer=ddp",
        "trainer.devices=4",
        "trainer.num_nodes=2",
        "hydra.launcher.partition=gpu",
        "hydra.launcher.setup=[module load cuda]",
    )
    for line in (
        "--ntasks-per-node=4",
        "--gpus-per-node=4",
        "--nodes=2",
        "--partition=gpu",
        "--time=240",
        "--signal=USR2@120",
        "--cpus-per-task=4",
        "--mem=64GB",
        "module load cuda",
        f"--output={tmp_path}/.submitit/",
    ):
        assert line in text, line


@needs_submitit
def test_slurm_cpu_preset_reserves_no_gpu(monkeypatch, tmp_path):
    text = sbatch_script(monkeypatch, tmp_path, "hydra/launcher=slurm_cpu")
    assert "--ntasks-per-node=1" in text and "--cpus-per-task=8" in text and "gpus" not in text


@needs_submitit
def test_slurm_preset_refuses_mismatched_tasks(tmp_path):
    proc = train_cli(
        "-m",
        "hydra/launcher=slurm_gpu",
        "trainer=ddp",
        "trainer.devices=2",
        "hydra.launcher.tasks_per_node=1",
        f"hydra.sweep.dir={tmp_path / 's'}",
        cwd=ROOT,
    )
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "hydra.launcher.tasks_per_node=1" in proc.stderr and not (tmp_path / "s").exists()


def signal_when_checkpointed(proc: subprocess.Popen, job_root: Path, timeout: float = 300) -> int:
    """SIGUSR2 (submitit's requeue signal) to the training process once its first last.ckpt exists;
    its pid is in its TensorBoard file name. Returns the pid."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        ckpts = list(job_root.glob("*/*/checkpoints/last.ckpt"))
        events = list(job_root.glob("*/*/tb/events.out.tfevents.*"))
        if ckpts and events:
            pid = int(events[0].name.split(".")[-2])
            os.kill(pid, signal.SIGUSR2)
            return pid
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint to requeue from: {proc.poll()=}")


@pytest.mark.slow
@needs_submitit
def test_submitit_requeue_resumes_in_the_same_job_dir(tmp_path):
    """A preemption signal to a running job under submitit's local executor: submitit requeues it as
    on SLURM, and the requeued job finds the same directory (the sweep's timestamp is the
    submission's, not the requeue's) and resumes from its last.ckpt (ckpt_path=auto by default)."""
    args = [
        "-m",
        "hydra/launcher=submitit_local",
        "+experiment=p6b_v2",
        *TINY,
        "data.synthetic.articles=600",
        "trainer.max_epochs=25",
        f"hydra.sweep.dir={tmp_path}/" + "${now:%H-%M-%S-%f}",
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "lvm.train", *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        signal_when_checkpointed(proc, tmp_path)
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-3000:]
    (sweep_dir,) = tmp_path.iterdir()
    (job,) = job_dirs(sweep_dir)
    log = "".join(p.read_text() for p in sweep_dir.glob(".submitit/*/*_log.*"))
    assert "this job is preempted" in log and "Requeued job" in log
    assert "ckpt_path=auto: resuming from" in log
    assert [r["epoch"] for r in history(job)] == list(range(25))  # every epoch once
    results = json.loads((job / "results.json").read_text())
    assert results["epochs_completed"] == 25 and results.get("status") != "failed"
    assert len(list((job / "tb").glob("events.out.tfevents.*"))) == 2  # one TensorBoard run, two processes


@pytest.mark.slow
def test_ddp_preset_two_processes_on_cpu(tmp_path):
    """trainer=ddp with two gloo processes through the CLI: one run directory, rank 0 writes every
    file once, both ranks end with the same validation metrics."""
    run_dir = tmp_path / "ddp"
    proc = train_cli(
        "+experiment=p6b_v2", *TINY, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", f"hydra.run.dir={run_dir}", cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [p.name for p in tmp_path.iterdir()] == ["ddp"]
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())  # each file once, from rank 0
    best = [n for n in names if n.startswith("best-epoch")]
    good = set(names) - {"last.ckpt", *best}  # the guard keeps its newest keep_good=2 good checkpoints
    assert len(best) == 1 and "last.ckpt" in names
    assert 1 <= len(good) <= 2 and good <= {"good-initial.ckpt", "good-epoch00.ckpt", "good-epoch01.ckpt"}
    assert [r["epoch"] for r in history(run_dir)] == [0, 1]  # rank 0 only: no second row per epoch
    assert len(list((run_dir / "tb").glob("events.out.tfevents.*"))) == 1
    results = json.loads((run_dir / "results.json").read_text())
    assert results["world_size"] == 2 and results["epochs_completed"] == 2
    finished = {}
    for log_file in ("train.log", "train.rank1.log"):
        line = next(ln for ln in (run_dir / log_file).read_text().splitlines() if " of 2 finished: " in ln)
        rank = int(line.split("Rank ")[1].split(" ")[0])
        finished[rank] = line.split("finished: ")[1]
    assert set(finished) == {0, 1} and finished[0] == finished[1]  # same best and final val cos on both ranks
    assert f"final val cos {results['final']['val/cos']!r}" in finished[0]
