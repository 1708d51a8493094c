"""Hydra launchers for sweeps: checks before a multirun starts, and one GPU per local parallel job.

The basic launcher (sequential), hydra-joblib-launcher (`hydra/launcher=parallel` or `joblib`,
extra `sweep`: parallel local jobs, one GPU each) and hydra-submitit-launcher
(`hydra/launcher=slurm_gpu` / `slurm_cpu`, extra `slurm`: one SLURM job per sweep job). A missing
plugin is named with its extra; DDP under a local multirun is refused (every extra rank would
relaunch the sweep); under SLURM, tasks per node must follow trainer.devices. Inside a job:
its own GPU (`own_gpu`), resuming when requeued (`resume_on_requeue`) and its share of the CPUs
(`sweep_jobs`).
"""

from __future__ import annotations

import fcntl
import importlib.util
import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lvm.runtime.errors import ConfigError

log = logging.getLogger(__name__)

BASIC_LAUNCHER = "hydra._internal.core_plugins.basic_launcher.BasicLauncher"
JOBLIB_LAUNCHER = "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"
SLURM_LAUNCHER = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
SUBMITIT_PREFIX = "hydra_plugins.hydra_submitit_launcher."  # SlurmLauncher, LocalLauncher

# hydra/launcher choice -> (optional extra, plugin, modules it needs)
_JOBLIB = ("sweep", "hydra-joblib-launcher", ("hydra_plugins.hydra_joblib_launcher", "joblib"))
_SUBMITIT = ("slurm", "hydra-submitit-launcher", ("hydra_plugins.hydra_submitit_launcher", "submitit"))
LAUNCHER_EXTRAS = {
    "joblib": _JOBLIB,
    "parallel": _JOBLIB,
    "submitit_local": _SUBMITIT,
    "submitit_slurm": _SUBMITIT,
    "slurm_gpu": _SUBMITIT,
    "slurm_cpu": _SUBMITIT,
}


def launcher_choice(argv: Sequence[str]) -> str | None:
    """The hydra/launcher=NAME choice of a command line (last one wins), if any."""
    choice = None
    for arg in argv:
        key, _, value = arg.lstrip("+~").partition("=")
        if key == "hydra/launcher" and value:
            choice = value
    return choice


def missing_launcher_plugin(choice: str | None) -> str | None:
    """Why the chosen launcher cannot start (its plugin is not installed), with the command that fixes it.

    Hydra alone only says "Could not find 'hydra/launcher/joblib'"."""
    if choice not in LAUNCHER_EXTRAS:
        return None
    extra, plugin, modules = LAUNCHER_EXTRAS[choice]
    if all(importlib.util.find_spec(m.split(".")[0]) and importlib.util.find_spec(m) for m in modules):
        return None
    return f"hydra/launcher={choice} needs the {plugin} plugin (optional extra `{extra}`), not installed: pip install -e '.[{extra}]'"


def device_count(cfg: DictConfig) -> int | None:
    """Devices per node that trainer.devices asks for; None for `auto` / -1 (Lightning decides)."""
    devices = cfg.trainer.devices
    if isinstance(devices, str) and devices.strip().lstrip("-").isdigit():
        devices = int(devices)
    if isinstance(devices, int):
        return None if devices == -1 else devices
    if isinstance(devices, str):
        return None if devices == "auto" else len([d for d in devices.split(",") if d.strip()])
    return len(devices)


def is_ddp(cfg: DictConfig) -> bool:
    """Several processes per run: a ddp strategy, more than one device (`auto` on a machine with
    several GPUs), or more than one node."""
    import torch

    t = cfg.trainer
    devices = device_count(cfg)
    if devices is None:
        devices = torch.cuda.device_count() if str(t.accelerator) != "cpu" else 1
    return "ddp" in str(t.strategy) or devices > 1 or int(t.get("num_nodes", 1)) > 1


def refuse_ddp_multirun(cfg: DictConfig, launcher_target: str) -> None:
    """DDP runs under a multirun only on SLURM (one allocation per job, ranks started by srun).

    The basic launcher would have every extra DDP rank relaunch the whole sweep; joblib workers
    cannot start rank processes at all."""
    if launcher_target == SLURM_LAUNCHER or not is_ddp(cfg):
        return
    t = cfg.trainer
    why = (
        "every extra DDP rank would relaunch the whole sweep"
        if launcher_target == BASIC_LAUNCHER
        else "its workers cannot start the rank processes"
    )
    raise ConfigError(
        f"trainer.strategy={t.strategy} trainer.devices={t.devices} trainer.num_nodes={t.get('num_nodes', 1)} "
        f"cannot run under a Hydra multirun (-m or +sweep=...) with the launcher {launcher_target.rsplit('.', 1)[-1]}: "
        f"{why}. Run each DDP job as a single run (without -m), "
        "or sweep on SLURM with hydra/launcher=slurm_gpu (submitit: one SLURM job per sweep job, "
        "hydra.launcher.tasks_per_node = trainer.devices, nodes = trainer.num_nodes)."
    )


def check_slurm_tasks(cfg: DictConfig, launcher: DictConfig) -> None:
    """Under SLURM, Lightning takes one process per task: tasks per node must equal trainer.devices,
    nodes trainer.num_nodes (the slurm_* presets interpolate them; an override can break that)."""
    if launcher.get("_target_") != SLURM_LAUNCHER:
        return
    devices, num_nodes = device_count(cfg), int(cfg.trainer.get("num_nodes", 1))
    if devices is None:
        raise ConfigError(
            f"trainer.devices={cfg.trainer.devices} under hydra/launcher=slurm_*: set the number of "
            "devices per node, e.g. trainer.devices=4 (hydra.launcher.tasks_per_node follows it)"
        )
    if launcher.tasks_per_node != devices or launcher.nodes != num_nodes:
        raise ConfigError(
            f"hydra.launcher.tasks_per_node={launcher.tasks_per_node} and hydra.launcher.nodes={launcher.nodes} "
            f"must equal trainer.devices={devices} and trainer.num_nodes={num_nodes}: Lightning runs one process "
            "per SLURM task (leave tasks_per_node and nodes to the slurm_* presets, which follow the trainer)"
        )


def check_multirun(config: DictConfig) -> None:
    """Launcher settings a multirun cannot run with, found before any job starts or is submitted."""
    launcher = config.hydra.launcher
    refuse_ddp_multirun(config, launcher._target_)
    check_slurm_tasks(config, launcher)


def default_jobs() -> int:
    """n_jobs of hydra/launcher=parallel: one job per visible GPU, else half the CPU cores, 1 to 4
    (every job holds its own copy of the data and uses cores // n_jobs threads)."""
    import torch

    gpus = torch.cuda.device_count()
    return gpus if gpus else max(1, min(4, (os.cpu_count() or 2) // 2))


OmegaConf.register_new_resolver("lvm_sweep_jobs", default_jobs, replace=True)


def wants_one_gpu(cfg: DictConfig) -> bool:
    """A single-device run that would take a GPU (and so needs its own when jobs run side by side)."""
    import torch

    return (
        str(cfg.trainer.accelerator) in ("auto", "gpu", "cuda")
        and device_count(cfg) == 1
        and not OmegaConf.is_list(cfg.trainer.devices)
        and torch.cuda.device_count() > 0
    )


@contextmanager
def claim_gpu(lock_dir: Path, first: int, count: int) -> Iterator[int]:
    """Hold one of `count` GPUs for the block: the first free one from `first` on, else wait for `first`.

    An flock per GPU under `lock_dir` (the sweep directory): released when the job ends or its
    process dies, so a reused joblib worker or a crashed job never keeps a GPU."""
    lock_dir.mkdir(parents=True, exist_ok=True)
    held = None
    for gpu in [(first + i) % count for i in range(count)]:
        f = (lock_dir / f"gpu{gpu}.lock").open("w")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            continue
        held = gpu, f
        break
    if held is None:
        log.info("All %d GPUs are taken (n_jobs > GPUs): waiting for GPU %d", count, first)
        f = (lock_dir / f"gpu{first}.lock").open("w")
        fcntl.flock(f, fcntl.LOCK_EX)
        held = first, f
    try:
        yield held[0]
    finally:
        held[1].close()


@contextmanager
def own_gpu(cfg: DictConfig, hc: Any) -> Iterator[None]:
    """Under the joblib launcher, a single-GPU job gets a GPU of its own: trainer.devices=[k], k the
    first free GPU from job_num % GPUs on (held by a file lock until the job ends). A device index,
    not CUDA_VISIBLE_DEVICES: loky reuses worker processes, whose CUDA may already be initialised."""
    if hc.launcher._target_ != JOBLIB_LAUNCHER or not wants_one_gpu(cfg):
        yield
        return
    import torch

    count = torch.cuda.device_count()
    with claim_gpu(Path(hc.sweep.dir) / ".gpu_locks", hc.job.num % count, count) as gpu:
        cfg.trainer.devices = [gpu]
        log.info("Job %s runs on GPU %d of %d", hc.job.num, gpu, count)
        yield


def resume_on_requeue(cfg: DictConfig, hc: Any) -> None:
    """Under a submitit launcher a job without ckpt_path runs with ckpt_path=auto: a requeued job
    starts again in its own directory and must resume from its last.ckpt, not overwrite it."""
    if cfg.ckpt_path is None and str(hc.launcher._target_).startswith(SUBMITIT_PREFIX):
        cfg.ckpt_path = "auto"


def sweep_jobs(hc: Any) -> int:
    """Jobs that run side by side on this machine: joblib's n_jobs (negative: CPUs + 1 + n_jobs)."""
    from lvm.runtime.threads import (
        usable_cpus,  # torch is imported lazily here, as in every function above
    )

    if hc.launcher._target_ != JOBLIB_LAUNCHER:
        return 1
    n = int(hc.launcher.n_jobs)
    return n if n > 0 else max(1, usable_cpus() + 1 + n)
