"""A run owns its directory: one writer at a time, what it writes there, when it may start there,
and its results file.

A run holds the directory's lock for its whole life. A directory that already holds a run is
resumed (the checkpoint lies in it), cleared (`overwrite=true`) or refused, before anything is
written, its log file and Hydra's record included (RunLog); results.json is written atomically and
as strict JSON (a NaN metric is null).
"""

from __future__ import annotations

import fcntl
import json
import logging
import logging.handlers
import os
import shutil
import socket
import time
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from lvm.runtime.errors import RunDirTaken
from lvm.runtime.files import atomic_write_text, strict_json

log = logging.getLogger(__name__)

# What a run writes into its directory (its log and Hydra's .hydra/ record aside: RunLog).
RUN_OUTPUTS = ("checkpoints", "tb", "eval", "metrics.jsonl", "events.jsonl", "results.json", "config.yaml")
LOCK = "run.lock"  # held (flock) by the run writing the directory; says its pid, host and start


class RunLock:
    """While entered, this process is the directory's only writer: an exclusive flock on
    <run_dir>/run.lock, which the kernel releases on any exit, kill -9 included. A second process is
    refused with RunDirTaken naming the holder; a lock file left by a killed run (not held) is taken
    over, and said. `hold=False` (the other ranks of a distributed run) takes nothing."""

    def __init__(self, run_dir: Path, hold: bool = True) -> None:
        self.path = Path(run_dir) / LOCK
        self.hold = hold
        self._file: IO[str] | None = None

    def __enter__(self) -> "RunLock":
        if not self.hold:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while self._file is None:
            f = self.path.open("a+", encoding="utf-8")
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                holder = f.read().strip() or "a process that has not yet said who it is"
                f.close()
                raise RunDirTaken(
                    f"run directory {self.path.parent} is in use by another run ({holder}; {self.path}): "
                    "wait for it to end, or pick another hydra.run.dir"
                ) from None
            try:
                same = os.fstat(f.fileno()).st_ino == self.path.stat().st_ino
            except FileNotFoundError:  # its holder removed it as we opened it: try again
                same = False
            if not same:
                f.close()
                continue
            f.seek(0)
            left = f.read().strip()
            if left:
                log.warning("Run directory %s: taking over the lock of %s, which ended without releasing it", self.path.parent, left)
            f.seek(0)
            f.truncate()
            f.write(f"pid {os.getpid()} on host {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
            f.flush()
            self._file = f
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._file is not None:
            self.path.unlink(missing_ok=True)  # before the unlock: a waiting opener then sees another inode
            self._file.close()
            self._file = None


class RunLog:
    """The run's log file and Hydra's record of its launch, written only once the run owns its
    directory. Hydra would open <job name>.log and write .hydra/ before any task code, into the
    directory of a run that then refuses it (conf/train.yaml turns both off); here the lines logged
    before `own` are held, then written to the file, or dropped if the run is refused. The file is
    train.log (rank r > 0: train.rank<r>.log), its lines formatted as the console's."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.held = logging.handlers.MemoryHandler(capacity=10**6, flushLevel=logging.CRITICAL + 1)
        self.file: logging.FileHandler | None = None

    def __enter__(self) -> "RunLog":
        logging.getLogger().addHandler(self.held)
        return self

    def own(self, task: DictConfig | None, rank: int = 0) -> None:
        """The directory is the run's: open this rank's log, held lines first, and write Hydra's
        record of `task` (the config Hydra launched; None on the ranks that do not write) when Hydra
        launched the run into this directory."""
        launched = HydraConfig.initialized() and Path(HydraConfig.get().runtime.output_dir).resolve() == self.run_dir.resolve()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if launched and task is not None:
            write_launch_record(self.run_dir, task)
        self.file = logging.FileHandler(self.run_dir / ("train.log" if rank == 0 else f"train.rank{rank}.log"))
        root = logging.getLogger()
        self.file.setFormatter(next((h.formatter for h in root.handlers if h.formatter is not None), None))
        root.removeHandler(self.held)
        self.held.setTarget(self.file)
        self.held.flush()
        root.addHandler(self.file)

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        root = logging.getLogger()
        root.removeHandler(self.held)
        self.held.setTarget(None)
        self.held.close()  # unflushed (refused): dropped
        if self.file is not None:
            root.removeHandler(self.file)
            self.file.close()


def write_launch_record(run_dir: Path, task: DictConfig) -> None:
    """Hydra's record of the job it launched into `run_dir`, as Hydra writes it (.hydra/config.yaml,
    hydra.yaml, overrides.yaml): what the sweep summary reads."""
    hydra_dir = Path(run_dir) / ".hydra"
    hydra_dir.mkdir(parents=True, exist_ok=True)
    hydra = HydraConfig.instance().cfg
    atomic_write_text(hydra_dir / "config.yaml", OmegaConf.to_yaml(task))
    atomic_write_text(hydra_dir / "hydra.yaml", OmegaConf.to_yaml(hydra))
    atomic_write_text(hydra_dir / "overrides.yaml", OmegaConf.to_yaml(hydra.hydra.overrides.task))


def claim_run_dir(run_dir: Path, ckpt_path: str | None, overwrite: bool) -> None:
    """A run owns its directory: one that already holds a run is resumed (the checkpoint lies in
    it; never a run that ended stopped), cleared (`overwrite=true`) or refused, before anything is written."""
    found = [name for name in RUN_OUTPUTS if (run_dir / name).exists()]
    if not found:
        return
    inside = ckpt_path is not None and Path(ckpt_path).resolve().is_relative_to(run_dir.resolve())
    if inside and overwrite:
        raise RunDirTaken(f"overwrite=true would delete the checkpoint this run resumes from ({ckpt_path}); drop one of them")
    if inside:
        results, status = read_results(run_dir)
        ended = str(results.get("fit_status", status))
        if ended.startswith("stopped:"):
            raise RunDirTaken(
                f"run directory {run_dir} ended `{ended}` (results.json): that stop stands, and resuming it from "
                f"{Path(ckpt_path).name} would train past it (best checkpoint: {results.get('best_checkpoint')}); "
                "start a new run (another hydra.run.dir, or overwrite=true)"
            )
        return
    if not overwrite:
        raise RunDirTaken(
            f"run directory {run_dir} already holds a run ({', '.join(found)}): resume it with ckpt_path=last "
            "(or ckpt_path=auto), pick another hydra.run.dir, or start over with overwrite=true (deletes those files)"
        )
    log.warning("overwrite=true: deleting %s from %s", ", ".join(found), run_dir)
    clear_run_outputs(run_dir)


def clear_run_outputs(run_dir: Path) -> None:
    """Delete what a run wrote into its directory (RUN_OUTPUTS; Hydra's files and the user's stay).
    A link (checkpoints kept on another disk) goes, never what it points to."""
    for path in (run_dir / name for name in RUN_OUTPUTS):
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.is_dir():
            shutil.rmtree(path)


# The weights a guarded run starts from (callbacks/rollback.py): the seed makes them again.
INITIAL = "good-initial.ckpt"


def start_over(run_dir: Path) -> bool:
    """Whether a run directory without a resume point has nothing to lose: an attempt killed before
    its first last.ckpt left only partial records and at most its initial weights, which a fresh
    start with the same seed writes again."""
    found = {p.name for p in (run_dir / "checkpoints").glob("*.ckpt")}
    if found - {INITIAL} or not read_results(run_dir)[1].startswith("failed"):
        return False
    if any((run_dir / name).exists() for name in RUN_OUTPUTS):
        log.warning("ckpt_path=auto: %s has no checkpoint beyond its initial weights: starting the run over", run_dir)
    return True


def read_results(run_dir: Path) -> tuple[dict[str, Any], str]:
    """A run directory's results.json and its status (completed, stopped: ..., preempted or
    failed: <error>); a missing, unreadable or status-less file is a status saying so."""
    path = run_dir / "results.json"
    if not path.is_file():
        return {}, "failed: no results.json"
    try:
        results = json.loads(path.read_text())
    except (ValueError, OSError) as e:
        return {}, f"failed: {path} is not readable JSON ({e})"
    if not isinstance(results, dict) or not isinstance(results.get("status"), str):
        return {}, f"failed: {path} has no status"
    return results, results["status"]


def newest_checkpoints(run_dir: Path, but: str) -> list[Path]:
    """The run's own checkpoints (checkpoints/*.ckpt) but `but`, newest first: where `auto` falls
    back to when last.ckpt cannot be read."""
    found = [p for p in (run_dir / "checkpoints").glob("*.ckpt") if p.name != but]
    return sorted(found, key=lambda p: p.stat().st_mtime_ns, reverse=True)


def set_aside(path: Path) -> Path:
    """Rename an unreadable checkpoint out of every *.ckpt pattern (kept for inspection)."""
    n = 0
    while (aside := path.with_name(f"{path.name}.corrupt{n or ''}")).exists():
        n += 1
    path.rename(aside)
    return aside


def write_results(run_dir: Path, results: dict[str, Any]) -> None:
    """results.json, strict JSON (a NaN metric is written as null), atomically."""
    atomic_write_text(run_dir / "results.json", json.dumps(strict_json(results), indent=2, allow_nan=False))


def write_failure(run_dir: Path, name: str, error: str, seconds: float, traceback: str | None = None) -> None:
    """results.json of a run that failed (`failed: <error>`), with the traceback when there is one."""
    failed = {"name": name, "run_dir": str(run_dir), "status": f"failed: {error}", "error": error, "wall_time_s": round(seconds, 2)}
    write_results(run_dir, failed | ({"traceback": traceback} if traceback else {}))
