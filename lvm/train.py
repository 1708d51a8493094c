"""`python -m lvm.train +experiment=p6b_v2`: compose the config, build data, model and callbacks, fit.

Each run writes into its own Hydra directory and nowhere else: checkpoints/ (best by val cosine,
last, optionally every epoch), tb/ (TensorBoard events), config.yaml (resolved), metrics.jsonl and
results.json. A directory that already holds a run is resumed (ckpt_path) or refused (lvm/rundir.py).

Every ending is written to results.json as `status` and gives the exit code (lvm/cli.py):
completed 0; failed: <error> 1; bad input, configuration or checkpoint (nothing written) 2;
stopped: max_rollbacks 3; preempted (SIGTERM/SIGUSR1: last.ckpt saved, resume with ckpt_path=last) 4.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import sys
import time
import traceback
from pathlib import Path
from collections.abc import Sequence
from typing import Any

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from callbacks import (SPIKE_STATS, DeviceData, ExactResume, FaultInjection, FiniteModelCheckpoint, Mini5CAT, RampSchedule, RollbackGuard,
                       ShareCPUs, SkipReport, SpikeSkip, StepStatistics, TensorBoardDashboard, on_device_of, spike_of)
from lvm.atomic import atomic_write_text
from lvm.baselines import baseline_cosines, fit_slot_linear
from lvm.checkpoints import AtomicCheckpointIO, check_dim, read_checkpoint
from lvm.cli import EXIT_BAD_INPUT, EXIT_FAIL, exit_code_of, run_entry_point, set_exit_code
from lvm.config import to_plain, validate
from lvm.data.loaders import load_splits
from lvm.detectors import summarize_events
from lvm.data.sampler import EpochSampler
from lvm.data.store import WindowIndex, Windows, WindowSpec, collate_batch
from lvm.errors import LvmError, Preempted, RunFailed
from lvm.evaluate import evaluate_after_fit
from lvm.module import STEP_STATS, LVMModule, accelerator_device, model_of
from lvm.precision import check_precision, resolve_precision
from lvm.launchers import launcher_choice, missing_launcher_plugin, own_gpu, resume_on_requeue, sweep_jobs
from lvm.rundir import auto_start_fresh, claim_run_dir, write_failure, write_results
from lvm.sweep import read_events
from lvm.signals import StopSignals
from lvm.threads import ThreadShare, set_threads, usable_cpus

log = logging.getLogger(__name__)

# Longest job directory name a sweep uses as is; longer ones (many overrides) are cut and hashed.
MAX_DIRNAME = 120


def short_dirname(overrides: str) -> str:
    """Sweep job directory name from Hydra's override_dirname, kept under filesystem limits."""
    if len(overrides) <= MAX_DIRNAME:
        return overrides
    return f"{overrides[:MAX_DIRNAME - 9]}_{hashlib.sha1(overrides.encode()).hexdigest()[:8]}"


OmegaConf.register_new_resolver("lvm_dirname", short_dirname, replace=True)


def build_data(cfg: DictConfig) -> dict[str, Windows]:
    """Windows of train / val / ood, all views of one article store."""
    return load_splits(to_plain(cfg.data), WindowSpec(**cfg.window))


def make_loader(windows: Windows, batch_size: int, shuffle: bool, num_workers: int, seed: int, on_device: bool = False) -> DataLoader:
    """Batches of `windows`; shuffled by (seed, epoch) alone when `shuffle` (lvm/data/sampler.py).
    `on_device`: batches of window indices, gathered on the device (callbacks/device_data.py)."""
    return DataLoader(
        WindowIndex(windows) if on_device else windows,
        batch_size=batch_size,
        sampler=EpochSampler(windows, seed) if shuffle else None,
        num_workers=num_workers,
        collate_fn=collate_batch,
        persistent_workers=num_workers > 0,
        # Its own generator: starting an iterator must not draw from the global RNG, or a resumed
        # run's dropout masks would differ from the uninterrupted run's.
        generator=torch.Generator().manual_seed(seed),
    )


def build_callbacks(cfg: DictConfig, splits: dict[str, Windows], run_dir: Path, hparams: dict[str, Any],
                    sampler: EpochSampler, signals: StopSignals | None, slot_weights: torch.Tensor) -> list[L.Callback]:
    cb = cfg.callbacks
    schedule = RampSchedule(OmegaConf.to_container(cfg.ramp.stages, resolve=True), cfg.ramp.epoch_base, cfg.loss.lambda_max)
    g = cfg.guard
    guard = None
    if g.policy == "rollback":
        guard = RollbackGuard(run_dir, OmegaConf.to_container(g.detectors), g.max_rollbacks, g.backoff.hold_epochs,
                              g.backoff.target_frac_scale, g.backoff.lambda_max_scale, g.keep_good, schedule)
    spike = spike_of(OmegaConf.to_container(g, resolve=True), clip_by_norm(cfg))
    # The statistics first: they hand each flushed window to the guard before it decides.
    stats = StepStatistics(STEP_STATS, cfg.logger.flush_every, [guard.on_rows] if guard else [],
                           [(SPIKE_STATS, spike.stats)] if spike else [])
    out: list[L.Callback] = [schedule, stats, *([spike] if spike else [])]
    if g.policy in ("skip", "rollback"):
        out.append(SkipReport(STEP_STATS, cfg.logger.print_every))
    if guard is not None:
        out.append(guard)
    fi = OmegaConf.to_container(cb.fault_injection)
    if any(v not in (None, []) for k, v in fi.items() if not k.endswith("_factor")):
        constant = splits["train"].store.vectors.mean(dim=0) if fi["constant_from_step"] is not None else None
        out.append(FaultInjection(**fi, constant=constant))
    if cb.mini5cat.enabled:
        out.append(Mini5CAT(splits["val"], cb.mini5cat.windows, cb.mini5cat.seed, cfg.window.prev_slot, cfg.data.eval_batch_size,
                            slot_weights, cfg.eval.precision))
    ckpt_dir = run_dir / "checkpoints"
    # Best by val cosine first: trainer.checkpoint_callback is the first ModelCheckpoint.
    out.append(FiniteModelCheckpoint(dirpath=ckpt_dir, filename="best-epoch{epoch:02d}", monitor="val/cos", mode="max",
                                     save_top_k=1, auto_insert_metric_name=False))
    if cb.checkpoint.every_epoch:
        out.append(FiniteModelCheckpoint(dirpath=ckpt_dir, filename="epoch{epoch:02d}", monitor="epoch", mode="max",
                                         save_top_k=-1, auto_insert_metric_name=False))
    out.append(TensorBoardDashboard(hparams, run_dir / "metrics.jsonl"))
    # After the guard and the dashboard: last.ckpt holds their decisions and rows of its step.
    out.append(ExactResume(sampler, cfg.data.batch_size, ckpt_dir / "last.ckpt", cb.checkpoint.every_n_steps,
                           cb.checkpoint.every_minutes, signals, signal_check_every=cfg.logger.flush_every))
    if cfg.trainer.get("enable_progress_bar", True):
        out.append(TQDMProgressBar(refresh_rate=cb.progress_refresh_rate))
    if cfg.threads == "auto" and not cfg.trainer.deterministic:  # a deterministic run keeps its thread count
        out.append(ShareCPUs(ThreadShare(limit=usable_cpus())))
    return out


def clip_by_norm(cfg: DictConfig) -> float | None:
    """The run's gradient-clipping norm (trainer.gradient_clip_val with the norm algorithm), if any."""
    t = cfg.trainer
    return t.gradient_clip_val if t.get("gradient_clip_val") and t.get("gradient_clip_algorithm", "norm") == "norm" else None


def dashboard_hparams(cfg: DictConfig, choices: dict[str, str]) -> dict[str, Any]:
    """The knobs a sweep varies, flat, for the TensorBoard hparams tab."""
    return {
        "name": cfg.name,
        "ramp": choices.get("ramp", "custom"),
        "guard": cfg.guard.policy,
        "model": choices.get("model", "custom"),
        "loss.enabled": cfg.loss.enabled,
        "loss.mse_on": cfg.loss.mse_on,
        "loss.gamma": cfg.loss.gamma,
        "loss.lambda_min": cfg.loss.lambda_min,
        "loss.lambda_max": cfg.loss.lambda_max,
        "optim.lr": cfg.optim.lr,
        "data.source": cfg.data.source,
        "window.target_offset": cfg.window.target_offset,
        "seed": cfg.seed,
    }


def resolve_checkpoint(ckpt_path: str | None, run_dir: Path) -> tuple[str, dict[str, Any]] | None:
    """Checkpoint to resume from (path, contents), checked to load under torch's default
    weights_only rules.

    `last`: <run dir>/checkpoints/last.ckpt, which must exist. `auto`: the same file when it exists,
    else a fresh start (what a requeued SLURM job needs: the default under a submitit launcher)."""
    if not ckpt_path:
        return None
    own = ckpt_path in ("last", "auto")
    path = run_dir / "checkpoints" / "last.ckpt" if own else Path(ckpt_path)
    if own and not path.is_file():
        if ckpt_path == "auto":
            log.info("ckpt_path=auto: no %s yet, starting fresh", path)
            return None
        raise LvmError(f"checkpoint {path}: no such file (ckpt_path=last looks in this run's own directory; "
                       "set hydra.run.dir to the earlier run's, or use ckpt_path=auto to start fresh when it is missing)")
    ckpt = read_checkpoint(path)
    if ckpt_path == "auto":
        log.info("ckpt_path=auto: resuming from %s (epoch %s, step %s)", path, ckpt.get("epoch"), ckpt.get("global_step"))
    return str(path), ckpt


def with_precision(cfg: DictConfig, train: Windows, resume: dict[str, Any] | None) -> tuple[DictConfig, dict[str, Any]]:
    """The config with trainer.precision and eval.precision resolved (lvm/precision.py) and what
    was measured. `auto` measures on the run's first training batch with a fresh model (on its own
    RNG stream: the run's weights and dropout masks do not depend on the measurement); a resumed
    run keeps the precision its checkpoint was trained at."""
    values = {"trainer": check_precision("trainer.precision", cfg.trainer.precision),
              "eval": check_precision("eval.precision", cfg.eval.precision)}
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
                model = model_of(to_plain(cfg), train.store.dim).to(device)
                target = batch["target"].to(device) if group == "trainer" else None
                record[group], record[f"{group}_measured"] = resolve_precision(
                    f"{group}.precision", value, model, batch["context"].to(device), target, cfg.eval.precision_auto)
        cfg[group].precision = record[group]
    return cfg, record


def with_checkpoint_model(cfg: DictConfig, ckpt: tuple[str, dict[str, Any]]) -> DictConfig:
    """The config with the checkpoint's model settings (`ckpt_model=true`: a recovery under other
    loss settings resumes the model it has, whatever this config's model group says)."""
    theirs, ours = ckpt[1]["hyper_parameters"]["config"]["model"], to_plain(cfg.model)
    out = cfg.copy()
    out.model = theirs
    if theirs != ours:
        log.info("ckpt_model=true: the model settings of %s replace this config's (%s)", ckpt[0],
                 ", ".join(f"model.{k}={v}" for k, v in theirs.items() if ours.get(k) != v))
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


def build_fit(
    cfg: DictConfig,
    splits: dict[str, Windows],
    run_dir: Path,
    choices: dict[str, str] | None = None,
    lvm_callbacks: bool = True,
    extra_callbacks: Sequence[L.Callback] = (),
    signals: StopSignals | None = None,
    resume: dict[str, Any] | None = None,
    slot_weights: torch.Tensor | None = None,
    **trainer_overrides: Any,
) -> tuple[L.Trainer, LVMModule, DataLoader, list[DataLoader]]:
    """Trainer, module and loaders of a run (also used by the benchmark, with overrides).
    `resume`: the checkpoint the run resumes from (TensorBoard hides what the killed run logged after it).
    `slot_weights`: the slot-linear baseline's, when the caller has fitted them already."""
    plain = to_plain(cfg)
    module = LVMModule(plain, dim=splits["train"].store.dim)
    d = cfg.data
    store = splits["train"].store
    on_device = on_device_of(d.on_device, d.device_share, store.vectors.nbytes, accelerator_device(cfg.trainer.accelerator))
    evals = [splits[s] for s in ("val", "ood") if len(splits[s])]
    train_loader = make_loader(splits["train"], d.batch_size, True, d.num_workers, cfg.seed, on_device)
    val_loaders = [make_loader(w, d.eval_batch_size, False, d.num_workers, cfg.seed, on_device) for w in evals]
    logger: TensorBoardLogger | bool = False
    if lvm_callbacks and cfg.logger.tensorboard:
        purge = {"purge_step": first_unlogged_step(resume)} if resume else {}
        logger = TensorBoardLogger(save_dir=str(run_dir), name="tb", version="", default_hp_metric=False, **purge)
    # The device gather first: every other callback's batch hooks read the gathered batch.
    callbacks = [*([DeviceData(splits["train"], evals)] if on_device else []), *extra_callbacks]
    if lvm_callbacks:
        if slot_weights is None:
            slot_weights = fit_slot_linear(splits["train"], d.eval_batch_size)
        callbacks += build_callbacks(cfg, splits, run_dir, dashboard_hparams(cfg, choices or {}), train_loader.sampler, signals,
                                     slot_weights)
    settings = {**plain["trainer"], **trainer_overrides}
    if any(isinstance(c, SpikeSkip) and c.clip is not None for c in callbacks):
        settings["gradient_clip_val"] = None  # the spike check clips, with the gradient norm it computes anyway
    trainer = L.Trainer(**settings, callbacks=callbacks, logger=logger,
                        default_root_dir=str(run_dir), plugins=[AtomicCheckpointIO()])
    return trainer, module, train_loader, val_loaders


def first_unlogged_step(ckpt: dict[str, Any]) -> int:
    """The first step whose per-step row a checkpoint has not seen logged (its unflushed rows
    are logged again after the resume)."""
    stats = next((v for k, v in ckpt.get("callbacks", {}).items() if k.startswith("StepStatistics")), {})
    pending = stats.get("steps", [])
    return min(pending, default=int(ckpt["global_step"]))


def run(
    cfg: DictConfig,
    run_dir: str | Path,
    choices: dict[str, str] | None = None,
    extra_callbacks: Sequence[L.Callback] = (),
    jobs: int = 1,
) -> dict[str, Any]:
    """Train one run into `run_dir`; returns the results written to results.json (with `status`).

    Bad input raises LvmError before anything is written; a failure after the start is recorded
    in results.json (`failed: <error>`, with the traceback) and raised as RunFailed. `jobs`: runs side by side on this
    machine (threads=auto divides the CPUs among them)."""
    start = time.perf_counter()
    validate(cfg)
    run_dir = Path(run_dir)
    set_threads(cfg.threads, jobs)
    ckpt = resolve_checkpoint(cfg.ckpt_path, run_dir)
    if ckpt and cfg.ckpt_model:
        cfg = with_checkpoint_model(cfg, ckpt)
    is_zero = rank_zero_only.rank == 0  # the rank from the environment (DDP children, SLURM tasks)
    if is_zero:  # the other ranks start once rank 0 has claimed the directory
        claim_run_dir(run_dir, ckpt[0] if ckpt else None, bool(cfg.overwrite) or (ckpt is None and auto_start_fresh(cfg, run_dir)))
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    splits = build_data(cfg)
    if ckpt:
        check_compatible(ckpt, cfg, splits["train"].store.dim)
    cfg, precision = with_precision(cfg, splits["train"], ckpt[1] if ckpt else None)
    slot_weights = fit_slot_linear(splits["train"], cfg.data.eval_batch_size)
    baselines = {"slot_weights": [round(w, 6) for w in slot_weights.tolist()],
                 **baseline_cosines({s: splits[s] for s in ("val", "ood")}, slot_weights, cfg.data.eval_batch_size)}
    log.info("Baselines, val cos: %s; slot-linear weights (oldest to newest) %s", ", ".join(
        f"{k} {v:.4f}" for k, v in baselines.get("val", {}).items()), ", ".join(f"{w:.3f}" for w in baselines["slot_weights"]))
    run_dir.mkdir(parents=True, exist_ok=True)
    if is_zero:
        atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(to_plain(cfg)))
    try:
        with StopSignals() as signals:
            trainer, module, train_loader, val_loaders = build_fit(
                cfg, splits, run_dir, choices, extra_callbacks=extra_callbacks, signals=signals,
                resume=ckpt[1] if ckpt else None, slot_weights=slot_weights)
            try:
                trainer.fit(module, train_loader, val_loaders, ckpt_path=ckpt[0] if ckpt else None)
                status = ending(trainer)
            except (Preempted, SIGTERMException) as e:
                status = "preempted"
                log.warning("Run preempted (%s): resume with ckpt_path=last", e)
        results = {**summarize_run(cfg, trainer, module, run_dir, status), "baselines": baselines}
        results["precision"] = precision
        if ckpt:  # where a resumed run picked up (a killed run's lost steps are the difference)
            results["resumed_from"] = {"checkpoint": ckpt[0], "epoch": ckpt[1].get("epoch"), "step": ckpt[1].get("global_step")}
        if trainer.is_global_zero and status != "preempted" and cfg.eval.after_fit:
            # Full 5CAT of the best-by-val-cosine and the last checkpoint, with their epochs.
            results["5cat"] = evaluate_after_fit(cfg, splits, {"best": results["best_checkpoint"], "last": results["last_checkpoint"]}, run_dir,
                                              slot_weights)
    except Exception as e:
        error = str(e) if isinstance(e, LvmError) else f"{type(e).__name__}: {e}"
        if is_zero:
            write_failure(run_dir, cfg.name, error, time.perf_counter() - start, traceback.format_exc())
        raise RunFailed(error) from e
    results["wall_time_s"] = round(time.perf_counter() - start, 2)
    if trainer.is_global_zero:
        write_results(run_dir, results)
        log.info("Run %s: best val cos %s at %s", results["status"], results["best_val_cos"], results["best_checkpoint"])
    return results


def ending(trainer: L.Trainer) -> str:
    """The status of a fit that returned: stopped by the guard (max_rollbacks), stopped by a
    callback that says why (`stop_reason`, e.g. a search's pruning), or completed."""
    guard = next((c for c in trainer.callbacks if isinstance(c, RollbackGuard)), None)
    if guard is not None and guard.stopped:
        return "stopped: max_rollbacks"
    reason = next((c.stop_reason for c in trainer.callbacks if getattr(c, "stop_reason", None)), None)
    return f"stopped: {reason}" if reason else "completed"


def guard_record(cfg: DictConfig, trainer: L.Trainer, run_dir: Path) -> dict[str, Any]:
    """The guard's record in results.json: its policy, events.jsonl summed up (rollbacks, stops,
    trips by detector) and the batches whose directional term the skip rule zeroed."""
    skip = next((c for c in trainer.callbacks if isinstance(c, SkipReport)), None)
    return {"policy": cfg.guard.policy, **summarize_events(read_events(run_dir / "events.jsonl")),
            "skipped_batches": skip.state_dict()["skips_total"] if skip is not None else 0}


def summarize_run(cfg: DictConfig, trainer: L.Trainer, module: LVMModule, run_dir: Path, status: str) -> dict[str, Any]:
    """What results.json says of a finished, stopped or preempted fit."""
    best = trainer.checkpoint_callback
    last = next(c for c in trainer.callbacks if isinstance(c, ExactResume)).last_path
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
        "final": {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("val/", "ood/", "mini5cat/"))},
        "params": sum(p.numel() for p in module.parameters()),
        "guard": guard_record(cfg, trainer, run_dir),
    }
    if trainer.world_size > 1:  # every rank says what it saw: their validation metrics must agree
        log.info("Rank %d of %d finished: best val cos %r, final val cos %r", trainer.global_rank, trainer.world_size,
                 results["best_val_cos"], results["final"].get("val/cos"))
    return results


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Returns the best val cosine (what a Hydra sweeper optimises); the exit code follows the
    run's status (see the module docstring)."""
    hc = HydraConfig.get()
    if hc.mode == RunMode.MULTIRUN:
        return run_sweep_job(cfg, hc)
    try:
        results = run(cfg, hc.runtime.output_dir, dict(hc.runtime.choices))
    except LvmError as e:
        print(f"lvm.train: {e}", file=sys.stderr)
        set_exit_code(EXIT_BAD_INPUT)
        return None
    except RunFailed as e:
        print(f"lvm.train: run failed: {e} (traceback in {hc.runtime.output_dir}/results.json)", file=sys.stderr)
        set_exit_code(EXIT_FAIL)
        return None
    set_exit_code(exit_code_of(results["status"]))
    return results["best_val_cos"]


def run_sweep_job(cfg: DictConfig, hc: Any) -> float | None:
    """One multirun job: a failure is logged and recorded in results.json, and the sweep goes on."""
    start = time.perf_counter()
    resume_on_requeue(cfg, hc)
    try:
        with own_gpu(cfg, hc):
            return run(cfg, hc.runtime.output_dir, dict(hc.runtime.choices), jobs=sweep_jobs(hc))["best_val_cos"]
    except RunFailed as e:  # run() has written results.json
        log.error("Job %s failed: %s", hc.job.num, e)
    except LvmError as e:  # refused at start: record it in the job's own directory
        log.error("Job %s failed: %s", hc.job.num, e)
        write_failure(Path(hc.runtime.output_dir), cfg.name, str(e), time.perf_counter() - start)
    return None


def cli() -> None:
    """`python -m lvm.train`: a missing launcher plugin is named with its pip extra before Hydra starts."""
    problem = missing_launcher_plugin(launcher_choice(sys.argv[1:]))
    if problem:
        print(f"lvm.train: {problem}", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT)
    run_entry_point(main)


if __name__ == "__main__":
    cli()
