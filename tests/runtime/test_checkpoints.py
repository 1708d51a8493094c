"""Checkpoints: any unreadable file is one clear line naming it; writes are atomic; no NaN model is saved."""

from __future__ import annotations

import json
import math
import os
import re
import resource
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from callbacks.fault import FaultInjection
from lvm.runtime.checkpoints import FORMAT, AtomicCheckpointIO, read_checkpoint
from lvm.runtime.cli import EXIT_FAIL
from lvm.runtime.errors import LvmError
from lvm.runtime.files import drop_rows_after
from lvm.training.run import run
from tests.helpers import ROOT, TINY, cfg_for

UNREADABLE = {
    "text": b"hello",  # torch's weights_only unpickler raised a bare KeyError on this
    "garbage": b"not a checkpoint at all",
    "empty": b"",
}


@pytest.mark.parametrize("content", UNREADABLE.values(), ids=UNREADABLE.keys())
def test_unreadable_file_is_an_lvm_error_naming_it(tmp_path, content):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(content)
    with pytest.raises(LvmError, match=r"checkpoint .*bad\.ckpt: cannot be loaded"):
        read_checkpoint(bad)


def test_a_tensor_or_foreign_dict_is_not_an_lvm_checkpoint(tmp_path):
    torch.save(torch.zeros(3), tmp_path / "t.ckpt")
    with pytest.raises(LvmError, match="t.ckpt: not an lvm training checkpoint"):
        read_checkpoint(tmp_path / "t.ckpt")
    torch.save({"state_dict": {}, "epoch": 0, "global_step": 0, "optimizer_states": [], "hyper_parameters": [1]}, tmp_path / "f.ckpt")
    with pytest.raises(LvmError, match="f.ckpt: hyper_parameters lack"):
        read_checkpoint(tmp_path / "f.ckpt")


def test_every_checkpoint_is_stamped_and_another_format_is_refused(tmp_path):
    """Resuming a checkpoint of another format is one line saying what to do, before any state loads."""
    run(cfg_for("trainer.max_epochs=1"), tmp_path / "a")
    last = tmp_path / "a" / "checkpoints" / "last.ckpt"
    for ckpt in (tmp_path / "a" / "checkpoints").glob("*.ckpt"):
        assert torch.load(ckpt, weights_only=True)["lvm_format"] == FORMAT, ckpt.name
    old = torch.load(last, weights_only=True)
    old["lvm_format"] = 0
    torch.save(old, tmp_path / "old.ckpt")
    with pytest.raises(LvmError, match=r"old\.ckpt: written by an lvm of another checkpoint format .*train it again"):
        run(cfg_for(f"ckpt_path={tmp_path / 'old.ckpt'}", "trainer.max_epochs=2"), tmp_path / "b")


def test_atomic_checkpoint_io_leaves_the_old_file_when_a_write_fails(tmp_path):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"a": torch.ones(2)}, path)
    before = path.read_bytes()
    with pytest.raises(Exception):
        io.save_checkpoint({"a": lambda: None}, path)  # torch.save cannot pickle a lambda
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary file left behind


# A file size limit above a TINY run's logs (< 20 KB) and below its checkpoints (> 100 KB).
FSIZE_LIMIT = 64 * 1024
FULL = "write failed for lack of disk space or a file size limit"


@contextmanager
def file_size_limit(n: int) -> Iterator[None]:
    """This process's soft RLIMIT_FSIZE at `n` bytes (Python ignores SIGXFSZ, so a write past it
    fails with EFBIG, as on a full disk); restored after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (n, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def test_a_checkpoint_write_over_a_file_size_limit_is_one_line_naming_the_file(tmp_path):
    """torch's writer said only `[enforce fail at inline_container.cc:672] unexpected pos ...`."""
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"a": torch.ones(2)}, path)
    before = path.read_bytes()
    with file_size_limit(FSIZE_LIMIT), pytest.raises(LvmError) as e:
        io.save_checkpoint({"a": torch.ones(2**16)}, path)  # 256 KiB
    assert str(e.value).startswith(f"checkpoint {path}: {FULL} (") and "\n" not in str(e.value)
    assert f"file size limit (ulimit -f): {FSIZE_LIMIT} bytes" in str(e.value)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary file left behind


@pytest.mark.slow  # fast: the in-process write under a real limit above
def test_a_run_over_a_file_size_limit_fails_with_one_line_and_keeps_its_checkpoints(tmp_path):
    """A real limit on a resumed run's process (setrlimit in the child): its first checkpoint write
    fails; results.json and stderr say which file and why, and the earlier checkpoints are intact."""
    run_dir = tmp_path / "run"
    run(cfg_for("trainer.max_epochs=1"), run_dir)
    ckpts = {p.name: p.read_bytes() for p in (run_dir / "checkpoints").iterdir()}
    assert min(len(b) for b in ckpts.values()) > FSIZE_LIMIT
    proc = subprocess.run(
        [sys.executable, "-m", "lvm.train", *TINY, "threads=1", "trainer.max_epochs=2", "ckpt_path=last", f"hydra.run.dir={run_dir}"],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (FSIZE_LIMIT, FSIZE_LIMIT)),
    )
    assert proc.returncode == EXIT_FAIL, proc.stderr[-2000:]
    results = json.loads((run_dir / "results.json").read_text())
    error = results["error"]
    assert re.fullmatch(rf"checkpoint {re.escape(str(run_dir / 'checkpoints'))}/[\w-]+\.ckpt: {FULL} \(.*\)[^\n]*", error), error
    assert results["status"] == f"failed: {error}"
    assert f"lvm.train: run failed: {error}" in proc.stderr and "enforce fail" not in proc.stderr
    assert {p.name: p.read_bytes() for p in (run_dir / "checkpoints").iterdir()} == ckpts  # nothing else left


def test_drop_rows_after_keeps_earlier_rows_and_drops_a_cut_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"epoch": e, "step": 6 * (e + 1)}) + "\n" for e in range(3)) + '{"epoch": 3, "st')
    assert drop_rows_after(path, 12) == 2
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [6, 12]
    assert drop_rows_after(tmp_path / "missing.jsonl", 0) == 0


def finite(path: Path) -> bool:
    return all(torch.isfinite(v).all() for v in torch.load(path, weights_only=True)["state_dict"].values())


def test_nan_model_is_never_saved_as_last_or_best(tmp_path, caplog):
    """Unguarded, a NaN at epoch 1 trains on: last.ckpt and best-*.ckpt keep epoch 0's finite model."""
    probe = run(cfg_for("guard=none", "trainer.max_epochs=1"), tmp_path / "probe")
    n = probe["global_step"]
    with caplog.at_level("WARNING"):
        results = run(cfg_for("guard=none", "trainer.max_epochs=3"), tmp_path / "run", extra_callbacks=[FaultInjection([n + 1])])
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert ckpts == ["best-epoch00.ckpt", "last.ckpt"]
    assert all(finite(tmp_path / "run" / "checkpoints" / name) for name in ckpts)
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 0
    assert "non-finite weights" in caplog.text
    assert results["status"] == "completed" and math.isnan(results["final"]["val/cos"])
    assert json.loads((tmp_path / "run" / "results.json").read_text())["final"]["val/cos"] is None  # strict JSON
