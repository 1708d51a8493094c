"""5CAT's speed against the machine's matmul limit (`make bench`, figure f), and the matmul FLOPs
of a training step, for the training step's share of the same limit (figure a, lvm/bench/loops.py).

5CAT is matmul work: every test is a forward of the model on changed contexts. Its limit on a
machine is the rate at which that machine multiplies matrices of the model's shapes. This module
counts the matmul FLOPs of the model forwards 5CAT runs (torch's FlopCounterMode, on one forward
per window), times a GEMM of the model's feed-forward shape (the largest share of those FLOPs) at
the same precision, and reports 5CAT's achieved FLOP rate over that GEMM rate: 1.0 would be every
second of 5CAT spent multiplying matrices at full speed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from lvm.data.store import Windows
from lvm.evaluation.fivecat import make_perturbation, score_windows
from lvm.model.module import LVMModule, predict_units
from lvm.runtime.precision import BF16, autocast


def _matmul_flops(module: LVMModule, work: Callable[[], object]) -> int:
    """The matmul FLOPs (mm, addmm, bmm, ...: what FlopCounterMode counts) of `work()`, run with
    `module` in training mode and on a forked RNG stream (dropout draws leave the run's stream
    alone); the module is left in the mode it came in. Training mode: in eval mode PyTorch's
    encoder layer takes a fused fast path whose matmuls the counter does not see (it counted the
    input and head layers only); dropout adds no matmul."""
    was = module.training
    module.train()
    try:
        with torch.random.fork_rng(devices=[]), FlopCounterMode(display=False) as counter:
            work()
    finally:
        module.train(was)
    return counter.get_total_flops()


def forward_flops(module: LVMModule, context: torch.Tensor) -> float:
    """Matmul FLOPs of one forward of `context` [B, K, D], per window (counted in training mode)."""
    with torch.no_grad():
        return _matmul_flops(module, lambda: module(context)) / len(context)


def training_step_flops(module: LVMModule, batch: Mapping[str, torch.Tensor]) -> int:
    """Matmul FLOPs of one training step on `batch` (its `context` [B, K, D] and `target`), all
    windows together: the model's forward, the loss (as the training step computes it, with the
    module's skip rule and knobs) and the backward to every parameter's gradient (the products
    `loss.backward()` makes, taken with autograd.grad: no `.grad` is touched), in training mode.

    Counted, from the shapes: every linear layer and attention product forward, and in the
    backward each one's gradients to its inputs and weights (the first layer's input, the data,
    needs none). Not counted, being no matmul work: elementwise work (activations, norms,
    softmax, dropout, the loss's cosines), the optimizer's update and gradient clipping, and the
    step's statistics (batch_health, the two gradients of dir_grad_share, to the output only)."""
    context, target = batch["context"], batch["target"]
    params = [p for p in module.parameters() if p.requires_grad]

    def step() -> None:
        raw, _ = module.model(context)
        terms = module.loss(raw, target, context[:, module.prev_slot], module.skip)
        torch.autograd.grad(terms.loss, params, allow_unused=True)

    return _matmul_flops(module, step)


def gemm_flops_per_s(m: int, k: int, n: int, precision: str, seconds: float = 1.0) -> float:
    """Best FLOP/s of [m, k] @ [k, n] on the CPU, in bf16 for `bf16-mixed` (inputs already bf16:
    what autocast's matmuls see), over about `seconds` of repeats."""
    dtype = torch.bfloat16 if precision == BF16 else torch.float32
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    torch.mm(a, b)  # warm-up
    best, end = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < end:
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2.0 * m * k * n / best


@dataclass(frozen=True)
class FiveCatRate:
    precision: str
    windows: int
    forwards_per_window: float
    seconds: float
    windows_per_s: float
    achieved_gflops: float
    gemm_gflops: float

    @property
    def of_limit(self) -> float:
        return self.achieved_gflops / self.gemm_gflops


def fivecat_rate(
    module: LVMModule, windows: Windows, n: int, horizon: int, batch_size: int, precision: str, model_cfg: Mapping[str, Any]
) -> FiveCatRate:
    """5CAT's model work on `n` windows at `precision`: windows/s and matmul FLOP rate, against the
    GEMM rate of the model's feed-forward shape at the rows one 5CAT forward holds. The module
    is left in the mode it came in."""
    was = module.training
    module.eval()
    rows = 0

    def predictor(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        nonlocal rows
        rows += len(batch["context"])
        return predict_units(module, batch["context"], batch_size, precision)

    index = torch.arange(min(n, len(windows)))
    perturb = make_perturbation(windows, index, 0)
    start = time.perf_counter()
    score_windows(predictor, windows, index, perturb, horizon, batch_size)
    seconds = time.perf_counter() - start
    context = windows.gather(index[:batch_size])["context"]
    with autocast(precision, "cpu"):
        flops = forward_flops(module, context) * rows
    k = context.shape[1]
    gemm = gemm_flops_per_s(batch_size * k, model_cfg["d_model"], model_cfg["ffn"], precision)
    module.train(was)
    return FiveCatRate(precision, len(index), rows / len(index), seconds, len(index) / seconds, flops / seconds / 1e9, gemm / 1e9)
