"""Sweep summaries: one row per Hydra multirun job in summary.csv / summary.md, plus a heatmap.

`SweepSummary` (registered under hydra.callbacks in conf/train.yaml) checks the launcher settings
(lvm/runtime/launchers.py) before any job starts and writes the summary when the multirun ends, both in
the parent process whatever the launcher; `python -m lvm.tools.sweep_report <sweep dir>` regenerates the
summary from the job directories.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from lvm.runtime.errors import ConfigError, LvmError
from lvm.runtime.launchers import check_multirun
from lvm.runtime.tables import fmt, md_table
from lvm.tools.runs import run_values

log = logging.getLogger(__name__)

METRICS = (
    "best_val_cos",
    "final_val_cos",
    "slot_linear_val_cos",
    "margin_last",
    "r5",
    "rollbacks",
    "events",
    "skipped_batches",
    "dropped_updates",
    "wall_time_s",
)
COLUMNS = ("job", "overrides", *METRICS, "verdict", "status")


@dataclass
class Job:
    """What one job directory says about its run."""

    num: int
    overrides: list[str]
    values: dict[str, Any]
    axes: dict[str, Any]
    status: str
    row: dict[str, Any] = field(default_factory=dict)


def read_job(job_dir: Path, axes: Sequence[str]) -> Job:
    """Job number, overrides, the `axes` settings, metrics and status from a job directory
    (results.json may be missing)."""
    hydra_dir = job_dir / ".hydra"
    num = int(OmegaConf.load(hydra_dir / "hydra.yaml").hydra.job.num)
    overrides = [str(o) for o in OmegaConf.load(hydra_dir / "overrides.yaml")]
    cfg = OmegaConf.load(hydra_dir / "config.yaml")
    values, status = run_values(job_dir)
    return Job(num, overrides, values, {k: OmegaConf.select(cfg, k, default=None) for k in axes}, status)


def sweep_axes(sweep_dir: Path) -> list[str]:
    """The heatmap axes the sweep was run with (hydra.callbacks.sweep_summary.axes of a job)."""
    for hydra_yaml in sorted(sweep_dir.glob("*/.hydra/hydra.yaml")):
        axes = OmegaConf.select(OmegaConf.load(hydra_yaml), "hydra.callbacks.sweep_summary.axes", default=None)
        if axes is not None:
            return list(axes)
    raise ConfigError(f"sweep directory {sweep_dir}: no job records hydra.callbacks.sweep_summary.axes; give axes=[ROW_KEY,COLUMN_KEY]")


def find_jobs(sweep_dir: Path, axes: Sequence[str]) -> list[Job]:
    """Every job directory (one with .hydra/overrides.yaml) under the sweep directory, by job number."""
    dirs = sorted(p.parent.parent for p in sweep_dir.glob("*/.hydra/overrides.yaml"))
    return sorted((read_job(d, axes) for d in dirs), key=lambda j: j.num)


def varying_overrides(jobs: list[Job]) -> list[list[str]]:
    """Per job, the overrides whose value differs between jobs (all of them when none differs)."""
    parsed = [dict(o.partition("=")[::2] for o in j.overrides) for j in jobs]
    keys = {k for d in parsed for k in d if len({p.get(k) for p in parsed}) > 1}
    if not keys:
        return [j.overrides for j in jobs]
    return [[o for o in j.overrides if o.partition("=")[0] in keys] for j in jobs]


def write_csv(jobs: list[Job], path: Path) -> None:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows({k: ("" if job.row[k] is None else job.row[k]) for k in COLUMNS} for job in jobs)


def write_md(jobs: list[Job], path: Path, sweep_dir: Path) -> None:
    cells = [[fmt(job.row[k], 2 if k == "wall_time_s" else 4).replace("|", "\\|").replace("\n", " ") for k in COLUMNS] for job in jobs]
    lines = [f"# Sweep {sweep_dir}", "", *md_table(COLUMNS, cells)]
    path.write_text("\n".join(lines) + "\n")


def heatmap_panels(jobs: list[Job], axes: Sequence[str]) -> dict[str, list[Job]]:
    """Jobs grouped by their varying overrides other than the two axes (a swept ramp preset, say):
    one heatmap panel each, so a third swept setting is shown, never averaged away."""
    panels: dict[str, list[Job]] = {}
    for job, shown in zip(jobs, varying_overrides(jobs)):
        key = " ".join(o for o in shown if o.partition("=")[0].lstrip("+~") not in axes)
        panels.setdefault(key, []).append(job)
    return panels


def metric_grid(jobs: list[Job], metric: str, axes: Sequence[str], rows: list[Any], cols: list[Any]) -> Any:
    """[rows, cols] of `metric` over the two `axes` (NaN where the job failed)."""
    import numpy as np

    grid = np.full((len(rows), len(cols)), np.nan)
    for j in jobs:
        v, r, c = j.row.get(metric), j.axes[axes[0]], j.axes[axes[1]]
        if v is not None and r is not None and c is not None:
            grid[rows.index(r), cols.index(c)] = float(v)
    return grid


def plot_heatmap(jobs: list[Job], metric: str, axes: Sequence[str], path: Path) -> bool:
    """`metric` over the two `axes` (rows, columns), one panel per value of any other swept
    setting, on one colour scale; False when the two axes do not both vary."""
    rows, cols = (sorted({j.axes[a] for j in jobs if j.axes[a] is not None}) for a in axes)
    if len(rows) < 2 or len(cols) < 2:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    panels = heatmap_panels(jobs, axes)
    grids = {key: metric_grid(group, metric, axes, rows, cols) for key, group in panels.items()}
    finite = np.concatenate([g[np.isfinite(g)] for g in grids.values()])
    vmin, vmax = (finite.min(), finite.max()) if finite.size else (0.0, 1.0)
    fig, axs = plt.subplots(1, len(grids), figsize=((1.6 * len(cols) + 2.5) * len(grids), 1.0 * len(rows) + 2), squeeze=False)
    for ax, (key, grid) in zip(axs[0], grids.items()):
        im = ax.imshow(grid, cmap="viridis", aspect="auto", vmin=vmin, vmax=vmax)
        ax.set_xticks(range(len(cols)), [str(c) for c in cols])
        ax.set_yticks(range(len(rows)), [str(r) for r in rows])
        ax.set_xlabel(axes[1])
        ax.set_ylabel(axes[0])
        ax.set_title(f"{metric}\n{key}" if key else metric, fontsize=10)
        for (i, k), v in np.ndenumerate(grid):
            ax.text(
                k,
                i,
                "failed" if np.isnan(v) else f"{v:.3f}",
                ha="center",
                va="center",
                bbox={"facecolor": "white", "alpha": 0.7, "linewidth": 0},
            )
    fig.colorbar(im, ax=list(axs[0]))
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return True


def check_metric(metric: str) -> None:
    """The summary's metric (hydra.callbacks.sweep_summary.metric; metric= of lvm.tools.sweep_report)."""
    if metric not in METRICS:
        raise ConfigError(f"the summary metric (sweep_summary.metric) must be one of {', '.join(METRICS)} (got {metric})")


def check_axes(axes: Sequence[str]) -> None:
    """The heatmap's axes (hydra.callbacks.sweep_summary.axes; axes= of lvm.tools.sweep_report)."""
    if len(axes) != 2 or not all(isinstance(a, str) and a for a in axes):
        raise ConfigError(f"the heatmap axes (sweep_summary.axes) must be two config keys, rows then columns (got {list(axes)})")


def write_summary(sweep_dir: str | Path, metric: str, axes: Sequence[str] | None) -> dict[str, str]:
    """summary.csv, summary.md and (when both `axes` vary; None: the sweep's own) summary_heatmap.png;
    their paths."""
    check_metric(metric)
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise LvmError(f"sweep directory {sweep_dir}: no such directory")
    axes = sweep_axes(sweep_dir) if axes is None else axes
    check_axes(axes)
    jobs = find_jobs(sweep_dir, axes)
    for job, shown in zip(jobs, varying_overrides(jobs)):
        job.row = {"job": job.num, "overrides": " ".join(shown), **job.values, "status": job.status}
    paths = {"csv": sweep_dir / "summary.csv", "md": sweep_dir / "summary.md", "png": sweep_dir / "summary_heatmap.png"}
    write_csv(jobs, paths["csv"])
    write_md(jobs, paths["md"], sweep_dir)
    if not plot_heatmap(jobs, metric, axes, paths["png"]):
        log.info("No heatmap: %s and %s do not both vary in this sweep", *axes)
        del paths["png"]
    log.info("Sweep summary of %d jobs: %s", len(jobs), paths["md"])
    return {k: str(v) for k, v in paths.items()}


class SweepSummary(Callback):
    """Hydra callback, in the parent process: check the launcher settings before a multirun starts,
    summarise the sweep directory when it ends."""

    def __init__(self, metric: str, axes: Sequence[str]) -> None:
        check_metric(metric)
        check_axes(axes)
        self.metric, self.axes = metric, list(axes)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            check_multirun(config)
        except LvmError as e:
            raise SystemExit(f"lvm: {e}") from None

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        write_summary(config.hydra.sweep.dir, self.metric, self.axes)
