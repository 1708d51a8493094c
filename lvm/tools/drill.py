"""`python -m lvm.tools.drill [quick=true] [only=[NAME,...]]` (`make drills`): the guard's fault drills.

Each drill (conf/drill.yaml) trains its recipe three ways, every run a normal `python -m lvm.train`
subprocess with its own run directory: with the fault and the guard on (`guard=rollback`), with the
fault and the guard off, and without the fault (the healthy control). The shipped experiments
also run as controls over several seeds: any action on them (a rollback, a stop, a dropped update) is a
false alarm. Each drill is
scored against the guard's goals:

- detected: a collapse event or a dropped update (events.jsonl) at or after the fault's onset;
- latency: steps from the onset to the first action; an injected in-training fault (`instant`)
  must be acted on within one statistics window (logger.flush_every) and before its epoch ends;
- recovered: the guarded run's final val cos at most `tolerance` below its control's, or a clean
  stop (`stopped: max_rollbacks`) with its best checkpoint kept.

Writes <out>/drills.json, <out>/drills.md and <out>/<drill>.png (per-step contrastive accuracy and
diversity, and val cos per epoch, of the three runs; onset and actions marked). Exit code 0 when
every goal is met, 1 when one is missed (each miss named in the table).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
from hydra import compose
from omegaconf import DictConfig, OmegaConf

from lvm.guard.events import read_events
from lvm.runtime.cli import CONF_DIR, EXIT_FAIL, entry_point, run_entry_point
from lvm.runtime.errors import ConfigError, LvmError
from lvm.runtime.files import atomic_write_text, read_jsonl
from lvm.runtime.rundir import read_results
from lvm.runtime.tables import fmt, md_table
from lvm.runtime.threads import thread_count

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Run:
    """One training run of the suite: its directory name and its lvm.train overrides. An
    interrupted run (`first` not None) is trained first with `first` added (the fault that stops
    it), its directory moved away and back under its name when `move`, then resumed with
    ckpt_path=last."""

    key: str
    overrides: tuple[str, ...]
    first: tuple[str, ...] | None = None
    move: bool = False


@dataclass(frozen=True)
class Drill:
    name: str
    experiment: str
    overrides: tuple[str, ...]
    fault: tuple[str, ...]
    onset_epoch: int
    onset_frac: float
    guard_off: str
    instant: bool
    control: str  # the experiment of the healthy control (the drill's own when its fault is injected)
    first: tuple[str, ...] | None  # an interrupted drill: the overrides that stop its first invocation
    move: bool  # ... and whether its run directory is moved before the resume

    def recipe(self, extra: tuple[str, ...], experiment: str | None = None) -> tuple[str, ...]:
        return (f"+experiment={experiment or self.experiment}", *self.overrides, *extra)


def select_drills(cfg: DictConfig) -> list[Drill]:
    """The drills to run (quick: those marked quick; `only`: those named), checked."""
    known = dict(cfg.drills)
    names = list(cfg.only) if cfg.only else [n for n, d in known.items() if d.quick or not cfg.quick]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ConfigError(f"only: no such drill {', '.join(unknown)} (known: {', '.join(known)})")
    out = []
    for n in names:
        d = known[n]
        if not (isinstance(d.onset.epoch, int) and d.onset.epoch >= 0 and 0 <= d.onset.frac < 1):
            raise ConfigError(f"drills.{n}.onset needs an epoch >= 0 and a frac in [0, 1) (got {OmegaConf.to_container(d.onset)})")
        stop = d.get("interrupt")
        out.append(
            Drill(
                n,
                d.experiment,
                tuple(d.overrides),
                tuple(d.fault),
                d.onset.epoch,
                float(d.onset.frac),
                d.guard_off,
                bool(d.instant),
                d.get("control") or d.experiment,
                tuple(stop.first) if stop else None,
                bool(stop.move) if stop else False,
            )
        )
    return out


@functools.lru_cache(maxsize=None)
def steps_per_epoch(overrides: tuple[str, ...]) -> tuple[int, int]:
    """(training steps per epoch, logger.flush_every) of the run these overrides compose (built
    once per recipe: most drills share theirs)."""
    from lvm.training.build import build_data

    cfg = compose(config_name="train", overrides=list(overrides))
    n = len(build_data(cfg)["train"])
    return math.ceil(n / cfg.data.batch_size), int(cfg.logger.flush_every)


def plan(cfg: DictConfig, drills: list[Drill]) -> tuple[list[Run], dict[str, dict[str, Any]], list[Run]]:
    """The runs of the suite (each once), what each drill reads from them, and the controls."""
    extra = (*cfg.common, *(cfg.quick_overrides if cfg.quick else ()))
    runs: dict[str, Run] = {}
    layout: dict[str, dict[str, Any]] = {}
    for d in drills:
        recipe = d.recipe(extra)
        n, flush = steps_per_epoch(recipe)
        onset = d.onset_epoch * n + int(d.onset_frac * n)
        fault, first = (tuple(f.replace("{onset}", str(onset)) for f in fs) if fs is not None else None for fs in (d.fault, d.first))
        control = Run(
            f"control_{d.control}{'_' + '_'.join(_slug(o) for o in d.overrides) if d.overrides else ''}_seed0",
            (*d.recipe(extra, d.control), *cfg.guard_on, "seed=0"),
        )
        on = Run(f"{d.name}_guard_on", (*recipe, *fault, *cfg.guard_on), first, d.move)
        off = Run(f"{d.name}_guard_off", (*recipe, *fault, f"guard={d.guard_off}"), first, d.move)
        for r in (control, on, off):
            runs[r.key] = r
        layout[d.name] = {
            "drill": d,
            "onset": onset,
            "steps_per_epoch": n,
            "flush_every": flush,
            "on": on.key,
            "off": off.key,
            "control": control.key,
        }
    shipped = [] if cfg.quick else [*cfg.controls, *(e for e, path in cfg.controls_with_data.items() if Path(path).is_file())]
    controls = [
        Run(f"control_{e}_seed{s}", (f"+experiment={e}", *extra, *cfg.guard_on, f"seed={s}")) for e in shipped for s in cfg.control_seeds
    ]
    controls += [r for r in runs.values() if r.key.startswith("control_") and r not in controls]
    for r in controls:
        runs[r.key] = r
    return list(runs.values()), layout, controls


def _slug(override: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in override.split("=")[-1])


def train(run: Run, out: Path, reuse: bool, threads: int) -> dict[str, Any]:
    """One run of lvm.train subprocesses (`threads` torch threads each) into out/<key>; its results.json.
    `reuse`: a run that finished before (results.json present, the same plan) is read, not trained again."""
    run_dir = out / run.key
    done = run_dir / "results.json"
    args_file, plan_text = (
        out / f"{run.key}.args",
        "\n".join(run.overrides) + (f"\nfirst: {run.first} move: {run.move}" if run.first is not None else ""),
    )
    if reuse and done.is_file() and args_file.is_file() and args_file.read_text() == plan_text:
        log.info("[drill] %s: reused", run.key)
        stop = out / f"{run.key}.interrupted.json"
        return {
            **json.loads(done.read_text()),
            "exit_code": None,
            **({"interrupted": json.loads(stop.read_text())} if stop.is_file() else {}),
        }
    args_file.write_text(plan_text)
    with (out / f"{run.key}.log").open("w") as logf:
        interrupted = None
        if run.first is not None:
            first_dir = out / f"{run.key}.before_move" if run.move else run_dir
            code = _lvm_train([*run.overrides, *run.first, "overwrite=true"], first_dir, logf, threads)
            interrupted = {"exit_code": code, "moved_from": str(first_dir) if run.move else None}
            atomic_write_text(out / f"{run.key}.interrupted.json", json.dumps(interrupted))
            if run.move:
                if run_dir.exists():  # an earlier suite's run of this name (the suite owns `out`)
                    shutil.rmtree(run_dir)
                shutil.move(first_dir, run_dir)
        resume = ["ckpt_path=last"] if run.first is not None else ["overwrite=true"]
        code = _lvm_train([*run.overrides, *resume], run_dir, logf, threads)
    results, status = read_results(run_dir)
    results = {**results, "status": status if results else f"{status} (exit code {code}, see {run.key}.log)"}
    results["exit_code"] = code
    if interrupted is not None:
        results["interrupted"] = interrupted
    log.info("[drill] %s: %s (exit %d)", run.key, results["status"], code)
    return results


def _lvm_train(overrides: list[str], run_dir: Path, logf: Any, threads: int) -> int:
    args = [sys.executable, "-m", "lvm.train", *overrides, f"threads={threads}", f"hydra.run.dir={run_dir}"]
    logf.write(f"$ {' '.join(args[1:])}\n")
    logf.flush()
    proc = subprocess.run(args, stdout=logf, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return proc.returncode


def final_cos(results: dict[str, Any]) -> float | None:
    return results.get("final", {}).get("val/cos")


def acts(event: dict[str, Any]) -> bool:
    """A guard action on a fault: a collapse (rollback or stop) or a dropped update."""
    return event["severity"] == "collapse" or event["action"] == "dropped update"


def action_step(event: dict[str, Any]) -> int:
    """The step the guard acted at: a dropped update's own step (recorded at the next flush)."""
    return int(event["values"]["first_step"]) if event["action"] == "dropped update" else event["step"]


def resume_event(results: dict[str, Any]) -> dict[str, Any] | None:
    """A killed run's resume as the drill's action: the step it picked up at (its last.ckpt)."""
    stop, picked = results.get("interrupted"), results.get("resumed_from")
    if not stop or stop["exit_code"] != -9 or not picked:
        return None
    return {
        "detector": "last.ckpt",
        "where": "resume",
        "action": f"resumed from step {picked['step']}",
        "step": picked["step"],
        "severity": "resume",
        "values": {},
    }


def assess(layout: dict[str, Any], results: dict[str, dict[str, Any]], out: Path, tolerance: float) -> dict[str, Any]:
    """One drill's row: detection, latency, action (and the decisive one after dropped updates),
    recovery and which goals it missed. A killed drill's action is its resume, its latency the
    steps it lost (trained again); a moved drill must roll back to a checkpoint in its new place."""
    d: Drill = layout["drill"]
    onset, n, flush = layout["onset"], layout["steps_per_epoch"], layout["flush_every"]
    on, off, control = (results[layout[k]] for k in ("on", "off", "control"))
    killed = d.first is not None and not d.move
    if killed:
        resumed = resume_event(on)
        acted = [resumed] if resumed else []
    else:
        acted = [e for e in read_events(out / layout["on"] / "events.jsonl") if acts(e) and action_step(e) >= onset]
    first = acted[0] if acted else None
    decisive = next((e for e in acted if e["severity"] == "collapse"), None) if first and first["action"] == "dropped update" else None
    latency = (onset - first["step"] if killed else action_step(first) - onset) if first else None
    row: dict[str, Any] = {
        "drill": d.name,
        "onset_step": onset,
        "instant": d.instant,
        "detected": first is not None,
        "detector": first["detector"] if first else None,
        "where": first.get("where") if first else None,
        "latency_steps": latency,
        "action": first["action"] if first else None,
        "then": f"{decisive['action']} ({decisive['detector']}, step {decisive['step']})" if decisive else None,
        "checkpoint": first.get("checkpoint") if first else None,
        "actions": len(acted),
        "status_on": on["status"],
        "final_on": final_cos(on),
        "final_off": final_cos(off),
        "final_control": final_cos(control),
    }
    missed = []
    if first is None:
        missed.append("not resumed after the kill" if killed else "not detected")
    elif killed and not latency <= flush:
        missed.append(f"lost {latency} steps to the kill (goal: <= {flush})")
    elif not killed and d.instant and not (latency <= flush and action_step(first) < (onset // n + 1) * n):
        missed.append(f"acted {latency} steps after onset (goal: <= {flush}, before the epoch ends)")
    if d.move:  # the old place is gone, so a restore could only read the new one; none may have failed
        moved_from = (on.get("interrupted") or {}).get("moved_from")
        if moved_from and Path(moved_from).exists():
            missed.append(f"{moved_from} still exists after the move")
        if not any(e.get("checkpoint") for e in acted):
            missed.append("no checkpoint was restored after the move")
        failed = [e["action"] for e in read_events(out / layout["on"] / "events.jsonl") if e["detector"] == "corrupt_checkpoint"]
        if failed:
            missed.append(f"a restore failed after the move: {'; '.join(failed)}")
    if killed:
        row["exact"] = row["final_on"] is not None and row["final_on"] == row["final_control"]
    f_on, f_ctl = row["final_on"], row["final_control"]
    stopped_clean = on["status"].startswith("stopped") and on.get("best_checkpoint") and Path(on["best_checkpoint"]).is_file()
    if not stopped_clean and (f_on is None or f_ctl is None or f_on < f_ctl - tolerance):
        missed.append(f"final val cos {fmt(f_on, 4)} vs control {fmt(f_ctl, 4)} (goal: at most {tolerance} below)")
    row["missed"] = missed
    return row


def false_alarms(controls: list[Run], results: dict[str, dict[str, Any]], out: Path) -> list[dict[str, Any]]:
    rows = []
    for r in controls:
        alarms = [e for e in read_events(out / r.key / "events.jsonl") if acts(e)]
        rows.append(
            {
                "control": r.key,
                "status": results[r.key]["status"],
                "final": final_cos(results[r.key]),
                "false_alarms": len(alarms),
                "detectors": sorted({e["detector"] for e in alarms}),
            }
        )
    return rows


def report(rows: list[dict[str, Any]], controls: list[dict[str, Any]], out: Path) -> Path:
    """drills.md: one table of the drills, one of the controls, and the goals' verdict."""
    head = ["drill", "onset", "detected", "by", "where", "latency (steps)", "action", "then", "final val cos on / off / control", "goals"]
    body = [
        [
            r["drill"],
            str(r["onset_step"]),
            fmt(r["detected"]),
            r["detector"] or "-",
            r["where"] or "-",
            fmt(r["latency_steps"]),
            r["action"] or "-",
            r["then"] or "-",
            f"{fmt(r['final_on'], 4)} / {fmt(r['final_off'], 4)} / {fmt(r['final_control'], 4)}",
            "met" if not r["missed"] else "; ".join(r["missed"]),
        ]
        for r in rows
    ]
    ctl = [[c["control"], c["status"], fmt(c["final"], 4), str(c["false_alarms"]), ", ".join(c["detectors"]) or "-"] for c in controls]
    met = all(not r["missed"] for r in rows) and all(c["false_alarms"] == 0 for c in controls)
    lines = [
        "# Guard drills",
        "",
        *md_table(head, body),
        "",
        "## Healthy controls (any action of the guard is a false alarm)",
        "",
        *md_table(["control", "status", "final val cos", "false alarms", "by"], ctl),
        "",
        "A killed drill's action is its resume (by its last step checkpoint), its latency the steps it lost.",
        "",
        f"Every goal met: {'yes' if met else 'no'}",
    ]
    path = out / "drills.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def plot(layout: dict[str, Any], row: dict[str, Any], out: Path) -> Path:
    """<out>/<drill>.png: per-step CA and diversity (running mean of 10), val cos per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from lvm.tools.runs import read_steps

    logging.getLogger("tensorboard").setLevel(logging.ERROR)  # "No path found after ..." per log read

    fig, (a1, a2, a3) = plt.subplots(3, 1, figsize=(9, 7), sharex=True)
    for key, label in (("on", "guard on"), ("off", "guard off"), ("control", "control")):
        run_dir = out / layout[key]
        try:
            series = read_steps(run_dir, ["train/ca", "train/diversity"])
            history = read_jsonl(run_dir / "metrics.jsonl")
        except (OSError, LvmError):
            continue
        for ax, tag in ((a1, "train/ca"), (a2, "train/diversity")):
            steps, values = series[tag]
            k = min(10, len(values))
            ax.plot(steps[k - 1 :], np.convolve(values, np.ones(k) / k, mode="valid"), label=label, linewidth=1)
        a3.plot([h["step"] for h in history], [h.get("val/cos", float("nan")) for h in history], marker="o", label=label)
    for ax, name in ((a1, "train CA"), (a2, "train diversity"), (a3, "val cos")):
        ax.axvline(layout["onset"], color="red", linestyle="--", linewidth=1)
        ax.set_ylabel(name, fontsize=8)
    for e in read_events(out / layout["on"] / "events.jsonl"):
        if acts(e):  # rollbacks and stops black, dropped updates grey
            a3.axvline(action_step(e), color="black" if e["severity"] == "collapse" else "grey", linewidth=1)
    a1.legend(fontsize=8)
    a1.set_title(f"{row['drill']}: onset (red), rollbacks (black), dropped updates (grey)")
    a3.set_xlabel("step")
    path = out / f"{row['drill']}.png"
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return path


def run_suite(cfg: DictConfig) -> dict[str, Any]:
    if not (isinstance(cfg.jobs, int) and cfg.jobs >= 1):
        raise ConfigError(f"jobs must be an integer >= 1 (got {cfg.jobs!r})")
    threads = thread_count(cfg.threads, cfg.jobs)  # each run's: a fixed count, so runs side by side never re-share
    drills = select_drills(cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    runs, layouts, controls = plan(cfg, drills)
    log.info("[drill] %d drills, %d runs (%d side by side, %d torch threads each) into %s", len(drills), len(runs), cfg.jobs, threads, out)
    with ThreadPoolExecutor(cfg.jobs) as pool:
        results = dict(zip((r.key for r in runs), pool.map(lambda r: train(r, out, bool(cfg.reuse), threads), runs)))
    rows = [assess(layouts[d.name], results, out, cfg.tolerance) for d in drills]
    for d, row in zip(drills, rows):
        row["plot"] = str(plot(layouts[d.name], row, out))
    alarms = false_alarms(controls, results, out)
    summary = {
        "quick": bool(cfg.quick),
        "drills": rows,
        "controls": alarms,
        "met": all(not r["missed"] for r in rows) and all(c["false_alarms"] == 0 for c in alarms),
    }
    (out / "drills.json").write_text(json.dumps(summary, indent=2))
    md = report(rows, alarms, out)
    print(md.read_text())
    print(f"lvm.tools.drill: wrote {md}, {out / 'drills.json'} and one PNG per drill")
    return summary


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="drill")
@entry_point("lvm.tools.drill")
def main(cfg: DictConfig) -> int:
    return 0 if run_suite(cfg)["met"] else EXIT_FAIL


def cli() -> None:
    """The console script."""
    run_entry_point(main)


if __name__ == "__main__":
    cli()
