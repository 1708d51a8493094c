"""Building a run from its config: data, loaders, callbacks, trainer and module."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import DictConfig

from callbacks import (
    SPIKE_STATS,
    ExactResume,
    RampSchedule,
    RollbackGuard,
    ShareCPUs,
    SkipReport,
    SpikeCheck,
    StepStatistics,
    TensorBoardDashboard,
)
from lvm.data.loaders import load_splits
from lvm.data.sampler import EpochSampler
from lvm.data.store import Windows, WindowSpec
from lvm.evaluation.baselines import fit_slot_linear
from lvm.guard.events import guard_policy
from lvm.model.module import STEP_STATS, LVMModule, accelerator_device
from lvm.runtime.checkpoints import AtomicCheckpointIO
from lvm.runtime.objects import build, to_plain
from lvm.runtime.signals import StopSignals
from lvm.runtime.threads import CPUShare, usable_cpus
from lvm.training.data import WindowData, keeps_data_on_device

log = logging.getLogger(__name__)


def build_data(cfg: DictConfig) -> dict[str, Windows]:
    """Windows of train / val / ood, all views of one article store."""
    return load_splits(to_plain(cfg.data), WindowSpec(**cfg.window))


@dataclass
class RunCallbacks:
    """A run's own callbacks in trainer order, and those the run reads when the fit ends."""

    all: list[L.Callback]
    spike: SpikeCheck | None
    guard: RollbackGuard | None
    skip_report: SkipReport | None
    resume: ExactResume


@dataclass
class Fit:
    """What `build_fit` builds: the trainer, the module, their data and the run's own callbacks
    (None for a fit without them, the benchmark's bare loop)."""

    trainer: L.Trainer
    module: LVMModule
    data: WindowData
    callbacks: RunCallbacks | None


def build_callbacks(
    cfg: DictConfig,
    splits: dict[str, Windows],
    run_dir: Path,
    hparams: dict[str, Any],
    sampler: EpochSampler,
    signals: StopSignals | None,
    slot_weights: torch.Tensor,
) -> RunCallbacks:
    cb, g = cfg.callbacks, cfg.guard
    ckpt_dir = run_dir / "checkpoints"
    schedule: RampSchedule = build("ramp", cfg.ramp)
    # The spike check clips too, with the gradient norm it computes anyway (one norm per step, not two).
    spike = build("guard.spike", g.get("spike"), clip=clip_by_norm(cfg))
    fault = None
    if cfg.get("fault") is not None:
        constant = splits["train"].store.vectors.mean(dim=0) if cfg.fault.constant_from_step is not None else None
        fault = build("fault", cfg.fault, constant=constant, ckpt_dir=ckpt_dir)
    guard = build(
        "guard.rollback",
        g.rollback,
        run_dir=run_dir,
        schedule=schedule,
        listeners=[c for c in (spike, fault) if c is not None],
        mini5cat=cb.mini5cat is not None,
        windows=splits["val"] if len(splits["val"]) else splits["train"],  # what it probes weights on
    )
    # The statistics hand each flushed window to the guard, which decides inside their hook.
    stats = StepStatistics(STEP_STATS, cfg.logger.flush_every, [guard] if guard else [], [(SPIKE_STATS, spike.stats)] if spike else [])
    out: list[L.Callback] = [schedule, stats, *([spike] if spike else [])]
    skip_report = SkipReport(STEP_STATS, cfg.logger.print_every) if g.skip_rule is not None else None
    if skip_report is not None:
        out.append(skip_report)
    out += [c for c in (guard, fault) if c is not None]
    if cb.mini5cat is not None:
        out.append(build("callbacks.mini5cat", cb.mini5cat, windows=splits["val"], slot_weights=slot_weights))
    # Best by val cosine first: trainer.checkpoint_callback is the first ModelCheckpoint.
    out.append(build("callbacks.best_checkpoint", cb.best_checkpoint, dirpath=ckpt_dir))
    if cb.epoch_checkpoints is not None:
        out.append(build("callbacks.epoch_checkpoints", cb.epoch_checkpoints, dirpath=ckpt_dir))
    out.append(TensorBoardDashboard(hparams, run_dir / "metrics.jsonl"))
    resume = build(
        "callbacks.resume",
        cb.resume,
        sampler=sampler,
        batch_size=cfg.data.batch_size,
        last_path=ckpt_dir / "last.ckpt",
        signals=signals,
        signal_check_every=cfg.logger.flush_every,
    )
    # Its last.ckpt writer, a Checkpoint after the best and epoch ones: Lightning runs checkpoint
    # callbacks last, in this order, so last.ckpt holds every other callback's record of its step.
    out += [resume, resume.writer]
    if cfg.trainer.get("enable_progress_bar", True) and cb.progress_bar is not None:
        out.append(build("callbacks.progress_bar", cb.progress_bar))
    if cfg.threads == "auto" and not cfg.trainer.deterministic:  # a deterministic run keeps its thread count
        out.append(ShareCPUs(CPUShare(limit=usable_cpus())))
    return RunCallbacks(out, spike, guard, skip_report, resume)


def clip_by_norm(cfg: DictConfig) -> float | None:
    """The run's gradient-clipping norm (trainer.gradient_clip_val with the norm algorithm), if any."""
    t = cfg.trainer
    return t.gradient_clip_val if t.get("gradient_clip_val") and t.get("gradient_clip_algorithm", "norm") == "norm" else None


def dashboard_hparams(cfg: DictConfig, choices: dict[str, str]) -> dict[str, Any]:
    """The knobs a sweep varies, flat, for the TensorBoard hparams tab."""
    return {
        "name": cfg.name,
        "ramp": choices.get("ramp", "custom"),
        "guard": guard_policy(cfg.guard),
        "model": choices.get("model", "custom"),
        "loss.enabled": cfg.loss.enabled,
        "loss.mse_on": cfg.loss.mse_on,
        "loss.gamma": cfg.loss.gamma,
        "loss.lambda_min": cfg.loss.lambda_min,
        "loss.lambda_max": cfg.loss.lambda_max,
        "optim.optimizer.lr": cfg.optim.optimizer.lr,
        "data.source": cfg.data.source,
        "window.target_offset": cfg.window.target_offset,
        "seed": cfg.seed,
    }


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
) -> Fit:
    """Trainer, module and loaders of a run (also used by the benchmark, with overrides).
    `resume`: the checkpoint the run resumes from (TensorBoard hides what the killed run logged after it).
    `slot_weights`: the slot-linear baseline's, when the caller has fitted them already."""
    plain = to_plain(cfg)
    module = LVMModule(plain, dim=splits["train"].store.dim)
    d = cfg.data
    store = splits["train"].store
    on_device = keeps_data_on_device(d.on_device, d.device_share, store.vectors.nbytes, accelerator_device(cfg.trainer.accelerator))
    evals = [splits[s] for s in ("val", "ood") if len(splits[s])]
    data = WindowData(
        splits["train"], evals, d.batch_size, d.eval_batch_size, d.shuffle, d.shuffle_block, d.num_workers, cfg.seed, on_device
    )
    logger: TensorBoardLogger | None = None
    if lvm_callbacks:
        purge = first_unlogged_step(resume) if resume else None
        logger = build("logger.tensorboard", cfg.logger.tensorboard, save_dir=str(run_dir), purge_step=purge)
    callbacks = list(extra_callbacks)
    own = None
    if lvm_callbacks:
        if slot_weights is None:
            slot_weights = fit_slot_linear(splits["train"], d.eval_batch_size)
        own = build_callbacks(cfg, splits, run_dir, dashboard_hparams(cfg, choices or {}), data.train.sampler, signals, slot_weights)
        callbacks += own.all
    settings = {**plain["trainer"], **trainer_overrides}
    if own is not None and own.spike is not None and own.spike.clip is not None:
        settings["gradient_clip_val"] = None  # the spike check clips, with the gradient norm it computes anyway
    trainer = build(
        "trainer", settings, callbacks=callbacks, logger=logger or False, default_root_dir=str(run_dir), plugins=[AtomicCheckpointIO()]
    )
    return Fit(trainer, module, data, own)


def first_unlogged_step(ckpt: dict[str, Any]) -> int:
    """The first step whose per-step row a checkpoint has not seen logged (its unflushed rows
    are logged again after the resume)."""
    stats = next((v for k, v in ckpt.get("callbacks", {}).items() if k.startswith("StepStatistics")), {})
    pending = stats.get("steps", [])
    return min(pending, default=int(ckpt["global_step"]))
