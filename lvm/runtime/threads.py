"""Torch threads from the CPUs a process may use, so that runs side by side do not thrash.

Measured on a 2-core machine: two torch processes that each use every core ran 2.9x slower each
than with one thread each, because OpenMP threads spin while they wait for a core.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch

from lvm.runtime.errors import ConfigError

log = logging.getLogger(__name__)


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask: taskset, cgroup cpusets, SLURM)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def thread_count(setting: int | str, jobs: int = 1) -> int:
    """`threads` setting -> intra-op threads: `auto` = usable CPUs // jobs side by side (at least 1)."""
    if setting == "auto":
        return max(1, usable_cpus() // max(1, jobs))
    if isinstance(setting, bool) or not isinstance(setting, int) or setting < 1:
        raise ConfigError(f"threads must be auto or an integer >= 1 (got {setting!r})")
    return setting


def set_threads(setting: int | str, jobs: int = 1) -> int:
    """Set torch's intra-op threads from `setting` (see `thread_count`); returns the count."""
    n = thread_count(setting, jobs)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    log.info("torch threads: %d (threads=%s, %d usable CPUs, %d job(s) side by side)", n, setting, usable_cpus(), jobs)
    return n


def _busy_seconds(cpus: set[int]) -> float | None:
    """CPU seconds the machine spent busy on `cpus` since boot (/proc/stat; None elsewhere)."""
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return None
    busy = 0
    for line in lines:
        name, *fields = line.split()
        if name.startswith("cpu") and name != "cpu" and int(name[3:]) in cpus:
            user, nice, system, idle, iowait, irq, softirq, steal = (int(v) for v in fields[:8])
            busy += user + nice + system + irq + softirq + steal
    return busy / os.sysconf("SC_CLK_TCK")


class CPUShare:
    """Shares this process's CPUs with whatever else runs on them: every `interval` seconds it
    measures the CPU time others used there and sets torch threads to the cores left (at least 1,
    at most `limit`). Two lvm trainings started together on 2 cores each drop to one thread, where
    with two each they spin against each other (docs/performance.md, "Measured figures behind design choices"); when
    one ends, the other takes both cores again. Call `update` from the training thread (torch's
    thread count is per thread)."""

    def __init__(self, limit: int, interval: float = 2.0) -> None:
        self.cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
        self.limit = limit
        self.interval = interval
        self._last = self._sample()

    def _sample(self) -> tuple[float, float, float | None]:
        t = os.times()
        return time.monotonic(), t.user + t.system, _busy_seconds(self.cpus)

    def others(self) -> float | None:
        """Cores others kept busy on our CPUs since the last call (None: not measurable here)."""
        now = self._sample()
        (t0, own0, busy0), (t1, own1, busy1) = self._last, now
        self._last = now
        if busy0 is None or busy1 is None or t1 <= t0:
            return None
        return max(0.0, (busy1 - busy0) - (own1 - own0)) / (t1 - t0)

    def update(self) -> int | None:
        """Re-share once `interval` has passed; returns the new thread count when it changed."""
        if time.monotonic() - self._last[0] < self.interval:
            return None
        others = self.others()
        if others is None:
            return None
        want = min(self.limit, max(1, round(len(self.cpus) - others)))
        if want == torch.get_num_threads():
            return None
        torch.set_num_threads(want)
        log.info("torch threads: %d (other work kept %.1f of %d CPUs busy)", want, others, len(self.cpus))
        return want
