"""Errors lvm raises for bad input; the entry points turn them into one clear line, not a traceback."""


class LvmError(Exception):
    """Base class: a user-facing problem with data, configuration or checkpoints."""


class DataError(LvmError):
    """A data file or array is malformed: the message names the file, key and what was expected."""


class ConfigError(LvmError):
    """A configuration value is impossible: the message names the setting and what was expected."""


class Preempted(Exception):
    """Training stopped on a stop signal after saving a resumable last.ckpt (not an error of the run)."""

    def __init__(self, signal_name: str) -> None:
        super().__init__(f"stopped by {signal_name}; resume with ckpt_path=last")
        self.signal_name = signal_name


class RunFailed(Exception):
    """A training run that had started failed; its results.json records the error and traceback."""
