"""`python -m lvm.train +experiment=p6b_v2`: compose the config, build data, model and callbacks, fit.

Each run writes into its own Hydra directory: checkpoints/ (best by val cosine, last, optionally
every epoch), tb/ (TensorBoard events), config.yaml (resolved), metrics.jsonl and results.json.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import sys
import time
from pathlib import Path
from collections.abc import Iterator, Sequence
from typing import Any

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from callbacks import FaultInjection, Mini5CAT, RampSchedule, RollbackGuard, SkipGuard, TensorBoardDashboard
from lvm.checkpoints import check_dim, read_checkpoint
from lvm.config import to_plain, validate
from lvm.data.loaders import load_splits
from lvm.data.store import ShuffleSampler, Windows, WindowSpec, collate_batch
from lvm.errors import LvmError
from lvm.evaluate import evaluate_after_fit
from lvm.module import LVMModule
from lvm.launchers import JOBLIB_LAUNCHER, SUBMITIT_PREFIX, claim_gpu, launcher_choice, missing_launcher_plugin, wants_one_gpu

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


def make_loader(windows: Windows, batch_size: int, shuffle: bool, num_workers: int, seed: int) -> DataLoader:
    sampler = ShuffleSampler(windows, generator=torch.Generator().manual_seed(seed)) if shuffle else None
    return DataLoader(
        windows,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_batch,
        persistent_workers=num_workers > 0,
    )


def build_callbacks(cfg: DictConfig, splits: dict[str, Windows], run_dir: Path, hparams: dict[str, Any]) -> list[L.Callback]:
    cb = cfg.callbacks
    out: list[L.Callback] = []
    if cb.ramp:
        out.append(RampSchedule(OmegaConf.to_container(cfg.ramp.stages, resolve=True), cfg.ramp.epoch_base))
    g = cfg.guard
    if g.policy in ("skip", "rollback"):
        out.append(SkipGuard(g.pos_below, g.neg_below, cfg.logger.print_every))
    if g.policy == "rollback":
        out.append(RollbackGuard(run_dir, OmegaConf.to_container(g.detectors), g.max_rollbacks, g.backoff.hold_epochs,
                                 g.backoff.target_frac_scale, g.backoff.lambda_max_scale, g.keep_good))
    if cb.fault_injection.nan_at_steps:
        out.append(FaultInjection(cb.fault_injection.nan_at_steps))
    if cb.mini5cat.enabled:
        out.append(Mini5CAT(splits["val"], cb.mini5cat.windows, cb.mini5cat.seed, cfg.window.prev_slot, cfg.data.eval_batch_size))
    ckpt_dir = run_dir / "checkpoints"
    # Best by val cosine first: trainer.checkpoint_callback is the first ModelCheckpoint.
    out.append(ModelCheckpoint(dirpath=ckpt_dir, filename="best-epoch{epoch:02d}", monitor="val/cos", mode="max",
                               save_top_k=1, auto_insert_metric_name=False))
    # last.ckpt by its own checkpointer: Lightning's save_last only refreshes it in epochs that
    # also saved a new best, which would resume from a stale epoch.
    out.append(ModelCheckpoint(dirpath=ckpt_dir, filename="last", monitor=None, save_top_k=1, enable_version_counter=False))
    if cb.checkpoint.every_epoch:
        out.append(ModelCheckpoint(dirpath=ckpt_dir, filename="epoch{epoch:02d}", monitor="epoch", mode="max",
                                   save_top_k=-1, auto_insert_metric_name=False))
    out.append(TensorBoardDashboard(hparams, run_dir / "metrics.jsonl"))
    if cfg.trainer.get("enable_progress_bar", True):
        out.append(TQDMProgressBar(refresh_rate=cb.progress_refresh_rate))
    return out


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
    """Checkpoint to resume from and its hyper-parameters, checked to load under torch's default
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
    return str(path), ckpt["hyper_parameters"]


def check_compatible(ckpt: tuple[str, dict[str, Any]], cfg: DictConfig, dim: int) -> None:
    """The checkpoint's model must be the one this config builds on this data."""
    path, hp = ckpt
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
    **trainer_overrides: Any,
) -> tuple[L.Trainer, LVMModule, DataLoader, list[DataLoader]]:
    """Trainer, module and loaders of a run (also used by the benchmark, with overrides)."""
    plain = to_plain(cfg)
    module = LVMModule(plain, dim=splits["train"].store.dim)
    d = cfg.data
    train_loader = make_loader(splits["train"], d.batch_size, True, d.num_workers, cfg.seed)
    val_loaders = [make_loader(splits[s], d.eval_batch_size, False, d.num_workers, cfg.seed) for s in ("val", "ood") if len(splits[s])]
    logger: TensorBoardLogger | bool = False
    if lvm_callbacks and cfg.logger.tensorboard:
        logger = TensorBoardLogger(save_dir=str(run_dir), name="tb", version="", default_hp_metric=False)
    callbacks = [*extra_callbacks]
    if lvm_callbacks:
        callbacks += build_callbacks(cfg, splits, run_dir, dashboard_hparams(cfg, choices or {}))
    trainer = L.Trainer(**{**plain["trainer"], **trainer_overrides}, callbacks=callbacks, logger=logger, default_root_dir=str(run_dir))
    return trainer, module, train_loader, val_loaders


def run(
    cfg: DictConfig,
    run_dir: str | Path,
    choices: dict[str, str] | None = None,
    extra_callbacks: Sequence[L.Callback] = (),
) -> dict[str, Any]:
    """Train one run into `run_dir`; returns the results written to results.json."""
    start = time.perf_counter()
    validate(cfg)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if rank_zero_only.rank == 0:  # the rank from the environment (DDP children, SLURM tasks)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(to_plain(cfg)))
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    ckpt = resolve_checkpoint(cfg.ckpt_path, run_dir)
    splits = build_data(cfg)
    if ckpt:
        check_compatible(ckpt, cfg, splits["train"].store.dim)
    trainer, module, train_loader, val_loaders = build_fit(cfg, splits, run_dir, choices, extra_callbacks=extra_callbacks)
    trainer.fit(module, train_loader, val_loaders, ckpt_path=ckpt[0] if ckpt else None)

    best, last = (c for c in trainer.callbacks if isinstance(c, ModelCheckpoint) and c.monitor in ("val/cos", None))
    results = {
        "name": cfg.name,
        "run_dir": str(run_dir),
        "epochs_completed": trainer.current_epoch,
        "global_step": trainer.global_step,
        "world_size": trainer.world_size,
        "best_checkpoint": best.best_model_path,
        "best_val_cos": float(best.best_model_score) if best.best_model_score is not None else None,
        "last_checkpoint": last.best_model_path,
        "final": {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("val/", "ood/", "mini5cat/"))},
        "params": sum(p.numel() for p in module.parameters()),
    }
    if trainer.world_size > 1:  # every rank says what it saw: their validation metrics must agree
        log.info("Rank %d of %d finished: best val cos %r, final val cos %r", trainer.global_rank, trainer.world_size,
                 results["best_val_cos"], results["final"].get("val/cos"))
    if not trainer.is_global_zero:
        return results
    # eval.after_fit: full 5CAT of the best-by-val-cosine and the last checkpoint, with their epochs.
    if cfg.eval.after_fit:
        results["5cat"] = evaluate_after_fit(cfg, splits, {"best": best.best_model_path, "last": last.best_model_path}, run_dir)
    results["wall_time_s"] = round(time.perf_counter() - start, 2)
    (run_dir / "results.json").write_text(json.dumps(results, indent=2))
    log.info("Run finished: best val cos %s at %s", results["best_val_cos"], results["best_checkpoint"])
    return results


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    hc = HydraConfig.get()
    try:
        if hc.mode == RunMode.MULTIRUN:
            return run_sweep_job(cfg, hc)
        results = run(cfg, hc.runtime.output_dir, dict(hc.runtime.choices))
    except LvmError as e:
        log.error("%s", e)
        raise SystemExit(f"lvm: {e}") from None
    return results["best_val_cos"]


@contextlib.contextmanager
def own_gpu(cfg: DictConfig, hc: Any) -> Iterator[None]:
    """Under the joblib launcher, a single-GPU job gets a GPU of its own: trainer.devices=[k], k the
    first free GPU from job_num % GPUs on (held by a file lock until the job ends). A device index,
    not CUDA_VISIBLE_DEVICES: loky reuses worker processes, whose CUDA may already be initialised."""
    if hc.launcher._target_ != JOBLIB_LAUNCHER or not wants_one_gpu(cfg):
        yield
        return
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


def run_sweep_job(cfg: DictConfig, hc: Any) -> float | None:
    """One multirun job: a failure is logged and recorded in results.json, and the sweep goes on."""
    start = time.perf_counter()
    resume_on_requeue(cfg, hc)
    try:
        with own_gpu(cfg, hc):
            return run(cfg, hc.runtime.output_dir, dict(hc.runtime.choices))["best_val_cos"]
    except Exception as e:
        error = str(e) if isinstance(e, LvmError) else f"{type(e).__name__}: {e}"
        log.error("Job %s failed: %s", hc.job.num, error, exc_info=not isinstance(e, LvmError))
        failed = {"name": cfg.name, "run_dir": hc.runtime.output_dir, "status": "failed", "error": error,
                  "wall_time_s": round(time.perf_counter() - start, 2)}
        Path(hc.runtime.output_dir, "results.json").write_text(json.dumps(failed, indent=2))
        return None


def cli() -> None:
    """`python -m lvm.train`: a missing launcher plugin is named with its pip extra before Hydra starts."""
    problem = missing_launcher_plugin(launcher_choice(sys.argv[1:]))
    if problem:
        raise SystemExit(f"lvm: {problem}")
    main()


if __name__ == "__main__":
    cli()
