"""Errors lvm raises for bad input; the entry points turn them into one clear line, not a traceback."""


class LvmError(Exception):
    """Base class: a user-facing problem with data, configuration or checkpoints."""


class DataError(LvmError):
    """A data file or array is malformed: the message names the file, key and what was expected."""


class ConfigError(LvmError):
    """A configuration value is impossible: the message names the setting and what was expected."""
