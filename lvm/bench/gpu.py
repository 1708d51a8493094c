"""`python -m lvm.bench.gpu` (`make bench-gpu`): training speed on a CUDA GPU at the original's scale.

For each batch size (32, the original's, and a large one), precision (fp32, bf16-mixed) and data
path (host: the DataLoader gathers on the host and copies each batch; device: data.on_device,
one gather on the GPU) it times `warmup + steps` training steps of the full lvm loop (every
callback, as `lvm.train` builds it; model=p6, data=original_shape: D=768, 416,617 training windows)
and counts the host syncs per measured step (CUDA's sync debug mode: every synchronising call
warns, and the warnings are counted). It prints steps/s, windows/s, syncs per step and the
estimated time of the original's 12 epochs at that batch size (training steps only), and writes
bench_gpu.json beside the table.

`bench.device=cpu` runs the same measurements on the CPU (no sync count): the tests use it
so the script is known to run before it meets a GPU.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import tempfile
import warnings
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from omegaconf import DictConfig

from lvm.bench.loops import lightning_loop, training_config
from lvm.runtime.cli import CONF_DIR, entry_point, run_entry_point
from lvm.runtime.errors import ConfigError, LvmError
from lvm.runtime.tables import md_table
from lvm.runtime.threads import set_threads
from lvm.training.build import build_data

log = logging.getLogger("lvm.bench.gpu")


class SyncCounter(L.Callback):
    """Counts the host syncs of the measured steps [first, last] (CUDA sync debug mode "warn")."""

    def __init__(self, first: int, last: int) -> None:
        self.first, self.last = first, last
        self.count = 0
        self._caught: warnings.catch_warnings | None = None
        self._records: list[warnings.WarningMessage] = []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if batch_idx == self.first and pl_module.device.type == "cuda":
            self._caught = warnings.catch_warnings(record=True)
            self._records = self._caught.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if batch_idx == self.last and self._caught is not None:
            torch.cuda.set_sync_debug_mode("default")
            self.count = sum("synchroniz" in str(w.message) for w in self._records)
            self._caught.__exit__(None, None, None)
            self._caught = None


def measure(cfg: DictConfig, b: DictConfig, work_dir: Path) -> list[dict[str, Any]]:
    """The table's rows: `cfg` the training config, `b` the bench settings."""
    device = b.device
    splits = build_data(cfg)
    train_windows = len(splits["train"])
    rows = []
    for batch in b.batch_sizes:
        for precision in b.precisions:
            for on_device in (False, True):
                variant = copy.deepcopy(cfg)
                variant.data.batch_size, variant.trainer.precision, variant.data.on_device = int(batch), precision, on_device
                counter = SyncCounter(b.warmup, b.warmup + b.steps - 1)
                name = f"b{batch}-{precision}-{'device' if on_device else 'host'}"
                t = lightning_loop(
                    variant,
                    splits,
                    work_dir / name,
                    b.warmup,
                    b.steps,
                    full=True,
                    accelerator=device,
                    extra=(counter,),
                    limit_val_batches=b.val_batches,
                )  # validation is not what is measured
                steps_per_s = b.steps / t.steps_s
                epoch_steps = math.ceil(train_windows / batch)
                rows.append(
                    {
                        "batch": int(batch),
                        "precision": precision,
                        "data": "device" if on_device else "host",
                        "steps_per_s": round(steps_per_s, 2),
                        "windows_per_s": round(steps_per_s * batch, 1),
                        "syncs_per_step": round(counter.count / b.steps, 2) if device == "cuda" else None,
                        "seed_12_epochs_h": round(b.epochs * epoch_steps / steps_per_s / 3600, 2),
                    }
                )
                log.info("%s: %.2f steps/s, %s", name, steps_per_s, rows[-1])
    return rows


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="bench_gpu")
@entry_point("lvm.bench.gpu")
def main(cfg: DictConfig) -> None:
    b = cfg.bench
    if b.device not in ("cuda", "cpu"):
        raise ConfigError(f"bench.device must be cuda or cpu (got {b.device!r})")
    if b.device == "cuda" and not torch.cuda.is_available():
        raise LvmError("no CUDA device here (bench.device=cpu runs the same measurements on the CPU)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for name in ("lvm.model.module", "callbacks", "lightning.pytorch", "lightning.fabric", "tensorboard"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    set_threads(cfg.threads)  # `threads` (lvm.train's: auto = the usable CPUs); every variant keeps the count (training_config)
    train_cfg = training_config(cfg)
    with tempfile.TemporaryDirectory(prefix="lvm-bench-gpu-") as tmp:
        rows = measure(train_cfg, b, Path(tmp))
    device = torch.cuda.get_device_name() if b.device == "cuda" else "cpu"
    head = ["batch", "precision", "data", "steps/s", "windows/s", "host syncs/step", f"original's {b.epochs} epochs (h)"]
    body = [
        [
            str(r["batch"]),
            r["precision"],
            r["data"],
            f"{r['steps_per_s']:.2f}",
            f"{r['windows_per_s']:.0f}",
            "-" if r["syncs_per_step"] is None else f"{r['syncs_per_step']:.2f}",
            f"{r['seed_12_epochs_h']:.2f}",
        ]
        for r in rows
    ]
    table = "\n".join([f"# lvm.bench.gpu on {device}", "", *md_table(head, body)])
    out = Path(b.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_gpu.md").write_text(table + "\n")
    (out / "bench_gpu.json").write_text(json.dumps({"device": device, "rows": rows}, indent=2))
    print(table, flush=True)


def cli() -> None:
    """The console script."""
    run_entry_point(main)


if __name__ == "__main__":
    cli()
