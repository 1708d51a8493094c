"""Errors lvm raises for bad input; the entry points turn them into one clear line, not a traceback."""

from __future__ import annotations

import math


def finite(x: object) -> bool:
    """A real number (not a bool, NaN or inf): what every numeric setting must be."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def require(*checks: tuple[bool, str], error: type[Exception] = ValueError, prefix: str = "") -> None:
    """Raise `error` naming every failed (ok, message) check at once; nothing when all hold."""
    problems = [msg for ok, msg in checks if not ok]
    if problems:
        raise error(prefix + "; ".join(problems))


class LvmError(Exception):
    """Base class: a user-facing problem with data, configuration or checkpoints."""


class DataError(LvmError):
    """A data file or array is malformed: the message names the file, key and what was expected."""


class ConfigError(LvmError):
    """A configuration value is impossible: the message names the setting and what was expected."""


class RunDirTaken(ConfigError):
    """The run directory belongs to another run (holding its lock, or already there): nothing may
    be written into it, not even a record of the refusal."""


class Preempted(Exception):
    """Training stopped on a stop signal after saving a resumable last.ckpt (not an error of the run)."""

    def __init__(self, signal_name: str) -> None:
        super().__init__(f"stopped by {signal_name}; resume with ckpt_path=last")
        self.signal_name = signal_name


class RunFailed(Exception):
    """A training run that had started failed; its results.json records the error and traceback."""
