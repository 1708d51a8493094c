"""AdamW that can drop an update by a 0/1 factor on the device, and the rolling statistics that decide it.

Hand-rolled for a stated reason: torch.optim.AdamW has no such factor. Zeroing the gradient still
moves the weights (momentum and weight decay); setting the learning rate to 0 for one step needs
the decision on the host (a sync per step) and still feeds the spike, or a NaN, into the moments,
where a NaN stays for good. Here `keep` = 0 leaves parameters, both moments and the step count
exactly as they were. With `keep` = 1 the update is torch's AdamW (decoupled weight decay, bias
correction), tested against it step for step (tests/model/test_optim.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch


def grad_norm(params: Iterable[torch.nn.Parameter]) -> torch.Tensor:
    """The total L2 norm of the parameters' gradients, as a float32 device tensor (no host sync)."""
    grads = [p.grad for p in params if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))).float()


class DroppableAdamW(torch.optim.Optimizer):
    def __init__(
        self,
        params: Iterable[torch.nn.Parameter],
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
    ) -> None:
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})
        self.keep: torch.Tensor | None = None  # 0-dim 0/1, set (after backward) for the coming step

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        loss = None
        if closure is not None:  # backward, then on_before_optimizer_step sets `keep`
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                k = self.keep.to(p.device, torch.float32) if self.keep is not None else torch.ones((), device=p.device)
                grad = torch.where(k > 0, p.grad, torch.zeros((), dtype=p.grad.dtype, device=p.device))  # a NaN stays out
                step, m, v = state["step"], state["exp_avg"], state["exp_avg_sq"]
                step.add_(k)
                m.lerp_(grad, (1 - b1) * k.to(m.dtype))
                v.mul_(1 - (1 - b2) * k.to(v.dtype)).addcmul_(grad, grad, value=1 - b2)
                p.mul_(1 - lr * wd * k.to(p.dtype))
                n = step.clamp(min=1.0)
                bias1, bias2 = 1 - torch.pow(b1, n), 1 - torch.pow(b2, n)
                denom = (v.sqrt() / bias2.sqrt().to(v.dtype)).add_(eps)
                p.sub_(m / denom * (lr * k / bias1).to(p.dtype))
        return loss


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
