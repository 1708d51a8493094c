"""Sweeps: launcher checks before a multirun starts, and its summary when it ends.

Summary: one row per Hydra multirun job in summary.csv / summary.md, plus a heatmap.
`SweepSummary` (registered under hydra.callbacks in conf/train.yaml) checks the launcher settings
before any job starts and writes the summary when the multirun ends (both in the parent process,
whatever the launcher); `python -m lvm.sweep_report <sweep dir>` regenerates it from the job directories.

Launchers: the basic one (sequential), hydra-joblib-launcher (`hydra/launcher=parallel` or `joblib`,
extra `sweep`: parallel local jobs, one GPU each) and hydra-submitit-launcher
(`hydra/launcher=slurm_gpu` / `slurm_cpu`, extra `slurm`: one SLURM job per sweep job).
"""

from __future__ import annotations

import csv
import fcntl
import importlib.util
import json
import logging
import math
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from lvm.errors import ConfigError, LvmError

log = logging.getLogger(__name__)

METRICS = ("best_val_cos", "final_val_cos", "margin_last", "r5", "rollbacks", "events", "wall_time_s")
COLUMNS = ("job", "overrides", *METRICS, "status")
AXES = ("loss.gamma", "loss.lambda_max")  # heatmap: rows, columns
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


@dataclass
class Job:
    """What one job directory says about its run."""

    num: int
    overrides: list[str]
    values: dict[str, Any]
    axes: dict[str, Any]
    status: str
    row: dict[str, Any] = field(default_factory=dict)


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
    why = ("every extra DDP rank would relaunch the whole sweep" if launcher_target == BASIC_LAUNCHER
           else "its workers cannot start the rank processes")
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
        raise ConfigError(f"trainer.devices={cfg.trainer.devices} under hydra/launcher=slurm_*: set the number of "
                          "devices per node, e.g. trainer.devices=4 (hydra.launcher.tasks_per_node follows it)")
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

    return (str(cfg.trainer.accelerator) in ("auto", "gpu", "cuda") and device_count(cfg) == 1
            and not OmegaConf.is_list(cfg.trainer.devices) and torch.cuda.device_count() > 0)


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


def read_job(job_dir: Path) -> Job:
    """Job number, overrides, metrics and status from a job directory (results.json may be missing)."""
    hydra_dir = job_dir / ".hydra"
    num = int(OmegaConf.load(hydra_dir / "hydra.yaml").hydra.job.num)
    overrides = [str(o) for o in OmegaConf.load(hydra_dir / "overrides.yaml")]
    cfg = OmegaConf.load(hydra_dir / "config.yaml")
    axes = {k: OmegaConf.select(cfg, k, default=None) for k in AXES}
    results_path = job_dir / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {"status": "failed", "error": "no results.json"}
    events = read_events(job_dir / "events.jsonl")
    final = results.get("final", {})
    values = {
        "best_val_cos": results.get("best_val_cos"),
        "final_val_cos": final.get("val/cos"),
        "margin_last": final.get("mini5cat/margin_last"),
        "r5": final.get("mini5cat/r5"),
        "rollbacks": sum(e.get("action") == "rollback" for e in events),
        "events": len(events),
        "wall_time_s": results.get("wall_time_s"),
    }
    status = f"failed: {results.get('error', 'unknown error')}" if results.get("status") == "failed" else "ok"
    return Job(num, overrides, values, axes, status)


def read_events(path: Path) -> list[dict[str, Any]]:
    """The guard's events of a run (none when the file is missing)."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def find_jobs(sweep_dir: Path) -> list[Job]:
    """Every job directory (one with .hydra/overrides.yaml) under the sweep directory, by job number."""
    dirs = sorted(p.parent.parent for p in sweep_dir.glob("*/.hydra/overrides.yaml"))
    return sorted((read_job(d) for d in dirs), key=lambda j: j.num)


def varying_overrides(jobs: list[Job]) -> list[list[str]]:
    """Per job, the overrides whose value differs between jobs (all of them when none differs)."""
    parsed = [dict(o.partition("=")[::2] for o in j.overrides) for j in jobs]
    keys = {k for d in parsed for k in d if len({p.get(k) for p in parsed}) > 1}
    if not keys:
        return [j.overrides for j in jobs]
    return [[o for o in j.overrides if o.partition("=")[0] in keys] for j in jobs]


def fmt(v: Any, column: str) -> str:
    """A table cell: floats to 4 decimals (wall time to 2), missing values as n/a."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{2 if column == 'wall_time_s' else 4}f}"
    return str(v)


def write_csv(jobs: list[Job], path: Path) -> None:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows({k: ("" if job.row[k] is None else job.row[k]) for k in COLUMNS} for job in jobs)


def write_md(jobs: list[Job], path: Path, sweep_dir: Path) -> None:
    lines = [f"# Sweep {sweep_dir}", "", "| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    lines += ["| " + " | ".join(fmt(job.row[k], k).replace("|", "\\|").replace("\n", " ") for k in COLUMNS) + " |" for job in jobs]
    path.write_text("\n".join(lines) + "\n")


def plot_heatmap(jobs: list[Job], metric: str, path: Path) -> bool:
    """`metric` over loss.gamma x loss.lambda_max (mean per cell); False when the two do not both vary."""
    rows, cols = (sorted({j.axes[a] for j in jobs if j.axes[a] is not None}) for a in AXES)
    if len(rows) < 2 or len(cols) < 2:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cells: dict[tuple[Any, Any], list[float]] = {}
    for j in jobs:
        v = j.row.get(metric)
        if v is not None and j.axes[AXES[0]] is not None and j.axes[AXES[1]] is not None:
            cells.setdefault((j.axes[AXES[0]], j.axes[AXES[1]]), []).append(float(v))
    grid = np.full((len(rows), len(cols)), np.nan)
    for (r, c), vals in cells.items():
        grid[rows.index(r), cols.index(c)] = sum(vals) / len(vals)
    fig, ax = plt.subplots(figsize=(1.6 * len(cols) + 2.5, 1.0 * len(rows) + 2))
    im = ax.imshow(grid, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(cols)), [str(c) for c in cols])
    ax.set_yticks(range(len(rows)), [str(r) for r in rows])
    ax.set_xlabel(AXES[1])
    ax.set_ylabel(AXES[0])
    ax.set_title(metric)
    for (i, k), v in np.ndenumerate(grid):
        ax.text(k, i, "failed" if np.isnan(v) else f"{v:.3f}", ha="center", va="center",
                bbox={"facecolor": "white", "alpha": 0.7, "linewidth": 0})
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise ConfigError(f"hydra.callbacks.sweep_summary.metric must be one of {', '.join(METRICS)} (got {metric})")


def write_summary(sweep_dir: str | Path, metric: str = "best_val_cos") -> dict[str, str]:
    """summary.csv, summary.md and (when gamma and lambda_max both vary) summary_heatmap.png; their paths."""
    check_metric(metric)
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise LvmError(f"sweep directory {sweep_dir}: no such directory")
    jobs = find_jobs(sweep_dir)
    for job, shown in zip(jobs, varying_overrides(jobs)):
        job.row = {"job": job.num, "overrides": " ".join(shown), **job.values, "status": job.status}
    paths = {"csv": sweep_dir / "summary.csv", "md": sweep_dir / "summary.md", "png": sweep_dir / "summary_heatmap.png"}
    write_csv(jobs, paths["csv"])
    write_md(jobs, paths["md"], sweep_dir)
    if not plot_heatmap(jobs, metric, paths["png"]):
        log.info("No heatmap: %s and %s do not both vary in this sweep", *AXES)
        del paths["png"]
    log.info("Sweep summary of %d jobs: %s", len(jobs), paths["md"])
    return {k: str(v) for k, v in paths.items()}


class SweepSummary(Callback):
    """Hydra callback, in the parent process: check the launcher settings before a multirun starts,
    summarise the sweep directory when it ends."""

    def __init__(self, metric: str = "best_val_cos") -> None:
        check_metric(metric)
        self.metric = metric

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            check_multirun(config)
        except LvmError as e:
            raise SystemExit(f"lvm: {e}") from None

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        write_summary(config.hydra.sweep.dir, self.metric)
