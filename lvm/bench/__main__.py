"""`python -m lvm.bench [lvm.train overrides] [bench.steps=N ...]`: what Lightning and the lvm callbacks cost, and how lean the data path is.

Figures, measured side by side in one run (config: +experiment=p6b_v2 with its defaults,
i.e. the built-in synthetic data and the small model; CPU):

(a) lightning/raw: training throughput of the Lightning loop with everything `lvm.train.run`
    builds (ramp, skip guard, mini-5CAT, checkpointing, TensorBoard dashboard and logger; progress
    bar off) over a hand-written PyTorch loop of the same model, windows, loss and knobs, AdamW
    settings, gradient clipping and batch size, at trainer.precision. Goal >= 0.95. With it, in the
    same rounds:
    step_gemm_fp32, step_gemm_bf16: that full Lightning loop's training step, run in fp32 and in
    bf16-mixed (the config with trainer.precision set), against the GEMM limit: the step's matmul
    FLOPs (forward, loss and backward of a real batch, counted by FlopCounterMode; the optimizer's
    update is no matmul work) per second of the step, over the rate of a GEMM of the model's
    feed-forward shape at that precision (as figure f). Goals >= 0.7 and >= 0.5. bf16/fp32: its
    steps/s in bf16-mixed over fp32, goal >= 1.5 (at model=p6 data.synthetic.dim=768).
(b) callbacks_overhead: that full Lightning loop against the same Lightning loop without any of
    it (no lvm callback, no checkpointing, no logger; the module is unchanged). Goal <= 3%.
(c) data_mem: peak RSS growth of the data path (load a store NPZ, make the splits, one epoch of the
    train loader) over the bytes of the raw vector array, in fresh processes (Linux: reads
    /proc/self/status). Goal <= 1.1x.
(d) side_by_side: training steps/s of each of two `python -m lvm.train` runs started together on
    this machine, over one such run alone, with the default threads=auto (read from each run's
    per-step TensorBoard rows, start-up excluded; the slower of the two counts). Goal >= 0.40.
(e) detectors: the per-step work of the guard's statistics that a step would not do otherwise
    (the batch's prediction diversity and contrastive accuracy, the gradient norm's rolling z-score
    and ratio, and the total gradient norm itself only when the run does not clip gradients: with
    clipping the spike check clips, from the one norm), timed alone on a real batch of the model,
    over the full Lightning loop's time per step. Goal < 2%.
(f) 5cat_fp32, 5cat_bf16: 5CAT's matmul FLOP rate (its model forwards, FlopCounterMode) over the
    rate of a GEMM of the model's feed-forward shape, in fp32 and in bf16 (lvm/bench/fivecat_rate.py), with
    5CAT's windows/s. Goal >= 0.7.
(g) store (not in the default figures: it writes bench.store_gb of synthetic vectors to the temporary
    directory): store_gb, store_anon_ratio (peak RssAnon of training from the memory-mapped store
    over its size, goal <= 0.1), store_speed_ratio (its steps/s over the same data loaded into RAM,
    page cache warm, goal >= 0.95), store_cold_ratio (page cache evicted first) and
    store_ddp_anon_ratio (two gloo ranks' RssAnon together, goal < 0.2): lvm/bench/store.py.

`bench.figures` picks the figures to measure (for example `bench.figures=[fivecat] model=p6
data.synthetic.dim=768` for 5CAT alone at the original's scale).

What a Lightning timing includes: the wall time from the start of the first measured training
batch to the end of the last (everything the loop, the module and the callbacks do per step,
logging included), plus the epoch-end work outside the model's validation batches (mini-5CAT,
checkpoint saves, the dashboard line, the guard report, the LR scheduler, Lightning's own),
amortised over the batches of one real epoch. Each Lightning measurement is a one-epoch fit cut to
warm-up + measured batches, so that epoch-end work runs once, right after the measured window.
What it excludes: start-up (trainer, callbacks, first batches) and the model's validation batches
on val/ood, which the raw loop has no counterpart of. The variants run in interleaved rounds and the
best round of each counts: other work on a shared machine only ever adds time.
"""

from __future__ import annotations

import logging
import tempfile
import time
import warnings
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from lvm.bench.loops import (
    FIGURES,
    GOALS,
    measure_data_memory,
    measure_detectors,
    measure_fivecat,
    measure_loops,
    measure_side_by_side,
    measure_step_rates,
    training_config,
)
from lvm.bench.store import measure_store
from lvm.runtime.cli import CONF_DIR, entry_point, run_entry_point
from lvm.runtime.errors import ConfigError
from lvm.runtime.precision import BF16, FP32
from lvm.runtime.threads import set_threads
from lvm.training.build import build_data
from lvm.training.run import with_precision

log = logging.getLogger("lvm.bench")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="bench")
@entry_point("lvm.bench")
def main(cfg: DictConfig) -> None:
    b = cfg.bench
    if b.steps < 1 or b.warmup < 0 or b.repeats < 1 or b.mem_rows < 1 or b.fivecat_windows < 1 or b.store_dim < 1:
        raise ConfigError(
            "bench.steps, bench.repeats, bench.mem_rows, bench.fivecat_windows and bench.store_dim must be >= 1, "
            f"bench.warmup >= 0 (got {dict(b)})"
        )
    if not b.store_gb > 0:
        raise ConfigError(f"bench.store_gb must be > 0 (got {b.store_gb})")
    unknown = [f for f in b.figures if f not in FIGURES]
    if unknown or not b.figures:
        raise ConfigError(f"bench.figures must name some of {list(FIGURES)} (got {list(b.figures)})")
    # The training overrides given (for the side-by-side runs, which start `python -m lvm.train`).
    # Not `threads`: the side-by-side runs share the CPUs as lvm.train's default (auto) does.
    overrides = [o for o in HydraConfig.get().overrides.task if not o.lstrip("+~").startswith(("bench.", "threads="))]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    # Quiet the per-run chatter (console lines every print_every steps, per-epoch summaries,
    # Lightning's start-up info): emitting it costs next to nothing but would bury the results.
    for name in ("lvm.model.module", "callbacks", "lightning.pytorch", "lightning.fabric", "tensorboard"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")
    set_threads(cfg.threads)

    started = time.perf_counter()
    cfg = training_config(cfg)
    auto = "auto" in (str(cfg.trainer.precision), str(cfg.eval.precision))
    # The run's data, built once for every figure that trains or evaluates in this process.
    splits = build_data(cfg) if auto or {"loops", "detectors", "fivecat"} & set(b.figures) else {}
    if auto:  # measured once, as lvm.train does
        cfg, chosen = with_precision(cfg, splits["train"], None)
        log.info("precision=auto: trainer.precision %s, eval.precision %s", chosen["trainer"], chosen["eval"])
    figures: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="lvm-bench-") as tmp:
        if "loops" in b.figures:
            log.info(
                "loops: %d measured steps after %d warm-up, best of %d rounds, batch %d, %d torch thread(s)",
                b.steps,
                b.warmup,
                b.repeats,
                cfg.data.batch_size,
                torch.get_num_threads(),
            )
            best = measure_loops(cfg, splits, b.steps, b.warmup, b.repeats, Path(tmp))
            figures["lightning/raw"] = f"{best['raw'] / best['lightning_full']:.2f}"
            figures["callbacks_overhead"] = f"{100 * (best['lightning_full'] / best['lightning_bare'] - 1):+.1f}%"
            rates = measure_step_rates(cfg, splits, best)
            # Three significant digits: a small model's step is a few thousandths of the limit.
            figures["step_gemm_fp32"] = f"{rates[FP32].of_limit:#.3g}"
            figures["step_gemm_bf16"] = f"{rates[BF16].of_limit:#.3g}"
            figures["bf16/fp32"] = f"{rates[FP32].seconds / rates[BF16].seconds:.2f}"
        if "detectors" in b.figures:
            detectors = measure_detectors(cfg, splits, b.steps)
            log.info("detector statistics alone: %.3f ms/step", 1e3 * detectors)
            if "loops" in b.figures:
                figures["detectors"] = f"{100 * detectors / best['lightning_full']:.2f}%"
        if "data_mem" in b.figures:
            figures["data_mem"] = f"{measure_data_memory(cfg, b.mem_rows, Path(tmp)):.2f}x"
        if "side_by_side" in b.figures:
            lone, pair = measure_side_by_side(overrides, Path(tmp) / "side_by_side")
            log.info("side by side: lone %.1f steps/s, together %.1f and %.1f steps/s", lone, *pair)
            figures["side_by_side"] = f"{min(pair) / lone:.2f}"
        if "fivecat" in b.figures:
            for rate in measure_fivecat(cfg, splits, b.fivecat_windows):
                figures[f"5cat_{'bf16' if rate.precision == BF16 else 'fp32'}"] = f"{rate.of_limit:.2f}"
        if "store" in b.figures:
            figures |= measure_store(cfg, overrides, b.store_gb, b.store_dim, b.warmup, b.steps, b.repeats, Path(tmp))
    log.info("goals: %s; took %.0f s", ", ".join(f"{k} {v}" for k, v in GOALS.items() if k in figures), time.perf_counter() - started)
    print("bench: " + " ".join(f"{k}={v}" for k, v in figures.items()), flush=True)


def cli() -> None:
    """The console script."""
    run_entry_point(main)


if __name__ == "__main__":
    cli()
