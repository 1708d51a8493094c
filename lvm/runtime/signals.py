"""Stop signals of a training run: SIGTERM (a scheduler's preemption, `kill`) and SIGUSR1 (SLURM's
warning before the time limit) are recorded, not fatal; training saves a resumable checkpoint at
the next step and stops with status `preempted` (callbacks/resume.py)."""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType, TracebackType

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopSignals:
    """While entered, SIGTERM and SIGUSR1 set `received` (the signal's name) instead of killing
    the process; the previous handlers come back on exit. A no-op outside the main thread."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.received is None:
            log.warning("Received %s: saving a resumable checkpoint at the next step, then stopping", name)
        self.received = name

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def take_over(self) -> None:
        """Be the only handler again (Lightning installs its own SIGTERM handler when fit starts,
        which raises wherever it is noticed, e.g. right after a validation, before the epoch's
        last.ckpt and metrics row exist). The handlers from before `__enter__` still come back."""
        if self._previous and threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                signal.signal(sig, self._handle)

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
