"""A run owns its directory: what it writes there, when it may start there, and its results file.

A directory that already holds a run is resumed (the checkpoint lies in it), cleared
(`overwrite=true`) or refused, before anything is written; results.json is written atomically
and as strict JSON (a NaN metric is null).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from lvm.runtime.errors import ConfigError
from lvm.runtime.files import atomic_write_text, strict_json

log = logging.getLogger(__name__)

# What a run writes into its directory (Hydra's own .hydra/ and train.log aside).
RUN_OUTPUTS = ("checkpoints", "tb", "eval", "metrics.jsonl", "events.jsonl", "results.json", "config.yaml")


def claim_run_dir(run_dir: Path, ckpt_path: str | None, overwrite: bool) -> None:
    """A run owns its directory: one that already holds a run is resumed (the checkpoint lies in
    it), cleared (`overwrite=true`) or refused, before anything is written."""
    found = [name for name in RUN_OUTPUTS if (run_dir / name).exists()]
    if not found:
        return
    inside = ckpt_path is not None and Path(ckpt_path).resolve().is_relative_to(run_dir.resolve())
    if inside and overwrite:
        raise ConfigError(f"overwrite=true would delete the checkpoint this run resumes from ({ckpt_path}); drop one of them")
    if inside:
        return
    if not overwrite:
        raise ConfigError(
            f"run directory {run_dir} already holds a run ({', '.join(found)}): resume it with ckpt_path=last "
            "(or ckpt_path=auto), pick another hydra.run.dir, or start over with overwrite=true (deletes those files)"
        )
    log.warning("overwrite=true: deleting %s from %s", ", ".join(found), run_dir)
    for name in found:
        path = run_dir / name  # a link (checkpoints kept on another disk) goes, never what it points to
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


def auto_start_fresh(cfg: DictConfig, run_dir: Path) -> bool:
    """ckpt_path=auto found no last.ckpt: an earlier attempt that never wrote a checkpoint left
    only partial records, which a fresh start replaces (no checkpoint is deleted)."""
    return cfg.ckpt_path == "auto" and not list((run_dir / "checkpoints").glob("*.ckpt"))


def write_results(run_dir: Path, results: dict[str, Any]) -> None:
    """results.json, strict JSON (a NaN metric is written as null), atomically."""
    atomic_write_text(run_dir / "results.json", json.dumps(strict_json(results), indent=2, allow_nan=False))


def write_failure(run_dir: Path, name: str, error: str, seconds: float, traceback: str | None = None) -> None:
    """results.json of a run that failed (`failed: <error>`), with the traceback when there is one."""
    failed = {"name": name, "run_dir": str(run_dir), "status": f"failed: {error}", "error": error, "wall_time_s": round(seconds, 2)}
    write_results(run_dir, failed | ({"traceback": traceback} if traceback else {}))
