"""lvm checkpoints: reading (torch's default weights_only loading, errors that name the file),
atomic writing (a full disk is one line naming the file), and the finite-weights rule (a
non-finite model is never saved as a checkpoint)."""

from __future__ import annotations

import errno
import resource
import shutil
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from lvm.runtime.errors import LvmError
from lvm.runtime.files import atomic_path

# What every lvm training checkpoint holds (Lightning's keys plus the run config in hyper_parameters).
TRAINING_KEYS = ("state_dict", "epoch", "global_step", "optimizer_states", "hyper_parameters")
# The layout of what lvm keeps in a checkpoint (callback states, config keys), stamped by the module
# on every save; a file of another format is refused, not guessed at.
FORMAT_KEY, FORMAT = "lvm_format", 5


def read_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """The checkpoint at `path`; LvmError naming the file if it is missing, corrupt or not lvm's."""
    path = Path(path)
    if not path.is_file():
        raise LvmError(f"checkpoint {path}: no such file")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any bytes can be in the file: a text file raises KeyError
        raise LvmError(f"checkpoint {path}: cannot be loaded, truncated or corrupt ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict):
        raise LvmError(f"checkpoint {path}: not an lvm training checkpoint (holds a {type(ckpt).__name__}, not a dict)")
    missing = [k for k in TRAINING_KEYS if k not in ckpt]
    if missing:
        raise LvmError(f"checkpoint {path}: not an lvm training checkpoint (no {', '.join(repr(k) for k in missing)})")
    hp = ckpt["hyper_parameters"]
    if not isinstance(hp, dict) or "config" not in hp or "dim" not in hp:
        raise LvmError(f"checkpoint {path}: hyper_parameters lack 'config' or 'dim' (not an lvm checkpoint)")
    if ckpt.get(FORMAT_KEY) != FORMAT:
        raise LvmError(
            f"checkpoint {path}: written by an lvm of another checkpoint format ({FORMAT_KEY}={ckpt.get(FORMAT_KEY)}, "
            f"this lvm reads {FORMAT}); train it again with this lvm, or use the lvm commit that wrote it"
        )
    return ckpt


def check_dim(path: str | Path, hyper_parameters: dict[str, Any], dim: int) -> None:
    """The checkpoint's model must have been trained on D = `dim` vectors."""
    if hyper_parameters.get("dim") != dim:
        raise LvmError(f"checkpoint {path}: model was trained on D={hyper_parameters.get('dim')} vectors, the data has D={dim}")


def finite_weights(trainer: L.Trainer) -> bool:
    """Whether every parameter of the trainer's module is finite, agreed on by every rank."""
    flags = torch.stack([torch.isfinite(p).all() for p in trainer.lightning_module.parameters()])
    return trainer.strategy.reduce_boolean_decision(bool(flags.all()), all=True)  # one host sync


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoint files written to a temporary file beside the target, fsynced, then renamed:
    kill -9 at any moment leaves the old file or the new one. (Lightning's own transaction
    writes its temporary file in the system temp folder, which can be another filesystem.) A write
    that runs out of disk space or over a file size limit is an LvmError naming the file."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with atomic_path(path) as tmp:
                torch.save(checkpoint, tmp)
        except (OSError, RuntimeError) as e:
            if not out_of_space(e):
                raise
            raise LvmError(write_failed(path)) from e


# Space errors: torch's zip writer reports them as a RuntimeError without errno, naming its stream.
_SPACE_ERRNOS = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
_WRITER_ERRORS = ("inline_container", "PytorchStreamWriter", "iostream error")


def out_of_space(e: BaseException) -> bool:
    """Whether a checkpoint write failed for lack of disk space or a file size limit."""
    if isinstance(e, OSError):
        return e.errno in _SPACE_ERRNOS
    return isinstance(e, RuntimeError) and any(m in str(e) for m in _WRITER_ERRORS)


def write_failed(path: Path) -> str:
    """One line for a checkpoint write that ran out of space, with the facts to check."""
    soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    limit = "none" if soft == resource.RLIM_INFINITY else f"{soft} bytes"
    free = shutil.disk_usage(path.parent).free
    return (
        f"checkpoint {path}: write failed for lack of disk space or a file size limit "
        f"({free / 2**20:.1f} MiB free on its filesystem, file size limit (ulimit -f): {limit}); "
        "the older checkpoints are intact"
    )
