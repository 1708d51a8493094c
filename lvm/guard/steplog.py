"""Every-step scalars without a per-step host sync: rows buffered on device, flushed in one copy.

Not `self.log` per step, for a measured reason (docs/performance.md, "Measured figures behind design choices"): Lightning re-walks
its result collection on each call, and each logger write per step adds more. Here a step costs
one small stack into a preallocated buffer; every `flush_every` steps one `.tolist()` moves the rows to the host and each row goes to
the loggers at its own step, so TensorBoard still shows every step.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from lightning.pytorch.loggers import Logger


@dataclass(frozen=True)
class FlushedRows:
    """The rows of one flush: their steps and their rows (name -> value), in step order."""

    steps: list[int]
    rows: list[dict[str, float]]


class StepLog:
    """A [flush_every, len(names)] device buffer of per-step scalars."""

    def __init__(self, names: Sequence[str], flush_every: int) -> None:
        if flush_every < 1:
            raise ValueError(f"logger.flush_every must be >= 1 (got {flush_every})")
        self.names = list(names)
        self.flush_every = flush_every
        self._buf: torch.Tensor | None = None
        self._steps: list[int] = []

    def record(self, step: int, row: torch.Tensor, loggers: Iterable[Logger]) -> FlushedRows | None:
        """Buffer one step's values (1-D, in `names` order); flush when the buffer is full (the
        flushed rows, None when nothing was flushed)."""
        if self._buf is None:
            self._buf = torch.empty(self.flush_every, len(self.names), device=row.device)
        elif self._buf.device != row.device:
            self._buf = self._buf.to(row.device)
        self._buf[len(self._steps)] = row
        self._steps.append(step)
        return self.flush(loggers) if len(self._steps) >= self.flush_every else None

    def flush(self, loggers: Iterable[Logger]) -> FlushedRows | None:
        """Write the buffered rows to every logger at their own steps (one host sync); returns
        them (None when nothing was buffered)."""
        if not self._steps or self._buf is None:
            return None
        rows = [dict(zip(self.names, row)) for row in self._buf[: len(self._steps)].tolist()]
        steps, self._steps = self._steps, []
        for lg in loggers:
            for step, metrics in zip(steps, rows):
                lg.log_metrics(metrics, step=step)
        return FlushedRows(steps, rows)

    def state_dict(self) -> dict[str, list]:
        """The rows not flushed yet: a checkpoint carries them so that a resumed run logs and
        flushes (and the guard decides) at the same steps as the uninterrupted one."""
        n = len(self._steps)
        rows = self._buf[:n].tolist() if n and self._buf is not None else []
        return {"steps": list(self._steps), "rows": rows}

    def load_state_dict(self, state: dict[str, list]) -> None:
        self._steps = list(state["steps"])
        self._buf = torch.zeros(max(self.flush_every, len(self._steps) + 1), len(self.names))
        if self._steps:
            self._buf[: len(self._steps)] = torch.tensor(state["rows"], dtype=self._buf.dtype)
