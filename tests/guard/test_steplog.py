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


def test_listeners_get_each_flushed_window_and_unflushed_rows_survive_a_checkpoint():
    """Subscribers given at construction see every row once; a restored log flushes the rows it
    was saved with at the same step as the original (exact resume)."""
    seen = []
    log = StepLog(["a"], flush_every=4, listeners=[lambda steps, rows: seen.append((steps, [r["a"] for r in rows]))])
    for step in range(6):
        log.record(step, torch.tensor([float(step)]), [])
    assert seen == [([0, 1, 2, 3], [0.0, 1.0, 2.0, 3.0])]
    state = log.state_dict()
    assert state == {"steps": [4, 5], "rows": [[4.0], [5.0]]}
    restored = StepLog(["a"], flush_every=4, listeners=[lambda steps, rows: seen.append((steps, [r["a"] for r in rows]))])
    restored.load_state_dict(state)
    for step in (6, 7):
        restored.record(step, torch.tensor([float(step)]), [])
    assert seen[-1] == ([4, 5, 6, 7], [4.0, 5.0, 6.0, 7.0])
