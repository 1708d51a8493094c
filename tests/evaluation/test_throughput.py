"""5CAT against the matmul limit (lvm/bench/fivecat_rate.py): the forwards and FLOPs it counts."""

from __future__ import annotations

import pytest
import torch

from lvm.bench.fivecat_rate import fivecat_rate, forward_flops, gemm_flops_per_s
from lvm.evaluation import fivecat as F5
from lvm.model.module import LVMModule
from lvm.runtime.objects import to_plain
from lvm.training.build import build_data
from tests.helpers import cfg_for


def test_forward_flops_count_the_models_matmuls():
    """One-layer encoder, d_model 16, ffn 32, K = 5, D = 16, no context skip: the linear layers'
    2*in*out FLOPs per token (input, attention in/out projections, feed-forward, head) plus the
    attention's two [K, K] products, counted by hand."""
    cfg = cfg_for("model.block=encoder", "model.context_skip=false")
    module = LVMModule(to_plain(cfg), dim=16).eval()
    context = torch.randn(4, 5, 16)
    k, d, f = 5, 16, 32
    linear = k * 2 * (16 * d + d * 3 * d + d * d + d * f + f * d)  # per window: input, qkv, out-proj, ffn
    attention = 2 * (2 * k * k * d)  # q @ k^T and weights @ v over all heads together
    head = 2 * (d * d + d * 16)  # the head reads the last position only
    assert forward_flops(module, context) == pytest.approx(linear + attention + head, rel=0.01)


def test_fivecat_rate_counts_every_forward_it_makes():
    cfg = cfg_for()
    splits = build_data(cfg)
    module = LVMModule(to_plain(cfg), dim=16)
    windows = splits["val"]
    horizon = cfg.eval.horizon
    rate = fivecat_rate(module, windows, 50, horizon, 16, "32", to_plain(cfg)["model"])
    assert module.training  # left in the mode it came in (it was left in eval mode)
    n = min(50, len(windows))
    rows = windows.gather(torch.arange(n))["target_row"]
    _, ok = F5.rows_at(windows.store, rows, [h * windows.spec.target_offset for h in range(horizon)])
    k = windows.spec.context
    # One stacked forward of base + shuffle + reverse + K dropped slots + repeat-last + cross-article,
    # then the rollout's steps after its first (which is the base prediction).
    expected = (5 + k) + (horizon - 1) * float(ok.float().mean())
    assert rate.windows == n and rate.forwards_per_window == pytest.approx(expected)
    assert rate.windows_per_s == pytest.approx(n / rate.seconds)
    # The FLOP rate is the hand-checked per-window forward count (test above) times the forwards
    # made, over the time taken; the fraction of the limit is that rate over the GEMM rate.
    per_forward = forward_flops(module, windows.gather(torch.arange(16))["context"])
    assert rate.achieved_gflops == pytest.approx(per_forward * n * expected / rate.seconds / 1e9, rel=1e-6)
    assert rate.of_limit == pytest.approx(rate.achieved_gflops / rate.gemm_gflops)


def test_gemm_rate_is_flops_over_time():
    assert gemm_flops_per_s(64, 64, 64, "32", seconds=0.05) > 1e6
