"""lvm.bench.gpu: its table, run on the CPU (bench.device=cpu) so the script is known to work before
it meets a GPU; without CUDA the default says so and exits 2."""

from __future__ import annotations

import json

import pytest
import torch

from tests.helpers import TINY, run_module


@pytest.mark.slow
def test_bench_gpu_runs_every_variant_on_the_cpu(tmp_path):
    proc = run_module(
        "lvm.bench.gpu",
        "bench.device=cpu",
        "data=synthetic",
        "model=small",
        *TINY,
        "bench.batch_sizes=[16]",
        "bench.steps=3",
        "bench.warmup=1",
        f"bench.out={tmp_path}",
        "threads=1",
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "torch threads: 1 (threads=1" in proc.stdout + proc.stderr  # the tool's threads setting is applied
    report = json.loads((tmp_path / "bench_gpu.json").read_text())
    rows = report["rows"]
    assert {(r["batch"], r["precision"], r["data"]) for r in rows} == {
        (b, p, d) for b in (16,) for p in ("32", "bf16-mixed") for d in ("host", "device")
    }
    for r in rows:
        assert r["steps_per_s"] > 0 and abs(r["windows_per_s"] - r["steps_per_s"] * r["batch"]) < 0.01 * r["batch"]
        assert r["syncs_per_step"] is None  # counted on CUDA only
    assert "| batch | precision | data | steps/s |" in (tmp_path / "bench_gpu.md").read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is here: the no-CUDA message cannot show")
def test_bench_gpu_without_cuda_says_so():
    proc = run_module("lvm.bench.gpu", timeout=120)
    assert proc.returncode == 2 and "no CUDA device here (bench.device=cpu runs" in proc.stderr
