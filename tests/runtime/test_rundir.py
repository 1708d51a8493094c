"""The run directory (lvm/runtime/rundir.py): its lock (one writer), claiming it (refused, cleared
with overwrite, resumed), what ckpt_path=auto may start over or fall back to, and results.json
(atomic, strict JSON, failures)."""

from __future__ import annotations

import io
import json
import logging
import math
import os
import signal
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from lvm.runtime.errors import ConfigError, RunDirTaken
from lvm.runtime.rundir import (
    LOCK,
    RUN_OUTPUTS,
    RunLock,
    RunLog,
    claim_run_dir,
    newest_checkpoints,
    read_results,
    set_aside,
    start_over,
    write_failure,
    write_results,
)
from tests.helpers import hold_lock


def populate(run_dir: Path) -> None:
    """Every run output (folders with a file inside), plus Hydra's files and a file of the user."""
    for name in RUN_OUTPUTS:
        path = run_dir / name
        if "." in name:
            path.write_text("{}")
        else:
            (path / "sub").mkdir(parents=True)
            (path / "sub" / "f.txt").write_text("x")
    (run_dir / ".hydra").mkdir()
    (run_dir / ".hydra" / "config.yaml").write_text("a: 1")
    (run_dir / "train.log").write_text("log")
    (run_dir / "notes.txt").write_text("mine")


def strict_load(path: Path):
    return json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))


def test_empty_or_unrelated_directory_is_claimed_untouched(tmp_path):
    claim_run_dir(tmp_path / "missing", None, overwrite=False)  # a directory not made yet
    (tmp_path / "train.log").write_text("log")
    (tmp_path / "notes.txt").write_text("mine")
    claim_run_dir(tmp_path, None, overwrite=False)
    claim_run_dir(tmp_path, None, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "train.log"]  # nothing made, nothing deleted
    assert (tmp_path / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("name", RUN_OUTPUTS)
def test_any_single_output_makes_the_directory_a_run(tmp_path, name):
    (tmp_path / name).mkdir() if "." not in name else (tmp_path / name).write_text("{}")
    with pytest.raises(ConfigError, match=rf"already holds a run \({name}\)"):
        claim_run_dir(tmp_path, None, overwrite=False)
    assert (tmp_path / name).exists()  # refused before anything is deleted


def test_refused_without_checkpoint_names_what_it_found(tmp_path):
    populate(tmp_path)
    with pytest.raises(ConfigError) as err:
        claim_run_dir(tmp_path, None, overwrite=False)
    assert ", ".join(RUN_OUTPUTS) in str(err.value) and "overwrite=true" in str(err.value)
    assert all((tmp_path / n).exists() for n in RUN_OUTPUTS)


def test_overwrite_deletes_only_the_run_outputs(tmp_path):
    populate(tmp_path)
    claim_run_dir(tmp_path, None, overwrite=True)
    assert not any((tmp_path / n).exists() for n in RUN_OUTPUTS)
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    assert left == [".hydra", ".hydra/config.yaml", "notes.txt", "train.log"]
    assert (tmp_path / "notes.txt").read_text() == "mine" and (tmp_path / "train.log").read_text() == "log"


def test_overwrite_with_an_outside_checkpoint_clears(tmp_path):
    run_dir, other = tmp_path / "run", tmp_path / "other"
    run_dir.mkdir()
    populate(run_dir)
    (other / "checkpoints").mkdir(parents=True)
    (other / "checkpoints" / "last.ckpt").write_text("ckpt")
    ckpt = str(other / "checkpoints" / "last.ckpt")
    with pytest.raises(ConfigError, match="already holds a run"):
        claim_run_dir(run_dir, ckpt, overwrite=False)  # a checkpoint of another run does not resume this one
    claim_run_dir(run_dir, ckpt, overwrite=True)
    assert not (run_dir / "checkpoints").exists() and (other / "checkpoints" / "last.ckpt").exists()


def test_resume_from_a_checkpoint_inside_keeps_everything(tmp_path):
    populate(tmp_path)
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    ckpt.write_text("ckpt")
    before = sorted(tmp_path.rglob("*"))
    claim_run_dir(tmp_path, str(ckpt), overwrite=False)
    # The same checkpoint named through a relative path with ".." still lies inside.
    claim_run_dir(tmp_path / "eval", str(tmp_path / "eval" / ".." / "checkpoints" / "last.ckpt"), overwrite=False)
    assert sorted(tmp_path.rglob("*")) == before
    with pytest.raises(ConfigError, match="would delete the checkpoint"):
        claim_run_dir(tmp_path, str(ckpt), overwrite=True)
    assert ckpt.read_text() == "ckpt"


def test_auto_starts_over_only_when_nothing_beyond_the_initial_weights_is_there(tmp_path):
    assert start_over(tmp_path)  # nothing at all
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    (ckpts / "good-initial.ckpt").write_text("ckpt")
    (tmp_path / "config.yaml").write_text("a: 1")
    assert start_over(tmp_path)  # killed before its first last.ckpt: partial records only
    (tmp_path / "results.json").write_text('{"status": "failed: boom"}')
    assert start_over(tmp_path)
    (tmp_path / "results.json").write_text('{"status": 5}')
    assert read_results(tmp_path) == ({}, f"failed: {tmp_path / 'results.json'} has no status")
    assert start_over(tmp_path)  # a record that says no ending is no finished run
    (tmp_path / "results.json").write_text('{"status": "completed"}')
    assert not start_over(tmp_path)  # a finished run's record is worth keeping
    (tmp_path / "results.json").unlink()
    (ckpts / "good-epoch00.ckpt").write_text("ckpt")
    assert not start_over(tmp_path)  # an epoch was trained


def test_newest_checkpoints_first_and_an_unreadable_one_set_aside(tmp_path):
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    for i, name in enumerate(["good-initial.ckpt", "good-epoch00.ckpt", "best-epoch01.ckpt", "last.ckpt"]):
        (ckpts / name).write_text(name)
        os.utime(ckpts / name, ns=(10**9 * (i + 1),) * 2)
    assert [p.name for p in newest_checkpoints(tmp_path, but="last.ckpt")] == [
        "best-epoch01.ckpt",
        "good-epoch00.ckpt",
        "good-initial.ckpt",
    ]
    assert set_aside(ckpts / "last.ckpt").name == "last.ckpt.corrupt"
    (ckpts / "last.ckpt").write_text("again")
    assert set_aside(ckpts / "last.ckpt").name == "last.ckpt.corrupt1"
    assert (ckpts / "last.ckpt.corrupt").read_text() == "last.ckpt" and not (ckpts / "last.ckpt").exists()
    assert "last.ckpt.corrupt" not in [p.name for p in newest_checkpoints(tmp_path, but="last.ckpt")]


def test_a_second_writer_is_refused_naming_the_holder(tmp_path):
    holder = hold_lock(tmp_path)
    try:
        with pytest.raises(RunDirTaken, match=rf"in use by another run \(pid {holder.pid} on host {socket.gethostname()} since "):
            with RunLock(tmp_path):
                pytest.fail("entered a directory another process holds")
    finally:
        holder.kill()
        holder.wait()


def test_a_lock_left_by_a_killed_run_is_taken_over_and_said(tmp_path, caplog):
    holder = hold_lock(tmp_path)
    os.kill(holder.pid, signal.SIGKILL)  # kill -9: the file stays, the kernel drops the lock
    holder.wait()
    assert f"pid {holder.pid}" in (tmp_path / LOCK).read_text()
    with caplog.at_level(logging.WARNING), RunLock(tmp_path):
        assert f"pid {os.getpid()} on host" in (tmp_path / LOCK).read_text()
    assert f"taking over the lock of pid {holder.pid} on host" in caplog.text
    assert not (tmp_path / LOCK).exists()  # released on exit


def test_the_lock_is_released_on_any_exit_and_other_ranks_take_none(tmp_path):
    with pytest.raises(RuntimeError), RunLock(tmp_path):
        raise RuntimeError("a failed run")
    assert not (tmp_path / LOCK).exists()
    with RunLock(tmp_path), RunLock(tmp_path / "x", hold=False):
        assert not (tmp_path / "x").exists()
    with RunLock(tmp_path):  # free again
        pass


def test_the_run_log_holds_its_lines_until_the_directory_is_the_runs(tmp_path, monkeypatch):
    """Lines logged before `own` reach the file after it, in order and formatted as the console's;
    a refused run writes none; the file handler goes with the run (a sequential sweep's next job
    logs into its own file); a rank other than 0 writes its own file."""
    run_log = logging.getLogger("lvm.test_runlog")
    root = logging.getLogger()
    console = logging.StreamHandler(io.StringIO())
    console.setFormatter(logging.Formatter("<%(name)s|%(levelname)s> %(message)s"))
    monkeypatch.setattr(root, "handlers", [console])
    handlers = list(root.handlers)
    with RunLog(tmp_path / "refused"):
        run_log.warning("before the claim")
    assert not (tmp_path / "refused").exists() and root.handlers == handlers
    with RunLog(tmp_path / "run") as owned:
        run_log.warning("one")
        owned.own(None)  # outside Hydra: train.log, no .hydra/
        run_log.warning("two")
    run_log.warning("after the run")
    assert root.handlers == handlers
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["train.log"]
    assert (tmp_path / "run" / "train.log").read_text().splitlines() == ["<lvm.test_runlog|WARNING> one", "<lvm.test_runlog|WARNING> two"]
    with RunLog(tmp_path / "run") as second_rank:
        second_rank.own(None, rank=1)
        run_log.warning("three")
    assert (tmp_path / "run" / "train.rank1.log").read_text() == "<lvm.test_runlog|WARNING> three\n"
    assert "three" not in (tmp_path / "run" / "train.log").read_text()


def test_results_are_strict_json_and_replace_the_old_file(tmp_path):
    (tmp_path / "results.json").write_text("old")
    results = {"val": {"cos": math.nan, "r5": np.float32(0.5), "n": torch.tensor(3)}, "inf": [math.inf, -math.inf, 1.25], 7: "x"}
    write_results(tmp_path, results)
    assert strict_load(tmp_path / "results.json") == {"val": {"cos": None, "r5": 0.5, "n": 3}, "inf": [None, None, 1.25], "7": "x"}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temporary file left


def test_unserialisable_results_leave_the_old_file(tmp_path):
    write_results(tmp_path, {"status": "ok"})
    with pytest.raises(TypeError):
        write_results(tmp_path, {"status": object()})
    assert strict_load(tmp_path / "results.json") == {"status": "ok"}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_write_failure(tmp_path):
    write_failure(tmp_path, "job", "boom", 12.3456, traceback="Traceback: ...")
    expected = {"name": "job", "run_dir": str(tmp_path), "status": "failed: boom", "error": "boom", "wall_time_s": 12.35}
    assert strict_load(tmp_path / "results.json") == {**expected, "traceback": "Traceback: ..."}
    write_failure(tmp_path, "job", "boom", 1.0)
    assert strict_load(tmp_path / "results.json") == {**expected, "wall_time_s": 1.0}


def test_overwrite_removes_a_linked_output_folder_but_not_what_it_points_to(tmp_path):
    run_dir, disk = tmp_path / "run", tmp_path / "big_disk"
    (disk / "ckpts").mkdir(parents=True)
    (disk / "ckpts" / "epoch=0.ckpt").write_text("ckpt")
    run_dir.mkdir()
    (run_dir / "checkpoints").symlink_to(disk / "ckpts", target_is_directory=True)  # checkpoints kept on another disk
    claim_run_dir(run_dir, None, overwrite=True)
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "checkpoints").is_symlink()
    assert (disk / "ckpts" / "epoch=0.ckpt").read_text() == "ckpt"  # outside the run directory: untouched
