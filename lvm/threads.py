"""Torch threads from the CPUs a process may use, so that runs side by side do not thrash.

Measured on a 2-core machine: two torch processes that each use every core ran 2.9x slower each
than with one thread each, because OpenMP threads spin while they wait for a core.
"""

from __future__ import annotations

import logging
import os

import torch

from lvm.errors import ConfigError

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
