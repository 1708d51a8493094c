"""StepLog: every recorded step reaches the loggers at its own step, in order, once."""

import torch

from lvm.steplog import StepLog


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
