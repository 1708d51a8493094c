"""StepLog: every recorded step reaches the loggers at its own step, in order, once."""

import torch

from lvm.guard.steplog import StepLog


class ListLogger:
    def __init__(self):
        self.rows = []

    def log_metrics(self, metrics, step):
        self.rows.append((step, metrics))


def test_every_step_written_once_at_its_step():
    lg = ListLogger()
    log = StepLog(["a", "b"], flush_every=3)
    for step in range(7):
        log.record(step, torch.tensor([step, 10.0 * step]), [lg])
    assert [s for s, _ in lg.rows] == [0, 1, 2, 3, 4, 5]  # two full buffers flushed
    log.flush([lg])
    log.flush([lg])  # nothing pending: no duplicates
    assert [s for s, _ in lg.rows] == list(range(7))
    assert lg.rows[4][1] == {"a": 4.0, "b": 40.0}


def test_each_flush_returns_its_rows_once_and_unflushed_rows_survive_a_checkpoint():
    """record and flush hand back every row once, in step order; a restored log flushes the rows it
    was saved with at the same step as the original (exact resume)."""
    log = StepLog(["a"], flush_every=4)
    flushed = [log.record(step, torch.tensor([float(step)]), []) for step in range(6)]
    assert flushed[:3] == [None] * 3 and flushed[4:] == [None] * 2
    assert (flushed[3].steps, [r["a"] for r in flushed[3].rows]) == ([0, 1, 2, 3], [0.0, 1.0, 2.0, 3.0])
    state = log.state_dict()
    assert state == {"steps": [4, 5], "rows": [[4.0], [5.0]]}
    restored = StepLog(["a"], flush_every=4)
    restored.load_state_dict(state)
    assert restored.record(6, torch.tensor([6.0]), []) is None
    last = restored.record(7, torch.tensor([7.0]), [])
    assert (last.steps, [r["a"] for r in last.rows]) == ([4, 5, 6, 7], [4.0, 5.0, 6.0, 7.0])
    assert restored.flush([]) is None  # nothing left
