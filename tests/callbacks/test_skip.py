"""SkipReport: counting the batches the v2 skip rule zeroed (the rule itself: tests/model/test_losses.py)."""

import torch

from callbacks.skip import SkipReport
from lvm.model.module import STEP_STATS


def outputs(skipped, pos, neg):
    """A training step's outputs with these statistics (the others 0)."""
    stats = torch.zeros(len(STEP_STATS))
    for name, value in (("skipped", float(skipped)), ("pos", pos), ("neg", neg)):
        stats[STEP_STATS.index(name)] = value
    return {"loss": torch.tensor(0.0), "stats": stats, "step": 0}


class FakeTrainer:
    is_global_zero = True

    def __init__(self):
        self.global_step = 0


class FakeModule:
    def __init__(self):
        self.logged = {}

    def log(self, name, value, **kw):
        self.logged[name] = value


def test_counts_skips_and_warns(caplog):
    guard = SkipReport(STEP_STATS, print_every=3)
    trainer, module = FakeTrainer(), FakeModule()
    seq = [(False, 0.5, 0.4), (True, -0.058, -0.519), (True, -0.02, 0.1), (False, 0.5, 0.5), (True, 0.2, -0.3)]
    with caplog.at_level("WARNING"):
        for step, (skipped, pos, neg) in enumerate(seq):
            trainer.global_step = step + 1
            guard.on_train_batch_end(trainer, module, outputs(skipped, pos, neg), None, step)
        assert guard.state_dict() == {"skips_total": 3}  # includes the not yet reported skip
        guard.on_train_epoch_end(trainer, module)
    assert guard.skips_total == 3
    assert module.logged["guard/skips_total"] == 3.0
    lines = [r.getMessage() for r in caplog.records if "[P6b WARNING]" in r.getMessage()]
    assert len(lines) == 2
    assert "pos=-0.020, neg=0.100" in lines[0]  # newest skipped batch of the first report window
    assert "pos=0.200, neg=-0.300" in lines[1]
    fresh = SkipReport(STEP_STATS, print_every=3)
    fresh.load_state_dict(guard.state_dict())
    assert fresh.skips_total == 3
