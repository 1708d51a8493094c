"""Figure `store` of `python -m lvm.bench`: training from a memory-mapped store larger than a given size.

A synthetic store of at least `bench.store_gb` GB (float32, D = `bench.store_dim`) is written in
blocks, then trained from (the full Lightning loop of lvm.bench's loops figure, timed the same way),
each variant in a fresh process whose peak anonymous memory (RssAnon, /proc) is sampled throughout
(map and load in `bench.repeats` interleaved rounds, the fastest round of each counting):
- map, page cache warm (the store was just written): steps/s and peak RssAnon over the store size;
- load: the same data read into the process's RAM (`data.memory=load`): the speed reference;
- map, cold: the store's pages evicted from the page cache first (posix_fadvise DONTNEED, which
  needs no root), so every batch reads from disk;
- ddp: two gloo ranks of `python -m lvm.train` on the mapped store: their RssAnon summed.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from lvm.bench.loops import lightning_loop, start_training, status_kib
from lvm.data.convert import write_store
from lvm.data.mapped import VECTORS, read_manifest, store_bytes
from lvm.data.store import WindowSpec
from lvm.runtime.objects import to_plain
from lvm.training.build import build_data

log = logging.getLogger("lvm.bench")

_POLL_S = 0.02


def anon_bytes(pids: list[int]) -> int:
    """The RssAnon of these processes, summed (a process that has ended counts 0)."""
    return sum(1024 * status_kib("RssAnon", pid) for pid in pids)


def process_tree(pid: int) -> list[int]:
    """`pid` and every process descended from it (Linux /proc)."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += parents.get(p, [])
    return tree


@contextmanager
def peak_anon(pids: Any) -> Iterator[list[int]]:
    """Samples the summed RssAnon of `pids()` every 20 ms while the block runs; yields [peak]."""
    peak, done = [0], threading.Event()

    def poll() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], anon_bytes(pids()))
            done.wait(_POLL_S)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        yield peak
    finally:
        done.set()
        thread.join()


def evict(path: Path) -> None:
    """Drop a file's clean pages from the page cache (no root needed; pages in use stay)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


class EvictAtStart(L.Callback):
    """Cold cache: the store's pages leave the page cache once the fit has started (after the
    set-up's passes over the data), before the first timed step."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        evict(self.path)


def write_bench_store(cfg: DictConfig, gb: float, dim: int, path: Path) -> Path:
    """A synthetic store of at least `gb` GB of float32 vectors of dimension `dim`."""
    syn = dict(to_plain(cfg.data.synthetic)) | {"dim": dim}
    mean_chunks = (syn["min_chunks"] + syn["max_chunks"]) / 2
    syn["articles"] = max(1, int(gb * 1e9 / (4 * dim * mean_chunks)) + 1)
    data = {"source": "synthetic", "synthetic": syn, "normalize": "renormalize"}
    t0 = time.perf_counter()
    write_store(data, WindowSpec(**cfg.window), path, "float32", False, block_articles=2000)
    log.info("store: wrote %s (%.2f GB) in %.0f s", path, store_bytes(read_manifest(path)) / 1e9, time.perf_counter() - t0)
    return path


def _store_child(plain: dict[str, Any], run_dir: str, cold: bool, warmup: int, steps: int) -> tuple[float, int]:
    """(steps/s, peak RssAnon bytes) of the full Lightning loop on the store, in a fresh process."""
    cfg = OmegaConf.create(plain)
    me = os.getpid()
    with peak_anon(lambda: [me]) as peak:
        splits = build_data(cfg)
        extra = (EvictAtStart(Path(cfg.data.path) / VECTORS),) if cold else ()
        timing = lightning_loop(cfg, splits, Path(run_dir), warmup, steps, full=True, extra=extra)
    return steps / timing.steps_s, peak[0]


def measure_store(
    cfg: DictConfig, overrides: list[str], gb: float, dim: int, warmup: int, steps: int, repeats: int, work_dir: Path
) -> dict[str, str]:
    """The store figures of the bench line (see the module docstring)."""
    path = write_bench_store(cfg, gb, dim, work_dir / "store")
    size = store_bytes(read_manifest(path))
    plain = to_plain(cfg)
    plain["data"] = {k: v for k, v in plain["data"].items() if k != "synthetic"} | {"source": "store", "path": str(path)}
    spawn = multiprocessing.get_context("spawn")
    threads = (torch.get_num_threads(),)
    speed: dict[str, float] = {}
    anon: dict[str, int] = {}
    # map and load in interleaved rounds, the best round of each counts; cold once (it evicts)
    variants = [(r, name, name, False) for r in range(repeats) for name in ("map", "load")]
    for r, name, memory, cold in [*variants, (0, "cold", "map", True)]:
        plain["data"]["memory"] = memory
        with spawn.Pool(1, torch.set_num_threads, threads) as pool:
            steps_per_s, peak = pool.apply(_store_child, (plain, str(work_dir / f"{name}-{r}"), cold, warmup, steps))
        log.info("store %-4s: %.1f steps/s, peak RssAnon %.0f MB = %.3fx the store", name, steps_per_s, peak / 1e6, peak / size)
        speed[name], anon[name] = max(speed.get(name, 0.0), steps_per_s), max(anon.get(name, 0), peak)
    ddp = measure_ddp_anon(overrides, path, warmup + steps, work_dir / "ddp")
    log.info("store ddp : two gloo ranks' peak RssAnon together %.0f MB = %.3fx the store", ddp / 1e6, ddp / size)
    return {
        "store_gb": f"{size / 1e9:.2f}",
        "store_anon_ratio": f"{anon['map'] / size:.3f}",
        "store_speed_ratio": f"{speed['map'] / speed['load']:.2f}",
        "store_cold_ratio": f"{speed['cold'] / speed['load']:.2f}",
        "store_ddp_anon_ratio": f"{ddp / size:.3f}",
    }


def without_data_source(overrides: list[str]) -> list[str]:
    """`overrides` less those that choose the data (`data=`, `data.path`, `data.synthetic.*`): the
    store run reads the mapped store; the loading settings (batch size, shuffle, ...) stay."""
    keys = [o.lstrip("+~").split("=", 1)[0] for o in overrides]
    return [o for o, k in zip(overrides, keys) if k not in ("data", "data.path") and not k.startswith("data.synthetic.")]


def measure_ddp_anon(overrides: list[str], path: Path, batches: int, run_dir: Path) -> int:
    """Peak RssAnon of a 2-rank gloo `python -m lvm.train` on the mapped store, both ranks summed."""
    settings = ["data=store", f"data.path={path}", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"]
    settings += [f"+trainer.limit_train_batches={batches}", "threads=1"]
    proc = start_training(without_data_source(overrides), run_dir, *settings)
    with peak_anon(lambda: process_tree(proc.pid)) as peak:
        code = proc.wait()
    if code != 0:
        raise SystemExit(f"bench: the 2-rank store run failed (exit {code}); see {run_dir}/train.log")
    return peak[0]
