"""`python -m lvm.tools.compare runs=[DIR,...] out=PATH`: finished runs side by side, per epoch, against
the baselines their results.json holds (copy-last, mean of context, slot-linear): a plot
(<out>.png) and a markdown table (<out>.md). With `steps=[train/raw_norm, ...]` also the runs'
per-step statistics from TensorBoard, one panel each (<out>_steps.png), epoch ends marked."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from lvm.evaluation.baselines import BASELINES
from lvm.runtime.cli import CONF_DIR, entry_point, run_entry_point
from lvm.runtime.errors import ConfigError, LvmError
from lvm.runtime.files import read_jsonl
from lvm.runtime.tables import fmt, md_table
from lvm.tools.runs import read_steps


def read_run(run_dir: Path, metric: str) -> tuple[dict[str, Any], list[float], list[int]]:
    """A run's results.json, its per-epoch `metric` and the steps its epochs ended at
    (metrics.jsonl rows in epoch order)."""
    try:
        results = json.loads((run_dir / "results.json").read_text())
    except (OSError, ValueError) as e:
        raise LvmError(f"{run_dir}: not a finished run directory ({e})") from None
    rows = sorted(read_jsonl(run_dir / "metrics.jsonl"), key=lambda r: r["epoch"])
    values = [r[metric] for r in rows if metric in r]
    if not values:
        raise LvmError(f"{run_dir}/metrics.jsonl: no epoch has {metric!r}")
    return results, values, [r["step"] for r in rows if "step" in r]


def compare(
    runs: list[str],
    labels: list[str] | None,
    metric: str,
    split: str,
    title: str | None,
    out: str,
    steps: list[str] | None = None,
    smooth: int = 1,
) -> dict[str, str]:
    """Write <out>.png and <out>.md (and <out>_steps.png for `steps`); their paths."""
    if labels is not None and len(labels) != len(runs):
        raise ConfigError(f"labels must name every run: {len(labels)} labels for {len(runs)} runs")
    read = [read_run(Path(r), metric) for r in runs]
    names = labels or [res["name"] for res, _, _ in read]
    base = next((res["baselines"][split] for res, _, _ in read if split in res.get("baselines", {})), None)
    epochs = max(len(v) for _, v, _ in read)
    rows = [
        [name, *(fmt(values[e], 4) if e < len(values) else "" for e in range(epochs)), fmt(max(values), 4), res["status"]]
        for name, (res, values, _) in zip(names, read)
    ]
    lines = [f"# {title or metric}", "", *md_table(["run", *(str(e) for e in range(epochs)), "best", "status"], rows)]
    if base:
        lines += ["", f"Baselines ({split}): " + ", ".join(f"{k} {fmt(base[k], 4)}" for k in BASELINES)]
    out_path = Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    md = out_path.with_suffix(".md")
    md.write_text("\n".join(lines) + "\n")
    png = out_path.with_suffix(".png")
    plot(names, [v for _, v, _ in read], base, metric, title, png)
    paths = {"md": str(md), "png": str(png)}
    if steps:
        paths["steps"] = str(out_path.with_name(out_path.name + "_steps.png"))
        plot_steps(runs, names, [ends for _, _, ends in read], steps, smooth, Path(paths["steps"]))
    return paths


def plot_steps(runs: list[str], names: list[str], epoch_ends: list[list[int]], tags: list[str], smooth: int, path: Path) -> None:
    """One panel per tag: each run's per-step values, a running mean over `smooth` steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(len(tags), 1, figsize=(9, 2.2 * len(tags)), sharex=True, squeeze=False)
    for run, name, ends in zip(runs, names, epoch_ends):
        series = read_steps(Path(run), tags)
        for ax, tag in zip(axes[:, 0], tags):
            steps, values = series[tag]
            k = max(1, min(smooth, len(values)))
            ax.plot(steps[k - 1 :], np.convolve(values, np.ones(k) / k, mode="valid"), label=name, linewidth=1)
            ax.set_ylabel(tag.split("/")[-1], fontsize=8)
            for e in ends:
                ax.axvline(e, color="grey", linewidth=0.5, alpha=0.5)
    axes[0, 0].legend(fontsize=8)
    axes[-1, 0].set_xlabel(f"step (running mean over {smooth}; grey: epoch ends)")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def plot(names: list[str], series: list[list[float]], base: dict[str, float] | None, metric: str, title: str | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, values in zip(names, series):
        ax.plot(range(len(values)), values, marker="o", markersize=3, label=name)
    for (k, v), style in zip((base or {}).items(), (":", "--", "-.")):
        ax.axhline(v, color="grey", linestyle=style, linewidth=1, label=f"{k} {v:.3f}")
    ax.set_xlabel("epoch (0-based)")
    ax.set_ylabel(metric)
    ax.set_title(title or metric)
    ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="compare")
@entry_point("lvm.tools.compare")
def main(cfg: DictConfig) -> None:
    if cfg.baselines not in ("val", "ood"):
        raise ConfigError(f"baselines must be val or ood (got {cfg.baselines!r})")
    labels = list(cfg.labels) if cfg.labels is not None else None
    if not (isinstance(cfg.smooth, int) and cfg.smooth >= 1):
        raise ConfigError(f"smooth must be an integer >= 1 (got {cfg.smooth!r})")
    steps = list(cfg.steps) if cfg.steps else None
    paths = compare(list(cfg.runs), labels, cfg.metric, cfg.baselines, cfg.title, cfg.out, steps, cfg.smooth)
    print(f"lvm.tools.compare: wrote {', '.join(paths.values())}")


def cli() -> None:
    """The console script."""
    run_entry_point(main)


if __name__ == "__main__":
    cli()
