"""The v2 skip rule and the SkipGuard callback's counting and decision."""

import pytest
import torch

from callbacks.guard import SkipGuard, skip_rule


@pytest.mark.parametrize(
    "pos,neg,skip",
    [(0.5, 0.5, False), (-0.058, -0.519, True), (0.3, -0.01, True), (-0.01, 0.4, True), (0.0, 0.0, False)],
)
def test_seed_rule(pos, neg, skip):
    assert bool(skip_rule(torch.tensor(pos), torch.tensor(neg), 0.0, 0.0)) is skip


class IdentityStrategy:
    def __init__(self):
        self.calls = 0

    def reduce(self, t, reduce_op):
        assert reduce_op == "mean"
        self.calls += 1
        return t


class MeanOfRanksStrategy:
    """Stands in for an all-reduce over two ranks: the other rank's values are fixed."""

    def __init__(self, other):
        self.other = other

    def reduce(self, t, reduce_op):
        return (t + self.other) / 2


def test_gate_decides_on_reduced_means():
    guard = SkipGuard(0.0, 0.0, print_every=0)
    guard._strategy = IdentityStrategy()
    assert bool(guard.gate(torch.tensor(-0.1), torch.tensor(0.2)))
    assert guard._strategy.calls == 1
    # Locally negative, but the mean over ranks is positive: every rank keeps the term.
    guard._strategy = MeanOfRanksStrategy(torch.tensor([0.4, 0.4]))
    assert not bool(guard.gate(torch.tensor(-0.1), torch.tensor(0.2)))


class Terms:
    def __init__(self, skipped, pos, neg):
        self.skipped, self.pos, self.neg = torch.tensor(skipped), torch.tensor(pos), torch.tensor(neg)


class FakeTrainer:
    is_global_zero = True

    def __init__(self):
        self.global_step = 0


class FakeModule:
    def __init__(self):
        self.last_terms = None
        self.logged = {}

    def log(self, name, value, **kw):
        self.logged[name] = value


def test_counts_skips_and_warns(caplog):
    guard = SkipGuard(0.0, 0.0, print_every=3)
    trainer, module = FakeTrainer(), FakeModule()
    seq = [(False, 0.5, 0.4), (True, -0.058, -0.519), (True, -0.02, 0.1), (False, 0.5, 0.5), (True, 0.2, -0.3)]
    with caplog.at_level("WARNING"):
        for step, (skipped, pos, neg) in enumerate(seq):
            trainer.global_step = step + 1
            module.last_terms = Terms(skipped, pos, neg)
            guard.on_train_batch_end(trainer, module, None, None, step)
        assert guard.state_dict() == {"skips_total": 3}  # includes the not yet reported skip
        guard.on_train_epoch_end(trainer, module)
    assert guard.skips_total == 3
    assert module.logged["guard/skips_total"] == 3.0
    lines = [r.getMessage() for r in caplog.records if "[P6b WARNING]" in r.getMessage()]
    assert len(lines) == 2
    assert "pos=-0.020, neg=0.100" in lines[0]  # newest skipped batch of the first report window
    assert "pos=0.200, neg=-0.300" in lines[1]
    fresh = SkipGuard(0.0, 0.0, print_every=3)
    fresh.load_state_dict(guard.state_dict())
    assert fresh.skips_total == 3
