"""The measurements behind `python -m lvm.bench`: raw and Lightning loops (and the training step
against the GEMM limit), detector cost, data memory, side-by-side runs, 5CAT rate."""

from __future__ import annotations

import logging
import multiprocessing
import os
import subprocess
import sys
import time
from copy import deepcopy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from callbacks.ramp import parse_stages, stage_index
from lvm.bench.fivecat_rate import FiveCatRate, fivecat_rate, gemm_flops_per_s, training_step_flops
from lvm.data.loaders import load_store_npz
from lvm.data.splits import make_splits
from lvm.data.store import Windows, WindowSpec
from lvm.data.synthetic import synthetic_corpus
from lvm.model.module import LVMModule, batch_health
from lvm.model.optim import RollingStat, grad_norm
from lvm.runtime.cli import CONF_DIR
from lvm.runtime.objects import to_plain
from lvm.runtime.precision import BF16, FP32, check_precision
from lvm.runtime.threads import thread_count
from lvm.training.build import build_fit, clip_by_norm
from lvm.training.config import validate
from lvm.training.data import make_loader

log = logging.getLogger("lvm.bench")

VARIANTS = ("raw", "lightning_bare", "lightning_full")  # at cfg.trainer.precision
PRECISION_TAGS = {FP32: "fp32", BF16: "bf16"}
GOALS = {
    "lightning/raw": ">= 0.95",
    "callbacks_overhead": "<= +3%",
    "step_gemm_fp32": ">= 0.7",
    "step_gemm_bf16": ">= 0.5",
    "bf16/fp32": ">= 1.5",
    "data_mem": "<= 1.1x",
    "side_by_side": ">= 0.40",
    "detectors": "< 2%",
    "5cat_fp32": ">= 0.7",
    "5cat_bf16": ">= 0.7",
    "store_anon_ratio": "<= 0.1",
    "store_speed_ratio": ">= 0.95",
    "store_ddp_anon_ratio": "< 0.2",
}
FIGURES = ("loops", "detectors", "data_mem", "side_by_side", "fivecat", "store")


@dataclass(frozen=True)
class Timing:
    """Wall time of the measured steps, and of the epoch-end work outside model validation."""

    steps_s: float
    epoch_end_s: float

    def per_step(self, steps: int, epoch_batches: int) -> float:
        """Seconds per training step, the epoch-end work spread over one real epoch's batches."""
        return self.steps_s / steps + self.epoch_end_s / epoch_batches


class StepTimer(L.Callback):
    """Times batches [warmup, warmup + steps), then the epoch-end work minus model validation.

    It must come first in the callback list: its hooks then run before the other callbacks', so
    the step window opens before any batch-start work, and the validation window closes (in
    on_validation_epoch_end) before Mini5CAT's hook runs, which thus counts as epoch-end work.
    """

    def __init__(self, warmup: int, steps: int) -> None:
        self.first, self.last = warmup, warmup + steps - 1
        self.t_first = self.t_last = self.t_val = 0.0
        self.val_s = 0.0
        self.timing: Timing | None = None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if batch_idx == self.first:
            _sync(pl_module.device)
            self.t_first = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if batch_idx == self.last:
            _sync(pl_module.device)
            self.t_last = time.perf_counter()

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.t_val = time.perf_counter()

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.val_s += time.perf_counter() - self.t_val

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.timing = Timing(self.t_last - self.t_first, time.perf_counter() - self.t_last - self.val_s)


def _sync(device: torch.device) -> None:
    """Wait for the GPU's queued work, so a timing ends where the work does (nothing on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def training_config(cfg: DictConfig) -> DictConfig:
    """The run config `python -m lvm.train +experiment=p6b_v2 <overrides>` would use, validated,
    with the bench's thread count and no progress bar: a fixed thread count, so that no variant
    re-shares threads (ShareCPUs) while it is timed, and no progress bar callback either."""
    train = OmegaConf.masked_copy(cfg, [k for k in cfg if k not in ("bench", "hydra")])
    train.threads = thread_count(cfg.threads)  # the count the tool set (set_threads), fixed
    train.trainer.enable_progress_bar = False
    validate(train)
    return train


def raw_loop(cfg: DictConfig, train: Windows, warmup: int, steps: int) -> Timing:
    """The training computation of LVMModule under Lightning, as a plain PyTorch loop."""
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    lvm_module = LVMModule(to_plain(cfg), dim=train.store.dim)
    model, loss = lvm_module.model, lvm_module.loss  # the same initial weights and loss
    # What RampSchedule sets for the first epoch.
    stages = parse_stages(OmegaConf.to_container(cfg.ramp.stages, resolve=True))
    stage = stages[stage_index(cfg.ramp.epoch_base, stages)]
    lvm_module.set_knobs(stage.margin, stage.target_frac, lvm_module.knobs.lambda_max)
    skip = lvm_module.skip
    optimizer = lvm_module.configure_optimizers()["optimizer"]
    clip, prev_slot = cfg.trainer.gradient_clip_val, lvm_module.prev_slot
    batches = iter(
        make_loader(train, cfg.data.batch_size, cfg.data.shuffle, cfg.data.num_workers, cfg.seed, shuffle_block=cfg.data.shuffle_block)
    )
    model.train()
    t_first = 0.0
    for i in range(warmup + steps):
        if i == warmup:
            t_first = time.perf_counter()
        batch = next(batches)
        context = batch["context"]
        raw, _ = model(context)
        terms = loss(raw, batch["target"], context[:, prev_slot], skip)
        optimizer.zero_grad()
        terms.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
    return Timing(time.perf_counter() - t_first, 0.0)


def lightning_loop(
    cfg: DictConfig,
    splits: dict[str, Windows],
    run_dir: Path,
    warmup: int,
    steps: int,
    full: bool,
    accelerator: str = "cpu",
    extra: tuple[L.Callback, ...] = (),
    **trainer_overrides: Any,
) -> Timing:
    """A one-epoch fit cut to warmup + steps batches, built as `lvm.train.run` builds it.

    full: every callback of `build_callbacks`, and the TensorBoard logger; otherwise none of them
    and no checkpointing. `extra`: callbacks after the timer (lvm.bench.gpu's sync counter);
    `trainer_overrides`: more Trainer settings (lvm.bench.gpu's limit_val_batches).
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    timer = StepTimer(warmup, steps)
    fit = build_fit(
        cfg,
        splits,
        run_dir,
        lvm_callbacks=full,
        extra_callbacks=[timer, *extra],
        max_epochs=1,
        limit_train_batches=warmup + steps,
        accelerator=accelerator,
        enable_model_summary=False,
        enable_checkpointing=full,
        **trainer_overrides,
    )
    fit.trainer.fit(fit.module, datamodule=fit.data)
    assert timer.timing is not None
    return timer.timing


def full_variant(precision: str, configured: str) -> str:
    """The variant that times the full Lightning loop at `precision`: lightning_full at the
    configured trainer.precision, lightning_full_fp32 / lightning_full_bf16 at the other."""
    return "lightning_full" if precision == configured else f"lightning_full_{PRECISION_TAGS[precision]}"


def with_trainer_precision(cfg: DictConfig, precision: str) -> DictConfig:
    """A copy of the run config with trainer.precision set to `precision`."""
    other = deepcopy(cfg)
    other.trainer.precision = precision
    return other


def measure_loops(cfg: DictConfig, splits: dict[str, Windows], steps: int, warmup: int, repeats: int, work_dir: Path) -> dict[str, float]:
    """Best seconds per step of each variant over `repeats` interleaved rounds: VARIANTS at
    cfg.trainer.precision, and the full Lightning loop at the other of fp32 and bf16-mixed too
    (`full_variant`: the same config with trainer.precision set); lightning_full_fp32 and
    lightning_full_bf16 are both in the result (one of them is lightning_full)."""
    train, bs = splits["train"], cfg.data.batch_size
    epoch_batches = -(-len(train) // bs)
    if warmup + steps > epoch_batches:
        raise SystemExit(f"bench: --warmup + --steps = {warmup + steps} exceeds one epoch ({epoch_batches} batches)")
    configured = check_precision("trainer.precision", cfg.trainer.precision)
    other = BF16 if configured == FP32 else FP32
    configs = dict.fromkeys(VARIANTS, cfg) | {full_variant(other, configured): with_trainer_precision(cfg, other)}
    variants = tuple(configs)
    per_step: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(repeats):
        shift = r % len(variants)  # rotate the order so no variant always runs first or last
        for name in variants[shift:] + variants[:shift]:
            if name == "raw":
                t = raw_loop(cfg, train, warmup, steps)
            else:
                full = name.startswith("lightning_full")
                t = lightning_loop(configs[name], splits, work_dir / f"{name}-{r}", warmup, steps, full=full)
            s = t.per_step(steps, epoch_batches)
            per_step[name].append(s)
            log.info(
                "round %d/%d %-19s %6.2f ms/step %7.1f samples/s  (%d steps %.2f s, epoch end %.3f s / %d batches)",
                r + 1,
                repeats,
                name,
                1e3 * s,
                bs / s,
                steps,
                t.steps_s,
                t.epoch_end_s,
                epoch_batches,
            )
    best = {name: min(v) for name, v in per_step.items()}
    for name in variants:
        log.info("best %-19s %6.2f ms/step %7.1f samples/s", name, 1e3 * best[name], bs / best[name])
    return best | {f"lightning_full_{PRECISION_TAGS[configured]}": best["lightning_full"]}


@dataclass(frozen=True)
class StepRate:
    """The full Lightning loop's training step at one precision against the GEMM limit."""

    precision: str
    seconds: float  # per step, as measure_loops timed it
    flops: float  # matmul FLOPs of one step, counted (training_step_flops)
    gemm_flops_per_s: float  # the GEMM limit at the model's feed-forward shape

    @property
    def flops_per_s(self) -> float:
        return self.flops / self.seconds

    @property
    def of_limit(self) -> float:
        return self.flops_per_s / self.gemm_flops_per_s


def measure_step_rates(cfg: DictConfig, splits: dict[str, Windows], best: dict[str, float]) -> dict[str, StepRate]:
    """The full Lightning loop's training step in fp32 and in bf16-mixed against the GEMM limit,
    from measure_loops' best seconds per step (`best`): the step's matmul FLOPs, counted on a real
    training batch of the run's batch size (training_step_flops: forward, loss and backward), per
    second, over the rate of a GEMM of the model's feed-forward shape, [batch * K, d_model] @
    [d_model, ffn], at the same precision (gemm_flops_per_s, as figure f's). As figure f, bf16 is
    measured wherever it is asked for (autocast runs on any CPU; without bf16 instructions slowly,
    which the figure then shows)."""
    train = splits["train"]
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    plain = to_plain(cfg)
    module = LVMModule(plain, dim=train.store.dim)
    batch = train.gather(torch.arange(min(cfg.data.batch_size, len(train))))
    flops = training_step_flops(module, batch)
    b, k, _ = batch["context"].shape
    d_model, ffn = plain["model"]["d_model"], plain["model"]["ffn"]
    rates = {}
    for precision in (FP32, BF16):
        r = StepRate(
            precision, best[f"lightning_full_{PRECISION_TAGS[precision]}"], flops, gemm_flops_per_s(b * k, d_model, ffn, precision)
        )
        log.info(
            "training step %s (lightning_full): %.2f ms/step, %.3f GFLOP/step (matmuls, counted) = %.1f GFLOP/s "
            "of a %.1f GFLOP/s GEMM limit ([%d, %d] @ [%d, %d]) = %.3g",
            PRECISION_TAGS[precision],
            1e3 * r.seconds,
            flops / 1e9,
            r.flops_per_s / 1e9,
            r.gemm_flops_per_s / 1e9,
            b * k,
            d_model,
            d_model,
            ffn,
            r.of_limit,
        )
        rates[precision] = r
    log.info("training step bf16 / fp32: %.2fx the steps/s", rates[FP32].seconds / rates[BF16].seconds)
    return rates


def measure_detectors(cfg: DictConfig, splits: dict[str, Windows], calls: int) -> float:
    """Seconds per step of the guard's per-step statistics alone (figure e), on one real batch."""
    module = LVMModule(to_plain(cfg), dim=splits["train"].store.dim)
    batch = splits["train"].gather(torch.arange(min(cfg.data.batch_size, len(splits["train"]))))
    raw, pred = module(batch["context"])
    torch.nn.functional.mse_loss(raw, batch["target"]).backward()
    history = RollingStat(cfg.guard.spike.window)
    params = list(module.parameters())  # as callbacks/spike.py keeps them
    norm_is_extra = clip_by_norm(cfg) is None  # with clipping, clipping needs this norm anyway
    norm = grad_norm(params)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(calls):
            batch_health(pred.detach(), batch["target"])
            if norm_is_extra:
                norm = grad_norm(params)
            history.score(norm, cfg.guard.spike.min_history)
            history.push(norm)
        best = min(best, (time.perf_counter() - start) / calls)
    return best


def status_kib(key: str, pid: int | str = "self") -> int:
    """One field of /proc/<pid>/status in KiB: VmRSS (resident now), VmHWM (peak resident),
    RssAnon (anonymous resident); 0 for a process that has ended."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    for line in status.splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1])
    raise KeyError(key)


def _raw_vectors_child(path: str) -> tuple[int, int]:
    """(bytes of the vector array, RSS growth from loading it alone), in a fresh process."""
    before = status_kib("VmRSS")
    with np.load(path) as npz:
        vectors = npz["vectors"]
    return vectors.nbytes, 1024 * (status_kib("VmRSS") - before)


def _data_path_child(path: str, window: dict[str, int], data: dict[str, Any], seed: int) -> dict[str, int]:
    """Peak RSS growth in bytes, since the baseline after imports, at the end of each stage."""
    base = status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    peaks: dict[str, int] = {}
    store = load_store_npz(path)
    peaks["load_store_npz"] = status_kib("VmHWM")
    split = data["split"]
    splits = make_splits(store, WindowSpec(**window), split["val"], split["ood"], split["seed"], split["ranges"])
    peaks["+ make_splits"] = status_kib("VmHWM")
    for _ in make_loader(splits["train"], data["batch_size"], data["shuffle"], 0, seed, shuffle_block=data["shuffle_block"]):
        pass
    peaks["+ train epoch"] = status_kib("VmHWM")
    return {stage: 1024 * (kib - base) for stage, kib in peaks.items()}


def measure_data_memory(cfg: DictConfig, rows: int, work_dir: Path) -> float:
    """Peak RSS growth of the data path over the raw vector bytes, each measured in a fresh process."""
    plain = to_plain(cfg)
    syn = dict(plain["data"]["synthetic"])
    syn["articles"] = max(1, round(2 * rows / (syn["min_chunks"] + syn["max_chunks"])))
    vectors, article_ids, chunk_indices = synthetic_corpus(**syn)
    path = work_dir / "store.npz"
    np.savez(path, vectors=vectors, article_indices=article_ids, chunk_indices=chunk_indices)
    log.info("store NPZ: %d x %d float32, %d articles", *vectors.shape, syn["articles"])
    del vectors, article_ids, chunk_indices
    spawn = multiprocessing.get_context("spawn")
    threads = (torch.get_num_threads(),)  # as in the parent: default threads thrash on a shared machine
    with spawn.Pool(1, torch.set_num_threads, threads) as pool:
        raw_bytes, raw_rss = pool.apply(_raw_vectors_child, (str(path),))
    with spawn.Pool(1, torch.set_num_threads, threads) as pool:
        peaks = pool.apply(_data_path_child, (str(path), plain["window"], plain["data"], cfg.seed))
    log.info("raw vectors %.1f MB (RSS growth loading them alone: %.1f MB)", raw_bytes / 1e6, raw_rss / 1e6)
    for stage, growth in peaks.items():
        log.info("data path peak after %-15s %6.1f MB = %.3fx raw", stage, growth / 1e6, growth / raw_bytes)
    return max(peaks.values()) / raw_bytes


def train_steps_per_s(run_dir: Path) -> float:
    """Training steps/s of a finished run, from the wall times of its per-step TensorBoard rows
    (flushed every logger.flush_every steps: first flush to last)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    events = acc.Scalars("train/loss")
    flushed = [e for e, nxt in zip(events, events[1:]) if nxt.wall_time - e.wall_time > 0.01] or events
    first, last = flushed[0], events[-1]
    return (last.step - first.step) / (last.wall_time - first.wall_time)


def start_training(overrides: list[str], run_dir: Path, *settings: str) -> subprocess.Popen:
    """`python -m lvm.train` with the bench's overrides (its experiment as +experiment, p6b_v2 by
    default) for one epoch without the after-fit evaluation or a progress bar, then `settings`, in
    `run_dir`; output discarded (the run's train.log has it)."""
    experiment = [f"+{o}" for o in overrides if o.startswith("experiment=")] or ["+experiment=p6b_v2"]
    rest = [o for o in overrides if not o.startswith("experiment=")]
    args = [
        sys.executable,
        "-m",
        "lvm.train",
        *experiment,
        "trainer.max_epochs=1",
        "eval.after_fit=false",
        "trainer.enable_progress_bar=false",
    ]
    root = Path(CONF_DIR).parent
    env = {**os.environ, "PYTHONPATH": str(root)}
    args += [*rest, *settings, f"hydra.run.dir={run_dir}"]
    return subprocess.Popen(args, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def measure_side_by_side(overrides: list[str], work_dir: Path) -> tuple[float, list[float]]:
    """Steps/s of a lone training, and of each of two started together (default threads=auto)."""

    def finish(procs: list[subprocess.Popen]) -> None:
        if any(p.wait() != 0 for p in procs):
            raise SystemExit(f"bench: a side-by-side training failed; see {work_dir}/*/train.log")

    finish([start_training(overrides, work_dir / "lone")])
    finish([start_training(overrides, work_dir / f"pair{i}") for i in range(2)])
    return train_steps_per_s(work_dir / "lone"), [train_steps_per_s(work_dir / f"pair{i}") for i in range(2)]


def measure_fivecat(cfg: DictConfig, splits: dict[str, Windows], windows: int) -> list[FiveCatRate]:
    """Figure (f): 5CAT's model work on `windows` val windows, in fp32 and in bf16, against the GEMM limit."""
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    plain = to_plain(cfg)
    module = LVMModule(plain, dim=splits["val"].store.dim)
    rates = []
    for precision in (FP32, BF16):
        r = fivecat_rate(module, splits["val"], windows, cfg.eval.horizon, cfg.data.eval_batch_size, precision, plain["model"])
        log.info(
            "5CAT %s: %d windows in %.1f s = %.1f windows/s (%.1f model forwards per window); matmul %.1f GFLOP/s "
            "of a %.1f GFLOP/s GEMM limit = %.2f",
            r.precision,
            r.windows,
            r.seconds,
            r.windows_per_s,
            r.forwards_per_window,
            r.achieved_gflops,
            r.gemm_gflops,
            r.of_limit,
        )
        rates.append(r)
    return rates
