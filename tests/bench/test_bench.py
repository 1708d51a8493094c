"""lvm.bench end to end, cut to a few steps: its one `bench:` line names every figure asked for.
The figures' values are the benchmark's to measure (docs/performance.md), not a unit test's."""

from __future__ import annotations

import re

from tests.helpers import TINY, run_module


def test_the_bench_line_carries_the_loop_and_detector_figures():
    proc = run_module(
        "lvm.bench",
        *TINY,
        "bench.figures=[loops,detectors]",
        "bench.steps=4",
        "bench.warmup=1",
        "bench.repeats=1",
        "trainer.precision=auto",
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert re.search(r"precision=auto: trainer.precision (32|bf16-mixed)", out), out[-3000:]  # resolved, not Lightning's error
    line = [x for x in proc.stdout.splitlines() if x.startswith("bench: ")]
    assert len(line) == 1, proc.stdout[-2000:]
    figures = dict(f.split("=", 1) for f in line[0].removeprefix("bench: ").split())
    assert set(figures) == {"lightning/raw", "callbacks_overhead", "detectors"}
    assert re.fullmatch(r"\d+\.\d\d", figures["lightning/raw"]) and float(figures["lightning/raw"]) > 0
    assert re.fullmatch(r"[+-]\d+\.\d%", figures["callbacks_overhead"])
    assert re.fullmatch(r"\d+\.\d\d%", figures["detectors"]) and float(figures["detectors"][:-1]) > 0
