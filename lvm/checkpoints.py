"""Reading lvm checkpoints: torch's default weights_only loading, with errors that name the file."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from lvm.errors import LvmError

# What every lvm training checkpoint holds (Lightning's keys plus the run config in hyper_parameters).
TRAINING_KEYS = ("state_dict", "epoch", "global_step", "optimizer_states", "hyper_parameters")
# Model options added after checkpoints were first written, with the value that reproduces those.
MODEL_OPTIONS_ADDED = {"context_skip": False}


def read_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """The checkpoint at `path`; LvmError naming the file if it is missing, corrupt or not lvm's."""
    path = Path(path)
    if not path.is_file():
        raise LvmError(f"checkpoint {path}: no such file")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as e:
        raise LvmError(f"checkpoint {path}: cannot be loaded, truncated or corrupt ({type(e).__name__}: {e})") from None
    missing = [k for k in TRAINING_KEYS if k not in ckpt]
    if missing:
        raise LvmError(f"checkpoint {path}: not an lvm training checkpoint (no {', '.join(repr(k) for k in missing)})")
    hp = ckpt["hyper_parameters"]
    if "config" not in hp or "dim" not in hp:
        raise LvmError(f"checkpoint {path}: hyper_parameters lack 'config' or 'dim' (not an lvm checkpoint)")
    model = hp["config"].get("model")
    if isinstance(model, dict):
        for key, value in MODEL_OPTIONS_ADDED.items():
            model.setdefault(key, value)
    return ckpt


def check_dim(path: str | Path, hyper_parameters: dict[str, Any], dim: int) -> None:
    """The checkpoint's model must have been trained on D = `dim` vectors."""
    if hyper_parameters.get("dim") != dim:
        raise LvmError(f"checkpoint {path}: model was trained on D={hyper_parameters.get('dim')} vectors, the data has D={dim}")
