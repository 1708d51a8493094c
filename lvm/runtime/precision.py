"""Numeric precision by measurement: fp32, or bf16 autocast where the hardware makes it pay.

`trainer.precision` and `eval.precision` take `32` (also Lightning's `32-true`), `bf16-mixed` or
`auto`. `auto` times fp32 and bf16 autocast on real batches of the run's own model (forward and
backward for training, forward only for evaluation) and keeps bf16 only when it is at least
`min_speedup` times faster and its predictions agree with fp32's to `min_cos` on every window
(`eval.precision_auto`, conf/eval/original.yaml). The model's output is cast to fp32 (lvm/model/transformer.py), so the loss,
the metrics and the guard's statistics are fp32 whatever the precision.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch

from lvm.runtime.errors import ConfigError

log = logging.getLogger(__name__)

FP32, BF16 = "32", "bf16-mixed"
PRECISIONS = (FP32, "32-true", BF16, "auto")


def check_precision(setting: str, value: Any) -> str:
    """A precision setting, checked: its canonical name (`32-true` reads `32`)."""
    if value not in PRECISIONS and str(value) not in PRECISIONS:
        raise ConfigError(f"{setting} must be 32, bf16-mixed or auto (got {value!r})")
    return FP32 if str(value) in ("32", "32-true") else str(value)


def autocast(precision: str, device: torch.device | str) -> contextlib.AbstractContextManager:
    """bf16 autocast on `device` for `bf16-mixed`; nothing for fp32."""
    if precision == BF16:
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@dataclass(frozen=True)
class Measurement:
    """What `auto` measured and chose."""

    chosen: str
    fp32_ms: float
    bf16_ms: float | None
    speedup: float | None
    min_cos: float | None
    reason: str


def measure(model: torch.nn.Module, context: torch.Tensor, target: torch.Tensor | None, settings: Mapping[str, Any]) -> Measurement:
    """Time fp32 and bf16 on `context` with a copy of `model` (forward and backward when `target`
    is given, forward only otherwise; the model is left as it was) and choose."""
    probe = copy.deepcopy(model).train(target is not None)
    fp32 = _best_ms(probe, context, target, FP32, settings["batches"])
    try:
        bf16 = _best_ms(probe, context, target, BF16, settings["batches"])
        agree = agreement(probe, context)
    except RuntimeError as e:  # no bf16 kernels on this device
        return Measurement(FP32, fp32, None, None, None, f"bf16 does not run here ({e})")
    speedup = fp32 / bf16
    if not agree >= settings["min_cos"]:
        chosen, reason = FP32, f"bf16 predictions agree with fp32 only to cos {agree:.5f} (< {settings['min_cos']})"
    elif speedup < settings["min_speedup"]:
        chosen, reason = FP32, f"bf16 is {speedup:.2f}x fp32's speed (< {settings['min_speedup']}x)"
    else:
        chosen, reason = BF16, f"bf16 is {speedup:.2f}x faster and agrees to cos {agree:.5f}"
    return Measurement(chosen, fp32, bf16, round(speedup, 3), round(agree, 6), reason)


@torch.no_grad()
def agreement(model: torch.nn.Module, context: torch.Tensor) -> float:
    """The lowest cosine between a window's bf16 and fp32 predictions (dropout off)."""
    was = model.training
    model.eval()
    ref = model(context)[1]
    with autocast(BF16, context.device):
        low = float(torch.nn.functional.cosine_similarity(model(context)[1].float(), ref, dim=-1).min())
    model.train(was)
    return low


def _best_ms(model: torch.nn.Module, context: torch.Tensor, target: torch.Tensor | None, precision: str, batches: int) -> float:
    """Best milliseconds per pass of `batches` timed passes (after two untimed ones)."""
    best = float("inf")
    for i in range(batches + 2):
        start = time.perf_counter()
        with autocast(precision, context.device), torch.set_grad_enabled(target is not None):
            raw = model(context)[0]
            if target is not None:
                torch.nn.functional.mse_loss(raw.float(), target).backward()
        if context.device.type == "cuda":
            torch.cuda.synchronize(context.device)
        if i >= 2:
            best = min(best, 1e3 * (time.perf_counter() - start))
    model.zero_grad(set_to_none=True)
    return round(best, 3)


def resolve_precision(
    setting: str, value: Any, model: torch.nn.Module, context: torch.Tensor, target: torch.Tensor | None, settings: Mapping[str, Any]
) -> tuple[str, dict[str, Any] | None]:
    """The precision to use for `value` (measured when `auto`) and the measurement, logged."""
    value = check_precision(setting, value)
    if value != "auto":
        return value, None
    m = measure(model, context, target, settings)
    log.info(
        "%s=auto: %s (fp32 %.2f ms, bf16 %s ms per pass of %d windows): %s", setting, m.chosen, m.fp32_ms, m.bf16_ms, len(context), m.reason
    )
    return m.chosen, asdict(m)
