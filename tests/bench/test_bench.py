"""lvm.bench end to end, cut to a few steps: its one `bench:` line names every figure asked for.
The figures' values are the benchmark's to measure (docs/performance.md), not a unit test's; the
FLOP count behind the training step's share of the GEMM limit is checked by hand."""

from __future__ import annotations

import re

import torch

from lvm.bench.fivecat_rate import training_step_flops
from lvm.bench.store import without_data_source
from lvm.model.module import LVMModule
from lvm.runtime.objects import to_plain
from tests.helpers import TINY, cfg_for, run_module


def test_the_bench_line_carries_the_loop_and_detector_figures():
    proc = run_module(
        "lvm.bench",
        *TINY,
        "bench.figures=[loops,detectors]",
        "bench.steps=4",
        "bench.warmup=1",
        "bench.repeats=1",
        "trainer.precision=auto",
        "threads=1",
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert re.search(r"precision=auto: trainer.precision (32|bf16-mixed)", out), out[-3000:]  # resolved, not Lightning's error
    line = [x for x in proc.stdout.splitlines() if x.startswith("bench: ")]
    assert len(line) == 1, proc.stdout[-2000:]
    figures = dict(f.split("=", 1) for f in line[0].removeprefix("bench: ").split())
    ratios, shares = ("lightning/raw", "bf16/fp32"), ("step_gemm_fp32", "step_gemm_bf16")
    assert set(figures) == {*ratios, *shares, "callbacks_overhead", "detectors"}
    for name in ratios:
        assert re.fullmatch(r"\d+\.\d\d", figures[name]) and float(figures[name]) > 0, (name, figures[name])
    for name in shares:  # three significant digits (this tiny model's step is ~0.002 of the limit)
        assert re.fullmatch(r"(0\.0*[1-9]\d\d|[1-9]\.\d\d)", figures[name]), (name, figures[name])
    assert re.fullmatch(r"[+-]\d+\.\d%", figures["callbacks_overhead"])
    assert re.fullmatch(r"\d+\.\d\d%", figures["detectors"]) and float(figures["detectors"][:-1]) > 0
    # Both precisions of the full loop were timed, and the one at the configured precision once only.
    assert re.search(r"best lightning_full_(fp32|bf16) ", out) and len(re.findall(r"best lightning_full ", out)) == 1, out[-3000:]


def test_training_step_flops_count_forward_and_backward_matmuls():
    """One decoder layer (self- and cross-attention), d_model 16, ffn 32, K = 5, D = 16, with the
    context skip: every product of the forward counted by hand, three times (forward, and the
    gradients to both operands), less the gradients to the data, which nothing needs (the input
    layer's and the context skip's)."""
    module = LVMModule(to_plain(cfg_for()), dim=16).eval()  # counted in training mode all the same
    assert module.model.block == "decoder" and module.model.skip_weights is not None
    b, k, dim, d, f = 8, 5, 16, 16, 32
    batch = {"context": torch.randn(b, k, dim), "target": torch.randn(b, dim)}
    attention = 2 * (2 * k * k * d)  # q @ k^T and weights @ v, all heads together
    self_attn = 2 * k * d * 3 * d + attention + 2 * k * d * d  # qkv, products, out-proj
    cross_attn = 2 * k * d * d + 2 * k * d * 2 * d + attention + 2 * k * d * d  # q, kv, products, out-proj
    ffn = 2 * (2 * k * d * f)
    data_input, skip = 2 * k * dim * d, 2 * k * dim  # the layers that read the data
    head = 2 * (d * d + d * dim)  # the last position only
    forward = data_input + self_attn + cross_attn + ffn + head + skip
    assert training_step_flops(module, batch) == b * (3 * forward - data_input - skip)  # 882,176
    assert not module.training and all(p.grad is None for p in module.parameters())  # mode kept, no .grad written


def test_the_two_rank_store_run_drops_only_the_data_source_overrides():
    given = ["model=p6", "data=synthetic", "data.synthetic.dim=768", "+data.path=x", "data.batch_size=64", "data.shuffle=block"]
    assert without_data_source(given) == ["model=p6", "data.batch_size=64", "data.shuffle=block"]
