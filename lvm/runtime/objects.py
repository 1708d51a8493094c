"""Objects from config: the resolved config as plain containers, and Hydra's `instantiate` with a
bad setting reported in one line naming its key (not Hydra's wrapped traceback)."""

from __future__ import annotations

from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from lvm.runtime.errors import ConfigError, LvmError


def to_plain(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as plain python containers (safe inside weights_only checkpoints)."""
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)  # type: ignore[return-value]


def build(key: str, node: Any, **kwargs: Any) -> Any:
    """`instantiate(node, **kwargs)` for the config entry `key` (a `_target_` and its keyword
    arguments; None builds None). A rule the object checks (ValueError, LvmError) is raised with
    `key` in front unless its message names it already (torch's own classes do not); a setting its
    constructor does not take is a ConfigError naming `key`."""
    if node is None:
        return None
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as e:
        cause = e.__cause__
        if isinstance(cause, LvmError) or (isinstance(cause, ValueError) and str(cause).startswith(key)):
            raise cause from None
        raise ConfigError(f"{key}: {cause if cause is not None else e}") from None
