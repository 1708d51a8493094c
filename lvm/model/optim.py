"""AdamW that can drop an update by a 0/1 factor on the device, and the rolling statistics that decide it.

torch's AdamW takes no such factor as an argument. Zeroing the gradient still moves the weights
(momentum and weight decay); setting the learning rate to 0 for one step needs the decision on the
host (a sync per step) and still feeds the spike, or a NaN, into the moments, where a NaN stays for
good. Its fused kernel does have one: `found_inf`, the flag torch's GradScaler hands it, skips the
whole update on the device and leaves the step count as it was. DroppableAdamW is that kernel with
`found_inf` = 1 - `keep`: `keep` = 0 leaves parameters, both moments and the step count exactly as
they were; `keep` = 1 is torch's AdamW (tests/model/test_optim.py pins both).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from lvm.runtime.errors import ConfigError

IMPLEMENTATION = ("fused", "foreach")


def grad_norm(params: Iterable[torch.nn.Parameter]) -> torch.Tensor:
    """The total L2 norm of the parameters' gradients, as a float32 device tensor (no host sync)."""
    grads = [p.grad for p in params if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))).float()


class DroppableAdamW(torch.optim.AdamW):
    def __init__(
        self,
        params: Iterable[torch.nn.Parameter],
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        fused: bool = True,
    ) -> None:
        if not fused:
            raise ConfigError("guard.spike.drop needs optim.optimizer.fused=true: only torch's fused AdamW drops an update on the device")
        super().__init__(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, fused=True)
        self.keep: torch.Tensor | None = None  # 0-dim 0/1, set (after backward) for the coming step

    @property
    def found_inf(self) -> torch.Tensor | None:
        """What torch's fused step reads, after the closure (backward, then `keep`) has run."""
        return None if self.keep is None else (self.keep <= 0).float()


def keep_implementation(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """`optimizer`, keeping its implementation flags (fused, foreach: the config's) when it loads a
    checkpoint's state (a resume, a rollback), which replaces the param groups whole, flags included."""
    chosen = [{k: g[k] for k in IMPLEMENTATION if k in g} for g in optimizer.param_groups]

    def restore(opt: torch.optim.Optimizer) -> None:
        for group, flags in zip(opt.param_groups, chosen, strict=True):
            group.update(flags)

    optimizer.register_load_state_dict_post_hook(restore)
    return optimizer


class RollingStat:
    """Mean and std of a scalar's finite values over its last `window` steps, on the device (no
    host sync): a ring buffer written at a host-side position that every rank advances alike."""

    def __init__(self, window: int) -> None:
        self.window = window
        self.values: torch.Tensor | None = None
        self.valid: torch.Tensor | None = None
        self.pos = 0

    def score(self, x: torch.Tensor, min_history: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(x - mean) / std of the history, and x / mean; both 0 until it holds `min_history` values."""
        if self.values is None:
            self.values = torch.zeros(self.window, device=x.device)
            self.valid = torch.zeros(self.window, dtype=torch.bool, device=x.device)
        w = self.valid.float()
        n = w.sum()
        mean = self.values.dot(w) / n.clamp(min=1)
        dev = (self.values - mean) * w
        std = (dev.dot(dev) / (n - 1).clamp(min=1)).sqrt()
        tiny = torch.finfo(torch.float32).eps * mean.abs().clamp(min=1.0)
        z, ratio = (x - mean) / std.clamp(min=tiny), x / mean.clamp(min=tiny)
        enough = n >= min_history
        return torch.where(enough, z, torch.zeros_like(z)), torch.where(enough, ratio, torch.zeros_like(ratio))

    def push(self, x: torch.Tensor) -> None:
        """Record this step's value (a non-finite one as a gap). Spikes enter the history too: a level that
        has really moved (a new ramp stage) stops reading as a spike within the window instead of
        dropping every update from then on."""
        i = self.pos % self.window
        ok = torch.isfinite(x)
        self.values[i] = torch.where(ok, x, torch.zeros_like(x))
        self.valid[i] = ok
        self.pos += 1

    def state_dict(self) -> dict:
        return {"values": self.values, "valid": self.valid, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.values, self.valid, self.pos = state["values"], state["valid"], state["pos"]
