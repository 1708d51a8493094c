"""`python -m lvm.train +experiment=p6b_v2`: compose the config, build data, model and callbacks, fit.

Each run writes into its own Hydra directory and nowhere else: checkpoints/ (best by val cosine,
last, optionally every epoch), tb/ (TensorBoard events), config.yaml (resolved), metrics.jsonl and
results.json. A directory that already holds a run is resumed (ckpt_path) or refused (lvm/runtime/rundir.py).

Every ending is written to results.json as `status` and gives the exit code (lvm/runtime/cli.py):
completed 0; failed: <error> 1; bad input, configuration or checkpoint (nothing written) 2;
stopped: max_rollbacks 3; preempted (SIGTERM/SIGUSR1: last.ckpt saved, resume with ckpt_path=last) 4;
interrupted (Ctrl-C: the same save) 130.
"""

from __future__ import annotations

import hashlib
import logging
import sys
import time
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from lvm.runtime.cli import (
    CONF_DIR,
    EXIT_BAD_INPUT,
    EXIT_FAIL,
    exit_code_for,
    run_entry_point,
    set_exit_code,
)
from lvm.runtime.errors import LvmError, RunDirTaken, RunFailed
from lvm.runtime.launchers import (
    launcher_choice,
    missing_launcher_plugin,
    own_gpu,
    resume_on_requeue,
    sweep_jobs,
)
from lvm.runtime.rundir import write_failure, write_launch_record
from lvm.training.run import run

log = logging.getLogger(__name__)

# Longest job directory name a sweep uses as is; longer ones (many overrides) are cut and hashed.
MAX_DIRNAME = 120


def short_dirname(overrides: str) -> str:
    """Sweep job directory name from Hydra's override_dirname, kept under filesystem limits."""
    if len(overrides) <= MAX_DIRNAME:
        return overrides
    return f"{overrides[: MAX_DIRNAME - 9]}_{hashlib.sha1(overrides.encode()).hexdigest()[:8]}"


OmegaConf.register_new_resolver("lvm_dirname", short_dirname, replace=True)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Returns the best val cosine (what a Hydra sweeper optimises); the exit code follows the
    run's status (see the module docstring)."""
    hc = HydraConfig.get()
    if hc.mode == RunMode.MULTIRUN:
        return run_sweep_job(cfg, hc)
    try:
        results = run(cfg, hc.runtime.output_dir, dict(hc.runtime.choices))
    except LvmError as e:
        print(f"lvm.train: {e}", file=sys.stderr)
        set_exit_code(EXIT_BAD_INPUT)
        return None
    except RunFailed as e:
        print(f"lvm.train: run failed: {e} (traceback in {hc.runtime.output_dir}/results.json)", file=sys.stderr)
        set_exit_code(EXIT_FAIL)
        return None
    set_exit_code(exit_code_for(results["status"]))
    return results["best_val_cos"]


def run_sweep_job(cfg: DictConfig, hc: Any) -> float | None:
    """One multirun job: a failure is logged and recorded in results.json, and the sweep goes on;
    Ctrl-C (the job ends `interrupted`) stops the sweep."""
    start = time.perf_counter()
    resume_on_requeue(cfg, hc)
    try:
        with own_gpu(cfg, hc):
            results = run(cfg, hc.runtime.output_dir, dict(hc.runtime.choices), jobs=sweep_jobs(hc))
    except RunFailed as e:  # run() has written results.json
        log.error("Job %s failed: %s", hc.job.num, e)
        return None
    except RunDirTaken as e:  # the directory is another run's: nothing is written into it
        log.error("Job %s refused: %s", hc.job.num, e)
        return None
    except LvmError as e:  # refused at start: record it in the job's own directory
        log.error("Job %s failed: %s", hc.job.num, e)
        write_launch_record(Path(hc.runtime.output_dir), cfg)
        write_failure(Path(hc.runtime.output_dir), cfg.name, str(e), time.perf_counter() - start)
        return None
    if results["status"] == "interrupted":  # Ctrl-C stops the sweep, not only this job
        log.warning("Sweep stopped by Ctrl-C in job %s: resume that job with ckpt_path=last in %s", hc.job.num, hc.runtime.output_dir)
        raise KeyboardInterrupt
    return results["best_val_cos"]


def cli() -> None:
    """`python -m lvm.train`: a missing launcher plugin is named with its pip extra before Hydra starts."""
    problem = missing_launcher_plugin(launcher_choice(sys.argv[1:]))
    if problem:
        print(f"lvm.train: {problem}", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT)
    run_entry_point(main)


if __name__ == "__main__":
    cli()
