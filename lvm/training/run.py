"""A training run from start to results.json: checkpoint to resume, precision, the fit, its record."""

from __future__ import annotations

import copy
import logging
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from lvm.data.store import Windows
from lvm.evaluation.baselines import baseline_cosines, fit_slot_linear
from lvm.evaluation.suite import evaluate_after_fit
from lvm.evaluation.verdict import best_epoch, verdict, verdict_lines
from lvm.guard.detectors import CollapsedStart
from lvm.guard.events import guard_policy, read_events, summarize_events
from lvm.model.module import accelerator_device
from lvm.runtime.checkpoints import check_dim, read_checkpoint
from lvm.runtime.errors import LvmError, Preempted, RunFailed
from lvm.runtime.files import atomic_write_text, read_jsonl
from lvm.runtime.objects import build, to_plain
from lvm.runtime.precision import check_precision, resolve_precision
from lvm.runtime.rundir import (
    INITIAL,
    RunLock,
    RunLog,
    claim_run_dir,
    clear_run_outputs,
    newest_checkpoints,
    set_aside,
    start_over,
    write_failure,
    write_results,
)
from lvm.runtime.signals import StopSignals
from lvm.runtime.threads import set_threads
from lvm.training.build import Fit, build_data, build_fit
from lvm.training.config import validate

log = logging.getLogger(__name__)


def resolve_checkpoint(ckpt_path: str | None, run_dir: Path) -> tuple[str, dict[str, Any]] | None:
    """Checkpoint to resume from (path, contents), checked to load under torch's default
    weights_only rules. `last`: <run dir>/checkpoints/last.ckpt, which must exist and load.
    `auto`: see `resolve_auto`."""
    if not ckpt_path:
        return None
    if ckpt_path == "auto":
        return resolve_auto(run_dir)
    path = run_dir / "checkpoints" / "last.ckpt" if ckpt_path == "last" else Path(ckpt_path)
    if ckpt_path == "last" and not path.is_file():
        raise LvmError(
            f"checkpoint {path}: no such file (ckpt_path=last looks in this run's own directory; "
            "set hydra.run.dir to the earlier run's, or use ckpt_path=auto to start fresh when it is missing)"
        )
    return str(path), read_checkpoint(path)


def resolve_auto(run_dir: Path) -> tuple[str, dict[str, Any]] | None:
    """`auto` (what a requeued job needs: the default under a submitit launcher): last.ckpt; when it
    cannot be read, the newest checkpoint of the run that can (the unreadable file set aside, the
    steps lost said); without last.ckpt, the newest checkpoint beyond the initial weights, else a
    fresh start (None)."""
    last = run_dir / "checkpoints" / "last.ckpt"
    problem = None
    if last.is_file():
        try:
            ckpt = read_checkpoint(last)
        except LvmError as e:
            problem = e
        else:
            log.info("ckpt_path=auto: resuming from %s (epoch %s, step %s)", last, ckpt.get("epoch"), ckpt.get("global_step"))
            return str(last), ckpt
    for path in newest_checkpoints(run_dir, but="last.ckpt"):
        if problem is None and path.name == INITIAL:
            continue  # nothing trained yet: a fresh start writes the same initial weights
        try:
            ckpt = read_checkpoint(path)
        except LvmError as e:
            log.warning("ckpt_path=auto: passing over %s", e)
            continue
        step = ckpt.get("global_step")
        reached = max((r["step"] for r in read_jsonl(run_dir / "metrics.jsonl") if isinstance(r.get("step"), int)), default=None)
        if problem is not None and rank_zero_only.rank == 0:
            problem = f"{problem}; set aside as {set_aside(last).name}"
        log.warning(
            "ckpt_path=auto: %s; resuming from %s (epoch %s, step %s): the steps after %s are trained again%s",
            problem or f"no {last}",
            path,
            ckpt.get("epoch"),
            step,
            step,
            f" (metrics.jsonl reached step {reached})" if reached is not None else "",
        )
        return str(path), ckpt
    if problem is not None:
        raise LvmError(f"{problem}; ckpt_path=auto found no other readable checkpoint of {run_dir} to fall back to")
    log.info("ckpt_path=auto: no %s yet, starting fresh", last)
    return None


def with_precision(cfg: DictConfig, train: Windows, resume: dict[str, Any] | None) -> tuple[DictConfig, dict[str, Any]]:
    """The config with trainer.precision and eval.precision resolved (lvm/runtime/precision.py) and what
    was measured. `auto` measures on the run's first training batch with a fresh model (on its own
    RNG stream: the run's weights and dropout masks do not depend on the measurement); a resumed
    run keeps the precision its checkpoint was trained at."""
    values = {
        "trainer": check_precision("trainer.precision", cfg.trainer.precision),
        "eval": check_precision("eval.precision", cfg.eval.precision),
    }
    record: dict[str, Any] = dict(values)
    if "auto" not in values.values():
        return cfg, record
    cfg = copy.deepcopy(cfg)
    stored = resume["hyper_parameters"]["config"] if resume else None
    device = accelerator_device(cfg.trainer.accelerator)
    batch = train.gather(torch.arange(min(cfg.data.batch_size, len(train))))
    for group, value in values.items():
        if value != "auto":
            continue
        if stored is not None:
            record[group] = stored[group]["precision"]
        else:
            with torch.random.fork_rng(devices=[]):
                model = build("model", to_plain(cfg.model), dim=train.store.dim).to(device)
                target = batch["target"].to(device) if group == "trainer" else None
                record[group], record[f"{group}_measured"] = resolve_precision(
                    f"{group}.precision", value, model, batch["context"].to(device), target, cfg.eval.precision_auto
                )
        cfg[group].precision = record[group]
    return cfg, record


def with_checkpoint_model(cfg: DictConfig, ckpt: tuple[str, dict[str, Any]]) -> DictConfig:
    """The config with the checkpoint's model settings (`ckpt_model=true`: a recovery under other
    loss settings resumes the model it has, whatever this config's model group says)."""
    theirs, ours = ckpt[1]["hyper_parameters"]["config"]["model"], to_plain(cfg.model)
    out = cfg.copy()
    out.model = theirs
    if theirs != ours:
        log.info(
            "ckpt_model=true: the model settings of %s replace this config's (%s)",
            ckpt[0],
            ", ".join(f"model.{k}={v}" for k, v in theirs.items() if ours.get(k) != v),
        )
    validate(out)
    return out


def check_compatible(ckpt: tuple[str, dict[str, Any]], cfg: DictConfig, dim: int) -> None:
    """The checkpoint's model must be the one this config builds on this data."""
    path, hp = ckpt[0], ckpt[1]["hyper_parameters"]
    check_dim(path, hp, dim)
    theirs, ours = hp["config"]["model"], to_plain(cfg)["model"]
    diff = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k) and k not in ("dropout",))
    if diff:
        raise LvmError(
            f"checkpoint {path}: model settings differ from this config: "
            + ", ".join(f"model.{k}={theirs.get(k)} in the checkpoint vs {ours.get(k)}" for k in diff)
        )


def run(
    cfg: DictConfig,
    run_dir: str | Path,
    choices: dict[str, str] | None = None,
    extra_callbacks: Sequence[L.Callback] = (),
    jobs: int = 1,
) -> dict[str, Any]:
    """Train one run into `run_dir`; returns the results written to results.json (with `status`).

    Bad input raises LvmError before anything is written (RunDirTaken: the directory is another
    run's, held by its lock or already there); a failure after the start is recorded in
    results.json (`failed: <error>`, with the traceback) and raised as RunFailed. `jobs`: runs side
    by side on this machine (threads=auto divides the CPUs among them)."""
    validate(cfg)
    hold = rank_zero_only.rank == 0  # the rank from the environment
    with RunLock(Path(run_dir), hold=hold), RunLog(Path(run_dir)) as run_log:
        return train_run(cfg, Path(run_dir), choices, extra_callbacks, jobs, run_log)


def train_run(
    cfg: DictConfig, run_dir: Path, choices: dict[str, str] | None, extra_callbacks: Sequence[L.Callback], jobs: int, run_log: RunLog
) -> dict[str, Any]:
    """`run`, holding the directory's lock."""
    start = time.perf_counter()
    launched = cfg
    ckpt = resolve_checkpoint(cfg.ckpt_path, run_dir)
    if ckpt and cfg.ckpt_model:
        cfg = with_checkpoint_model(cfg, ckpt)
    is_zero = rank_zero_only.rank == 0  # the rank from the environment (DDP children, SLURM tasks)
    if is_zero:  # the other ranks start once rank 0 has claimed the directory
        claim_run_dir(
            run_dir, ckpt[0] if ckpt else None, bool(cfg.overwrite) or (ckpt is None and cfg.ckpt_path == "auto" and start_over(run_dir))
        )
    run_log.own(launched if is_zero else None, rank_zero_only.rank)
    set_threads(cfg.threads, jobs)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    splits = build_data(cfg)
    if ckpt:
        check_compatible(ckpt, cfg, splits["train"].store.dim)
    cfg, precision = with_precision(cfg, splits["train"], ckpt[1] if ckpt else None)
    slot_weights = fit_slot_linear(splits["train"], cfg.data.eval_batch_size)
    baselines = {
        "slot_weights": [round(w, 6) for w in slot_weights.tolist()],
        **baseline_cosines({s: splits[s] for s in ("val", "ood")}, slot_weights, cfg.data.eval_batch_size),
    }
    log.info(
        "Baselines, val cos: %s; slot-linear weights (oldest to newest) %s",
        ", ".join(f"{k} {v:.4f}" for k, v in baselines.get("val", {}).items()),
        ", ".join(f"{w:.3f}" for w in baselines["slot_weights"]),
    )
    if is_zero:
        atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(to_plain(cfg)))
    try:
        with StopSignals() as signals:
            fit = build_fit(
                cfg,
                splits,
                run_dir,
                choices,
                extra_callbacks=extra_callbacks,
                signals=signals,
                resume=ckpt[1] if ckpt else None,
                slot_weights=slot_weights,
            )
            trainer = fit.trainer
            try:
                trainer.fit(fit.module, datamodule=fit.data, ckpt_path=ckpt[0] if ckpt else None)
                status = ending(fit, extra_callbacks)
            except (Preempted, SIGTERMException) as e:
                # Ctrl-C (SIGINT) is the user's stop, not a scheduler's: `interrupted` (exit 130).
                status = "interrupted" if getattr(e, "signal_name", None) == "SIGINT" else "preempted"
                log.warning("Run %s (%s): resume with ckpt_path=last", status, e)
        results = {**summarize_run(cfg, fit, run_dir, status), "baselines": baselines}
        results["precision"] = precision
        if ckpt:  # where a resumed run picked up (a killed run's lost steps are the difference)
            results["resumed_from"] = {"checkpoint": ckpt[0], "epoch": ckpt[1].get("epoch"), "step": ckpt[1].get("global_step")}
        if trainer.is_global_zero and status not in ("preempted", "interrupted") and cfg.eval.after_fit:
            # Full 5CAT of the best-by-val-cosine and the last checkpoint, with their epochs.
            try:
                results["5cat"] = evaluate_after_fit(
                    cfg, splits, {"best": results["best_checkpoint"], "last": results["last_checkpoint"]}, run_dir, slot_weights
                )
            except KeyboardInterrupt:
                # The fit's records and checkpoints stand; resuming a completed fit from last.ckpt
                # trains no further and runs the 5CAT.
                results["fit_status"], results["status"] = status, "interrupted"
                log.warning(
                    "Run interrupted in the post-fit 5CAT (the fit had ended: %s): evaluate its checkpoints with "
                    "python -m lvm.evaluate ckpt=<path>%s",
                    status,
                    ", or resume with ckpt_path=last to run it" if status == "completed" else "",
                )
    except Exception as e:
        if isinstance(e, CollapsedStart):
            # The guard refused the starting weights before the first step: bad input (exit 2),
            # which leaves no record. Outside a resume of its own directory every run output
            # there is this attempt's (claim_run_dir).
            if is_zero and not (ckpt and Path(ckpt[0]).resolve().is_relative_to(run_dir.resolve())):
                clear_run_outputs(run_dir)
            raise
        error = str(e) if isinstance(e, LvmError) else f"{type(e).__name__}: {e}"
        if is_zero:
            write_failure(run_dir, cfg.name, error, time.perf_counter() - start, traceback.format_exc())
        raise RunFailed(error) from e
    results["wall_time_s"] = round(time.perf_counter() - start, 2)
    results["verdict"] = run_verdict(results, run_dir)
    if trainer.is_global_zero:
        write_results(run_dir, results)
        log.info("Run %s in %s", results["status"], run_dir)
        for line in verdict_lines(results["verdict"]):
            log.info(line)
        for warning in results["verdict"]["warnings"]:
            log.warning(warning)
    return results


def run_verdict(results: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """How the run's best and last models compare with the val baselines (lvm/evaluation/verdict.py)."""
    rows = read_jsonl(run_dir / "metrics.jsonl")
    last_epoch = results["epochs_completed"] - 1 if results["epochs_completed"] else None
    best = {
        "epoch": best_epoch(rows, results["best_val_cos"]),
        "val_cos": results["best_val_cos"],
        "checkpoint": results["best_checkpoint"],
    }
    last = {"epoch": last_epoch, "val_cos": results["final"].get("val/cos"), "checkpoint": results["last_checkpoint"]}
    return verdict(best, last, results["baselines"].get("val", {}))


def ending(fit: Fit, extra_callbacks: Sequence[L.Callback]) -> str:
    """The status of a fit that returned: stopped by the guard (max_rollbacks, no good checkpoint), stopped by a
    callback the caller added that says why (`stop_reason`, e.g. a search's pruning), or completed."""
    guard = fit.callbacks.guard
    if guard is not None and guard.stopped:
        return f"stopped: {guard.stopped}"
    reason = next((c.stop_reason for c in extra_callbacks if getattr(c, "stop_reason", None)), None)
    return f"stopped: {reason}" if reason else "completed"


def guard_record(cfg: DictConfig, fit: Fit, run_dir: Path) -> dict[str, Any]:
    """The guard's record in results.json: its policy, events.jsonl summed up (rollbacks, stops,
    trips by detector), the batches whose directional term the skip rule zeroed and the updates
    the spike check dropped."""
    skip, spike = fit.callbacks.skip_report, fit.callbacks.spike
    return {
        "policy": guard_policy(cfg.guard),
        **summarize_events(read_events(run_dir / "events.jsonl")),
        "skipped_batches": skip.state_dict()["skips_total"] if skip is not None else 0,
        "dropped_updates": spike.dropped_total() if spike is not None else 0,
    }


def summarize_run(cfg: DictConfig, fit: Fit, run_dir: Path, status: str) -> dict[str, Any]:
    """What results.json says of a finished, stopped or preempted fit."""
    trainer = fit.trainer
    best = trainer.checkpoint_callback
    last = fit.callbacks.resume.last_path
    kinds = ("val/", "ood/", "mini5cat/")
    final = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(kinds)}
    if not final:  # a resumed run that validated nothing yet: its last epoch's row says them
        final = {k: v for k, v in (read_jsonl(run_dir / "metrics.jsonl") or [{}])[-1].items() if k.startswith(kinds)}
    results = {
        "name": cfg.name,
        "status": status,
        "run_dir": str(run_dir),
        # Epochs that reached their end (a run preempted at an epoch's end counts that epoch, which
        # Lightning's current_epoch does not yet).
        "epochs_completed": trainer.fit_loop.epoch_progress.current.processed,
        "global_step": trainer.global_step,
        "world_size": trainer.world_size,
        "best_checkpoint": best.best_model_path or None,
        "best_val_cos": float(best.best_model_score) if best.best_model_score is not None else None,
        "last_checkpoint": str(last) if last.is_file() else None,
        "final": final,
        "params": sum(p.numel() for p in fit.module.parameters()),
        "guard": guard_record(cfg, fit, run_dir),
    }
    if trainer.world_size > 1:  # every rank says what it saw: their validation metrics must agree
        log.info(
            "Rank %d of %d finished: best val cos %r, final val cos %r",
            trainer.global_rank,
            trainer.world_size,
            results["best_val_cos"],
            results["final"].get("val/cos"),
        )
    return results
