"""Small builders shared by the tests: the repository root, composed configs, CLI runs, unit vectors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from hydra import compose, initialize_config_dir

from lvm.data.store import WindowSpec

ROOT = Path(__file__).resolve().parents[1]
P6 = WindowSpec(context=5, target_offset=2, prev_slot=-2)
STANDARD = WindowSpec(context=5, target_offset=1, prev_slot=-1)


def unit_rows(n: int, d: int, seed: int = 0) -> np.ndarray:
    """n random unit vectors of dimension d, float32."""
    x = np.random.default_rng(seed).standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def compose_cfg(config_name: str, *overrides: str, **kwargs):
    """A root config of conf/ composed with `overrides`, as the command line would."""
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name, overrides=list(overrides), **kwargs)


def run_module(module: str, *args: str, cwd: Path = ROOT, timeout: int = 600, threads: int | None = None) -> subprocess.CompletedProcess:
    """`python -m module args...` run from `cwd` with the repository importable; output captured."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
