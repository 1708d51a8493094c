"""`python -m lvm.tools.search +search=NAME [lvm.train overrides]` (`make search`): an Optuna search for a
stable recipe.

The preset (conf/search/NAME.yaml) names the experiment, the parameters (ranges or choices), the
objective, the number of trials, the sampler and the pruner. Each trial's config is composed from
conf/ with Hydra's compose API: the experiment, the preset's and the command line's lvm.train
overrides, then the trial's suggestions; each trial is a normal run directory (<out>/trial_NNN:
checkpoints, TensorBoard, results.json). Every epoch's val cosine goes to Optuna, and the pruner
stops a lagging trial at an epoch boundary (callbacks/prune.py; its results.json says `stopped:
pruned`). The objective is the run's metric minus `rollback_cost` per rollback and `drop_cost` per
dropped update: a recipe that needed the guard ranks below an equally good one that did not.

The study lives in <out>/study.db (SQLite): the same command resumes an interrupted search
without repeating finished trials (a trial the interruption cut short is recorded as failed and
run again as a new trial). `jobs` > 1 runs trials side by side in processes that share the study,
each with its share of the CPUs (threads=auto) and, on a machine with GPUs, one GPU of its own, as
the parallel launcher gives its jobs. At the end <out> gets summary.csv, summary.md and plots
(optimisation history, parameter importances, the objective over two parameters).

Needs the `search` extra (optuna): `pip install -e '.[search]'`.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import math
import multiprocessing
import re
import warnings
from pathlib import Path
from typing import Any

import hydra
from hydra import compose
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from lvm.runtime.cli import CONF_DIR, EXIT_FAIL, EXIT_OK, entry_point, run_entry_point
from lvm.runtime.errors import ConfigError, LvmError
from lvm.runtime.objects import build
from lvm.runtime.tables import fmt, md_table
from lvm.tools.runs import run_values

log = logging.getLogger("lvm.tools.search")

DRIVER_KEYS = ("search", "out", "jobs")  # the study config's own keys; any other override goes to every trial
COLUMNS = ("trial", "state", "objective", "best_val_cos", "final_val_cos", "rollbacks", "dropped_updates", "epochs", "verdict", "status")


def need_optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise LvmError(
            "lvm.tools.search needs Optuna: install the search extra (pip install -e '.[search]', or make setup-extras)"
        ) from None
    return optuna


def check_space(params: dict[str, Any]) -> None:
    """Each parameter: {low, high[, log, step]} or {choices: [...]}."""
    if not params:
        raise ConfigError("search.params is empty: name at least one parameter to search")
    for name, p in params.items():
        if "choices" in p:
            if not p["choices"]:
                raise ConfigError(f"search.params.{name}.choices is empty")
        elif not all(isinstance(p.get(k), (int, float)) for k in ("low", "high")) or not p["low"] < p["high"]:
            raise ConfigError(f"search.params.{name} needs low < high (numbers) or choices (got {p})")
        elif p.get("log") and p["low"] <= 0:
            raise ConfigError(f"search.params.{name}: a log range needs low > 0 (got {p['low']})")


def suggest(trial: Any, params: dict[str, Any]) -> dict[str, Any]:
    """The trial's values of every searched parameter."""
    out = {}
    for name, p in params.items():
        if "choices" in p:
            out[name] = trial.suggest_categorical(name, list(p["choices"]))
        elif isinstance(p["low"], int) and isinstance(p["high"], int) and not p.get("log"):
            out[name] = trial.suggest_int(name, p["low"], p["high"], step=p.get("step") or 1)
        else:
            out[name] = trial.suggest_float(name, float(p["low"]), float(p["high"]), log=bool(p.get("log")), step=p.get("step"))
    return out


def trial_overrides(overrides: list[str]) -> list[str]:
    """The command line's lvm.train overrides, which every trial gets: all but the search's own
    settings (search.*, search/pruner=..., out, jobs)."""
    return [o for o in overrides if re.split(r"[=./]", o.lstrip("+~"))[0] not in DRIVER_KEYS]


def make_sampler(sampler: dict[str, Any], worker: int = 0) -> Any:
    """The sampler of one worker (search.sampler): seeded seed + worker, as workers with one seed
    would suggest alike."""
    seed = {"seed": sampler["seed"] + worker} if sampler.get("seed") is not None else {}
    return build("search.sampler", sampler, **seed)


class Search:
    """One search: its settings, the lvm.train overrides every trial gets, and its study."""

    def __init__(self, cfg: DictConfig, train_overrides: list[str]) -> None:
        self.optuna = need_optuna()
        self.s = OmegaConf.to_container(cfg.search, resolve=True)
        check_space(self.s["params"])
        if self.s["objective"] not in ("best_val_cos", "final_val_cos"):
            raise ConfigError(f"search.objective must be best_val_cos or final_val_cos (got {self.s['objective']!r})")
        if self.s["direction"] not in ("maximize", "minimize"):
            raise ConfigError(f"search.direction must be maximize or minimize (got {self.s['direction']!r})")
        if not (isinstance(cfg.jobs, int) and cfg.jobs >= 1) or not (isinstance(self.s["trials"], int) and self.s["trials"] >= 1):
            raise ConfigError(f"jobs and search.trials must be integers >= 1 (got {cfg.jobs!r}, {self.s['trials']!r})")
        self.out = Path(cfg.out)
        self.jobs = cfg.jobs
        self.overrides = [f"+experiment={self.s['experiment']}", *self.s["overrides"], *train_overrides]
        self.storage = f"sqlite:///{(self.out / 'study.db').resolve()}"
        self.max_epochs = int(compose(config_name="train", overrides=self.overrides).trainer.max_epochs)
        make_sampler(self.s["sampler"])  # checked before any trial runs
        build("search.pruner", self.s["pruner"])

    def defaults(self) -> dict[str, Any]:
        """The searched parameters' values in the experiment as shipped (a group parameter: its choice)."""
        cfg = compose(config_name="train", overrides=self.overrides, return_hydra_config=True)
        choices = cfg.hydra.runtime.choices
        return {name: choices[name] if "choices" in p else OmegaConf.select(cfg, name) for name, p in self.s["params"].items()}

    def study(self, worker: int = 0) -> Any:
        return self.optuna.create_study(
            study_name=self.s["name"],
            storage=self.storage,
            load_if_exists=True,
            direction=self.s["direction"],
            sampler=make_sampler(self.s["sampler"], worker),
            pruner=build("search.pruner", self.s["pruner"]),
        )

    def objective(self, trial: Any) -> float:
        """Train one trial in <out>/trial_NNN; its objective (pruned trials raise TrialPruned)."""
        from callbacks.prune import TrialPruning
        from lvm.runtime.errors import RunFailed
        from lvm.training.run import run

        values = suggest(trial, self.s["params"])
        overrides = [*self.overrides, *(f"{k}={v}" for k, v in values.items()), f"name={self.s['name']}_trial{trial.number:03d}"]
        cfg = compose(config_name="train", overrides=overrides, return_hydra_config=True)
        choices = dict(cfg.hydra.runtime.choices)
        with open_dict(cfg):
            del cfg["hydra"]
        run_dir = self.out / f"trial_{trial.number:03d}"
        trial.set_user_attr("run_dir", str(run_dir))
        trial.set_user_attr("overrides", overrides)
        pruning = TrialPruning(trial, "val/cos")
        log.info("[search] trial %d: %s", trial.number, " ".join(f"{k}={v}" for k, v in values.items()))
        try:
            results = run(cfg, run_dir, choices, extra_callbacks=[pruning], jobs=self.jobs)
        except (RunFailed, LvmError) as e:
            trial.set_user_attr("status", f"failed: {e}")
            raise
        metrics, status = run_values(run_dir)
        trial.set_user_attr("status", status)
        for k in ("best_val_cos", "final_val_cos", "rollbacks", "dropped_updates", "verdict"):
            trial.set_user_attr(k, metrics[k])
        trial.set_user_attr("epochs", results["epochs_completed"])
        if pruning.stop_reason:
            raise self.optuna.TrialPruned(f"pruned after epoch {pruning.pruned_at}")
        metric = metrics[self.s["objective"]]
        if metric is None or not math.isfinite(metric):
            raise LvmError(f"trial {trial.number}: no finite {self.s['objective']} ({status})")
        return self.score(metric, metrics)

    def score(self, metric: float, values: dict[str, Any]) -> float:
        """The objective of a trial whose metric is `metric`: worse by rollback_cost per rollback and
        drop_cost per dropped update of the guard (the skip rule's zeroed batches are the recipe's own
        working and cost nothing)."""
        penalty = self.s["rollback_cost"] * (values["rollbacks"] or 0) + self.s["drop_cost"] * (values["dropped_updates"] or 0)
        return metric - penalty if self.s["direction"] == "maximize" else metric + penalty

    def finished(self, study: Any) -> int:
        states = (self.optuna.trial.TrialState.COMPLETE, self.optuna.trial.TrialState.PRUNED)
        return len(study.get_trials(deepcopy=False, states=states))


def work(search: Search, worker: int) -> None:
    """One worker's trials until the study holds search.trials finished ones (the storage is
    shared), at most as many attempts as were missing when it started (failed trials count)."""
    import torch

    from lvm.runtime.errors import RunFailed
    from lvm.runtime.launchers import claim_gpu

    study = search.study(worker)  # threads: each trial's run() shares the CPUs out among search.jobs
    optuna = search.optuna
    missing = search.s["trials"] - search.finished(study)
    stop = optuna.study.MaxTrialsCallback(search.s["trials"], states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED))
    catch = (LvmError, RunFailed)  # a failed trial (refused at start, or failed in training) is recorded; the search goes on
    gpus = torch.cuda.device_count()
    claim = claim_gpu(search.out / ".gpu_locks", worker % gpus, gpus) if search.jobs > 1 and gpus else contextlib.nullcontext()
    with claim as gpu:
        if gpu is not None:
            search.overrides.append(f"trainer.devices=[{gpu}]")  # this worker's trials train on its GPU
        study.optimize(search.objective, n_trials=missing, callbacks=[stop], catch=catch)


def _worker(cfg_yaml: str, train_overrides: list[str], config_dir: str, worker: int) -> None:
    """A spawned worker process: Hydra's compose needs its own initialisation there."""
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir, version_base="1.3"):
        work(Search(OmegaConf.create(cfg_yaml), train_overrides), worker)


def run_search(cfg: DictConfig, train_overrides: list[str]) -> dict[str, Any]:
    search = Search(cfg, train_overrides)
    search.out.mkdir(parents=True, exist_ok=True)
    study = search.study()
    stale = [t for t in study.get_trials(deepcopy=False) if t.state == search.optuna.trial.TrialState.RUNNING]
    for t in stale:  # cut short by an interruption: recorded as failed, its recipe tried again as a new trial
        study.tell(t.number, state=search.optuna.trial.TrialState.FAIL)
        study.enqueue_trial(t.params)
    if search.s["enqueue_defaults"] and not study.get_trials(deepcopy=False):
        study.enqueue_trial(search.defaults())  # trial 0: the experiment as shipped, the recipe to beat
    done = search.finished(study)
    log.info(
        "[search] %s: %d of %d trials finished%s, into %s",
        search.s["name"],
        done,
        search.s["trials"],
        f" ({len(stale)} interrupted trial(s) to run again)" if stale else "",
        search.out,
    )
    if done < search.s["trials"]:
        if search.jobs == 1:
            work(search, 0)
        else:
            spawn = multiprocessing.get_context("spawn")
            procs = [spawn.Process(target=_worker, args=(OmegaConf.to_yaml(cfg), train_overrides, CONF_DIR, w)) for w in range(search.jobs)]
            for p in procs:
                p.start()
            for p in procs:
                p.join()
    return summarize(search, search.study())


def summarize(search: Search, study: Any) -> dict[str, Any]:
    """summary.csv, summary.md and the plots; returns the summary."""
    names = list(search.s["params"])
    rows = []
    for t in study.get_trials(deepcopy=False):
        a = t.user_attrs
        done = t.state == search.optuna.trial.TrialState.COMPLETE  # a pruned trial's value is only its last report
        rows.append(
            {
                "trial": t.number,
                "state": t.state.name.lower(),
                "objective": t.value if done else None,
                **{n: t.params.get(n) for n in names},
                "best_val_cos": a.get("best_val_cos"),
                "final_val_cos": a.get("final_val_cos"),
                "rollbacks": a.get("rollbacks"),
                "dropped_updates": a.get("dropped_updates"),
                "epochs": a.get("epochs"),
                "verdict": a.get("verdict", ""),
                "status": a.get("status", ""),
            }
        )
    columns = [COLUMNS[0], *names, *COLUMNS[1:]]
    with (search.out / "summary.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        w.writerows({k: "" if r[k] is None else r[k] for k in columns} for r in rows)
    complete = [r for r in rows if r["state"] == "complete"]
    best = max(complete, key=lambda r: r["objective"] if search.s["direction"] == "maximize" else -r["objective"], default=None)
    epochs_run = sum(r["epochs"] or 0 for r in rows if r["state"] in ("complete", "pruned"))
    full = sum(1 for r in rows if r["state"] in ("complete", "pruned")) * search.max_epochs
    lines = [
        f"# Search {search.s['name']} ({search.s['objective']}, {search.s['direction']}; "
        f"{search.s['rollback_cost']} per rollback, {search.s['drop_cost']} per dropped update)",
        "",
        *md_table(columns, [[fmt(r[k], 4).replace("|", "\\|") for k in columns] for r in rows]),
        "",
        f"Epochs trained: {epochs_run} of {full} for as many full trials (pruning saved {full - epochs_run}).",
        "",
    ]
    if best:
        lines.append(
            "Best: trial "
            + str(best["trial"])
            + ", "
            + ", ".join(f"{n}={fmt(best[n], 4)}" for n in names)
            + f": objective {fmt(best['objective'], 4)}, best val cos {fmt(best['best_val_cos'], 4)}"
        )
    (search.out / "summary.md").write_text("\n".join(lines) + "\n")
    plots = plot(search, study, complete)
    print("\n".join(lines))
    print(f"lvm.tools.search: wrote {search.out / 'summary.md'}, summary.csv and {', '.join(p.name for p in plots)}")
    return {"rows": rows, "best": best, "epochs_run": epochs_run, "epochs_full": full, "plots": [str(p) for p in plots]}


def plot(search: Search, study: Any, complete: list[dict[str, Any]]) -> list[Path]:
    """history.png, importances.png (with 2+ complete trials) and objective_pair.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    out: list[Path] = []
    drawers = {"history.png": ovm.plot_optimization_history}
    if len(complete) >= 2:
        drawers["importances.png"] = ovm.plot_param_importances
    for name, draw in drawers.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", search.optuna.exceptions.ExperimentalWarning)
                ax = draw(study)
        except (ValueError, RuntimeError) as e:  # e.g. importances with no variation among the trials
            log.warning("[search] %s not drawn: %s", name, e)
            continue
        ax.figure.savefig(search.out / name, dpi=90, bbox_inches="tight")
        plt.close(ax.figure)
        out.append(search.out / name)
    x, y = search.s["plot_pair"]
    if complete and x in search.s["params"] and y in search.s["params"]:
        fig, ax = plt.subplots(figsize=(6, 4.5))
        dots = ax.scatter([r[x] for r in complete], [r[y] for r in complete], c=[r["objective"] for r in complete], cmap="viridis", s=60)
        for r in complete:
            ax.annotate(str(r["trial"]), (r[x], r[y]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        for key, setter in ((x, ax.set_xscale), (y, ax.set_yscale)):
            if search.s["params"][key].get("log"):
                setter("log")
        ax.set_xlabel(x)
        ax.set_ylabel(y)
        fig.colorbar(dots, label="objective")
        ax.set_title(f"{search.s['name']}: objective of the complete trials")
        fig.savefig(search.out / "objective_pair.png", dpi=90, bbox_inches="tight")
        plt.close(fig)
        out.append(search.out / "objective_pair.png")
    return out


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="study")
@entry_point("lvm.tools.search")
def main(cfg: DictConfig) -> int:
    if "search" not in cfg:
        raise ConfigError("name a search preset: python -m lvm.tools.search +search=p6b_v2 (conf/search/)")
    train_overrides = trial_overrides(list(HydraConfig.get().overrides.task))
    summary = run_search(cfg, train_overrides)
    return EXIT_OK if summary["best"] else EXIT_FAIL  # no trial completed: say so in the exit code


def cli() -> None:
    """The console script."""
    run_entry_point(main)


if __name__ == "__main__":
    cli()
