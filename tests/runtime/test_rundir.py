"""The run directory (lvm/runtime/rundir.py): claiming it (refused, cleared with overwrite, resumed),
the fresh start of ckpt_path=auto, and results.json (atomic, strict JSON, failures)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from lvm.runtime.errors import ConfigError
from lvm.runtime.rundir import RUN_OUTPUTS, auto_start_fresh, claim_run_dir, write_failure, write_results


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


def test_auto_start_fresh_only_without_a_checkpoint(tmp_path):
    auto, last = OmegaConf.create({"ckpt_path": "auto"}), OmegaConf.create({"ckpt_path": "last"})
    assert auto_start_fresh(auto, tmp_path)  # no checkpoints/ at all
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "notes.txt").write_text("x")
    assert auto_start_fresh(auto, tmp_path) and not auto_start_fresh(last, tmp_path)
    (tmp_path / "checkpoints" / "epoch=0.ckpt").write_text("ckpt")
    assert not auto_start_fresh(auto, tmp_path)


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
