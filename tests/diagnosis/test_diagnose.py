"""`python -m lvm.diagnosis.diagnose` (lvm/diagnosis/diagnose.py and report.py): the CLI end to
end, its outputs, and bad inputs."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from lvm.data.mapped import StoreWriter
from lvm.diagnosis.diagnose import run
from lvm.runtime.errors import ConfigError, DataError
from tests.helpers import THETA, compose_cfg, rotation_store, run_module, unit_rows

# ----------------------------------------------------------------------------- CLI


def write_store(path: Path, store_lengths: list[int] | None = None, **arrays) -> Path:
    if not arrays:
        lengths = store_lengths or [12, 15, 9, 20, 14, 11, 18, 10, 16, 13]
        store = rotation_store(lengths)
        arrays = {"vectors": store.vectors.numpy(), "article_indices": store.article_ids, "chunk_indices": store.chunk_indices}
    np.savez(path, **arrays)
    return path


def cfg(*overrides: str):
    return compose_cfg("diagnose", *overrides, "progress=false", "bootstrap=50", "pairs=2000")


def cli(*args: str) -> subprocess.CompletedProcess:
    return run_module("lvm.diagnosis.diagnose", *args, "progress=false", "bootstrap=50", "pairs=2000", "threads=1", timeout=120)


def test_cli_end_to_end(tmp_path):
    path = write_store(tmp_path / "my store.npz")
    proc = cli(str(path), "max_offset=2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "torch threads: 1 (threads=1" in proc.stdout + proc.stderr  # it set none before
    out = tmp_path / "diagnose"
    report = json.loads((out / "diagnose.json").read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert report["store"]["path"] == str(path) and report["settings"]["max_offset"] == 2
    assert report["windows"]["decay"]["mean"][0] == pytest.approx(np.cos(THETA), abs=1e-5)
    md = (out / "diagnose.md").read_text()
    assert "MISMATCHED" in md and "## Baselines on held-out articles" in md
    assert (out / "diagnose.png").read_bytes()[:4] == b"\x89PNG"
    assert str(out / "diagnose.md") in proc.stdout


def test_cli_bad_input_exits_2_naming_the_file(tmp_path):
    missing = tmp_path / "nope.npz"
    proc = cli(str(missing))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and str(missing) in proc.stderr


def test_bad_inputs_name_the_file(tmp_path):
    no_key = write_store(tmp_path / "nokey.npz", vectors=unit_rows(10, 4), chunk_indices=np.arange(10))
    short = write_store(
        tmp_path / "short.npz", vectors=unit_rows(8, 4), article_indices=np.repeat([0, 1], 4), chunk_indices=np.r_[0:4, 0:4]
    )
    for path, words in ((tmp_path / "nope.npz", "no such file"), (no_key, "article_indices"), (short, "no window")):
        with pytest.raises(DataError) as e:
            run(cfg(f"store={path}", f"out_dir={tmp_path / 'o'}"))
        assert str(path) in str(e.value) and words in str(e.value), str(e.value)
    with pytest.raises(ConfigError, match="no store given"):
        run(cfg())
    with pytest.raises(ConfigError, match="split.val"):
        run(cfg(f"store={short}", "split.val=1.5"))


def test_a_store_directory_diagnoses_like_the_same_store_as_npz(tmp_path):
    """A store directory (lvm.corpus.build's output) gives the NPZ's report, and its default out_dir
    is diagnose/ beside it (a build's out_dir/store gives out_dir/diagnose)."""
    npz = write_store(tmp_path / "store.npz")
    z = np.load(npz)
    with StoreWriter(tmp_path / "build" / "store", z["vectors"].shape[1]) as writer:
        writer.add(z["vectors"], z["article_indices"], z["chunk_indices"])
    from_dir = run(cfg(f"store={tmp_path / 'build' / 'store'}"))
    from_npz = run(cfg(f"store={npz}", f"out_dir={tmp_path / 'npz'}"))
    assert from_dir["outputs"]["json"] == str(tmp_path / "build" / "diagnose" / "diagnose.json")

    def numbers(report: dict) -> dict:
        """The report without what names the input, its outputs or timings."""
        kept = {k: v for k, v in report.items() if k not in ("settings", "outputs", "seconds_total")}
        return kept | {"store": {**kept["store"], "path": None}, "seconds": None}

    assert numbers(from_dir) == numbers(from_npz)
    assert from_dir["store"] == from_npz["store"] | {"path": str(tmp_path / "build" / "store")}
    with StoreWriter(tmp_path / "half", z["vectors"].shape[1], "float16") as writer:
        writer.add(z["vectors"], z["article_indices"], z["chunk_indices"])
    half = run(cfg(f"store={tmp_path / 'half'}"))  # float16 storage, read as float32 rows
    assert half["adjacent"]["mean"] == pytest.approx(from_npz["adjacent"]["mean"], abs=1e-3)
