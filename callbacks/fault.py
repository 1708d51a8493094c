"""FaultInjection: break a run on purpose at given steps, to drill the guard (tests, lvm.tools.drill).

- `nan_at_steps`: every weight set to NaN at the start of those global steps, on rank 0 only (the
  gradient all-reduce then carries the fault to the other ranks, as a real one would).
- `constant_from_step`: from that step the model's output is one fixed direction (`constant`, the
  mean direction of the data: the best constant there is), the collapse a vector predictor can fall
  into. The weights are set to it (output layer and context skip zero, output bias the constant: a
  checkpoint saved now holds a collapsed model) and a forward hook keeps the output there until
  the guard rolls back (the rollback and back-off stand for removing the recipe's cause), or to the
  end of the run without a guard (it is a RollbackListener). The output keeps its graph (times 0), so every parameter still
  gets a gradient, as DDP requires.
- `corrupt_good_at_step`: at that step the newest good-*.ckpt of the run's checkpoints folder
  (`ckpt_dir`, the guard's rollback points) is overwritten with garbage (rank 0), as a full disk or
  a half-copied file would leave it: a fault of the disk, found on disk, not in the guard's state.
- `nan_batch_at_steps`: one window of that step's batch holds NaN (rank 0): a corrupt record.
- `lr_spike_at_step`: the learning rate times `lr_spike_factor` for that one step (a scheduler bug).
- `raw_scale_at_step`: the output layer (and the context skip) times `raw_scale_factor`: an
  exploding output.
- `kill_at_step`: every rank sends itself SIGKILL at the start of that step (kill -9: nothing is
  saved on the way out); resume with ckpt_path=last.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F


class FaultInjection(L.Callback):
    def __init__(
        self,
        nan_at_steps: Iterable[int] = (),
        constant_from_step: int | None = None,
        constant: torch.Tensor | None = None,
        corrupt_good_at_step: int | None = None,
        nan_batch_at_steps: Iterable[int] = (),
        lr_spike_at_step: int | None = None,
        lr_spike_factor: float | None = None,
        raw_scale_at_step: int | None = None,
        raw_scale_factor: float | None = None,
        kill_at_step: int | None = None,
        ckpt_dir: str | Path | None = None,
    ) -> None:
        if constant_from_step is not None and constant is None:
            raise ValueError("constant_from_step needs the constant direction")
        if corrupt_good_at_step is not None and ckpt_dir is None:
            raise ValueError("corrupt_good_at_step needs the run's checkpoints folder")
        if lr_spike_at_step is not None and lr_spike_factor is None:
            raise ValueError("fault.lr_spike_at_step needs fault.lr_spike_factor")
        if raw_scale_at_step is not None and raw_scale_factor is None:
            raise ValueError("fault.raw_scale_at_step needs fault.raw_scale_factor")
        self.ckpt_dir = None if ckpt_dir is None else Path(ckpt_dir)
        self.steps = set(nan_at_steps)
        self.corrupt_good_at_step = corrupt_good_at_step
        self.nan_batch_steps = set(nan_batch_at_steps)
        self.lr_spike_at_step, self.lr_spike_factor = lr_spike_at_step, lr_spike_factor
        self.raw_scale_at_step, self.raw_scale_factor = raw_scale_at_step, raw_scale_factor
        self.kill_at_step = kill_at_step
        self._lrs: list[float] | None = None  # the learning rates before a spike, restored a step later
        self.constant_from_step = constant_from_step
        self.constant = None if constant is None else F.normalize(constant.float(), dim=-1)
        self._hook: Any = None
        self.ended = False  # the constant-output fault was lifted by a rollback

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.corrupt_good_at_step and trainer.is_global_zero:
            good = sorted(self.ckpt_dir.glob("good-*.ckpt"), key=lambda f: f.stat().st_mtime_ns)
            if good:
                good[-1].write_bytes(b"not a checkpoint")
        step = trainer.global_step
        if step == self.kill_at_step:
            os.kill(os.getpid(), signal.SIGKILL)
        if step in self.steps and trainer.is_global_zero:
            with torch.no_grad():
                for p in pl_module.parameters():
                    p.fill_(float("nan"))
        if step in self.nan_batch_steps and trainer.is_global_zero:
            batch["context"][0].fill_(float("nan"))
        groups = trainer.optimizers[0].param_groups if trainer.optimizers else []
        if self._lrs is not None:
            for g, lr in zip(groups, self._lrs):
                g["lr"] = lr
            self._lrs = None
        if step == self.lr_spike_at_step:
            self._lrs = [g["lr"] for g in groups]
            for g in groups:
                g["lr"] *= self.lr_spike_factor
        if step == self.raw_scale_at_step:
            with torch.no_grad():
                for p in (
                    *pl_module.model.head[-1].parameters(),
                    *([pl_module.model.skip_weights] if pl_module.model.skip_weights is not None else []),
                ):
                    p.mul_(self.raw_scale_factor)
        if self.constant_from_step is None or self.ended:
            return
        if self._hook is None and trainer.global_step >= self.constant_from_step:
            self._collapse_weights(pl_module.model)
            self._hook = pl_module.model.register_forward_hook(self._constant_output)

    def after_rollback(self, step: int) -> None:
        """The guard rolled back: the constant-output fault is lifted (the rollback and back-off
        stand for removing the recipe's cause)."""
        if self._hook is not None:
            self._hook.remove()
            self._hook, self.ended = None, True

    @torch.no_grad()
    def _collapse_weights(self, model: torch.nn.Module) -> None:
        out = model.head[-1]
        out.weight.zero_()
        out.bias.copy_(self.constant.to(out.bias))
        if model.skip_weights is not None:
            model.skip_weights.zero_()

    def _constant_output(
        self, module: torch.nn.Module, inputs: Any, output: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        raw = output[0]
        c = self.constant.to(device=raw.device, dtype=raw.dtype)
        raw = c.expand_as(raw) + 0.0 * raw
        return raw, F.normalize(raw, dim=-1)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
