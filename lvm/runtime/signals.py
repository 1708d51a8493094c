"""Stop signals of a training run: SIGTERM (a scheduler's preemption, `kill`), SIGUSR1 (SLURM's
warning before the time limit) and SIGINT (Ctrl-C) are recorded, not fatal; training saves a
resumable checkpoint at the next step and stops with status `preempted` (`interrupted` for
SIGINT; callbacks/resume.py). A second Ctrl-C kills the process at once, as SIGINT does by default."""

from __future__ import annotations

import logging
import os
import signal
import threading
from types import FrameType, TracebackType

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class StopSignals:
    """While entered, SIGTERM, SIGUSR1 and a first SIGINT set `received` (the signal's name)
    instead of killing the process; the previous handlers come back on exit. A no-op outside the
    main thread."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._interrupted = False  # a SIGINT came: the next one kills
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT:
            # The default action from now on: a second Ctrl-C ends the process at once, killed by
            # SIGINT (the shell's 130), not waiting for the save, nor counted as bad input.
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            if self._interrupted:  # our handler was put back (Lightning's teardown): die now
                os.kill(os.getpid(), signal.SIGINT)
            self._interrupted = True
        name = signal.Signals(signum).name
        if self.received is None:
            again = " (Ctrl-C again to stop at once, without saving)" if signum == signal.SIGINT else ""
            log.warning("Received %s: saving a resumable checkpoint at the next step, then stopping%s", name, again)
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
                if not (sig == signal.SIGINT and self._interrupted):
                    signal.signal(sig, self._handle)

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
