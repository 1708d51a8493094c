"""Ramp stage boundaries for the v1 and v2 tables as they live in conf/, and the callback."""

import pytest
from omegaconf import OmegaConf

from callbacks.ramp import RampSchedule, parse_stages, stage_index
from lvm.model.losses import P6bLoss
from lvm.model.module import LVMModule
from tests.helpers import compose_cfg


def ramp_table(name):
    cfg = compose_cfg("train", f"ramp={name}")
    return OmegaConf.to_container(cfg.ramp, resolve=True)


# (0-based epoch, margin, target_frac) from docs/p6b.md section 3.
V1 = [(0, 0.02, 0.10), (1, 0.02, 0.10), (2, 0.04, 0.20), (4, 0.04, 0.20), (5, 0.05, 0.25), (11, 0.05, 0.25)]
V2 = [
    (0, 0.02, 0.10),
    (2, 0.02, 0.10),
    (3, 0.03, 0.15),
    (5, 0.03, 0.15),
    (6, 0.04, 0.20),
    (8, 0.04, 0.20),
    (9, 0.05, 0.25),
    (40, 0.05, 0.25),
]


@pytest.mark.parametrize("name,table", [("p6b_v1", V1), ("p6b_v2", V2)])
def test_conf_tables_match_reference(name, table):
    ramp = ramp_table(name)
    assert ramp["epoch_base"] == 0
    stages = parse_stages(ramp["stages"])
    for epoch, margin, frac in table:
        s = stages[stage_index(epoch, stages)]
        assert (s.margin, s.target_frac) == (margin, frac), f"{name} epoch {epoch}"


class FakeTrainer:
    def __init__(self, epoch):
        self.current_epoch = epoch


class FakeModule:
    """The module's loss and its public knob interface (LVMModule.knobs, set_knobs), without a model."""

    knobs = LVMModule.knobs

    def __init__(self):
        self.loss = P6bLoss(True, "raw", gamma=4, lambda_min=1e-4, lambda_max=0.02, margin=-1, target_frac=99.0, variant=None)
        self.logged = {}

    def log(self, name, value, **kw):
        self.logged[name] = value

    set_knobs = LVMModule.set_knobs


@pytest.mark.parametrize("base,epoch,expected", [(0, 1, 0.02), (0, 2, 0.04), (1, 1, 0.04), (1, 0, 0.02), (1, 4, 0.05)])
def test_callback_sets_knobs_with_epoch_base(base, epoch, expected):
    """With epoch_base=1 the table is read in 1-based numbers: Lightning epoch 1 is table epoch 2."""
    ramp = RampSchedule(ramp_table("p6b_v1")["stages"], epoch_base=base, lambda_max=0.05)
    module = FakeModule()
    ramp.on_train_epoch_start(FakeTrainer(epoch), module)
    assert module.knobs.margin == expected
    ramp.on_train_epoch_end(FakeTrainer(epoch), module)  # logged at the epoch's end, with its row
    assert module.logged["ramp/stage"] == float(ramp.stage)


def test_state_round_trip_keeps_stage_and_back_off():
    """A restored schedule (a resumed run) sets the same knobs as the one it was saved from."""
    ramp = RampSchedule(ramp_table("p6b_v1")["stages"], 0, lambda_max=0.05)
    ramp.on_train_epoch_start(FakeTrainer(3), FakeModule())
    ramp.back_off(3, FakeModule(), hold_epochs=2, target_frac_scale=0.5, lambda_max_scale=0.25)
    restored = RampSchedule(ramp_table("p6b_v1")["stages"], 0, lambda_max=0.05)
    restored.load_state_dict(ramp.state_dict())
    for epoch in (3, 4, 5, 6):
        a, b = FakeModule(), FakeModule()
        ramp.apply(epoch, a)
        restored.apply(epoch, b)
        assert (a.knobs.margin, a.knobs.target_frac, a.knobs.lambda_max) == (b.knobs.margin, b.knobs.target_frac, b.knobs.lambda_max)
    assert restored.hold_until == 6 and restored.target_frac_factor == 0.5 and restored.lambda_max_factor == 0.25


def test_back_off_is_cumulative_and_owns_the_clamp():
    """Each rollback multiplies target_frac and lambda_max by its scale; the schedule keeps the
    products (factors) and writes every knob, the clamp included."""
    ramp = RampSchedule(ramp_table("p6b_v1")["stages"], 0, lambda_max=0.05)
    module = FakeModule()
    ramp.on_train_epoch_start(FakeTrainer(2), module)  # stage 1: margin 0.04, target_frac 0.20
    assert (module.knobs.target_frac, module.knobs.lambda_max) == (0.20, 0.05)
    first = ramp.back_off(2, module, hold_epochs=1, target_frac_scale=0.5, lambda_max_scale=0.5)
    assert first["hold_stage"] == 0 and first["hold_until_epoch"] == 4 and module.knobs.margin == 0.02
    assert module.knobs.target_frac == pytest.approx(0.10 * 0.5) and module.knobs.lambda_max == pytest.approx(0.025)
    second = ramp.back_off(2, module, hold_epochs=1, target_frac_scale=0.5, lambda_max_scale=0.5)
    assert second["target_frac_factor"] == 0.25 and second["lambda_max"] == pytest.approx(0.0125)
    ramp.on_train_epoch_start(FakeTrainer(4), module)  # the hold is over: stage 1 with the factors
    assert module.knobs.margin == 0.04 and module.knobs.target_frac == pytest.approx(0.20 * 0.25)


def test_knobs_are_set_when_a_run_resumes_mid_epoch():
    """A run resumed mid-epoch does not start that epoch again (no on_train_epoch_start): the knobs
    of its stage are set at train start (before, they stayed at the loss config's values)."""
    ramp = RampSchedule(ramp_table("p6b_v1")["stages"], 0, lambda_max=0.05)
    module = FakeModule()
    module.knobs.margin = -1.0
    ramp.on_train_start(FakeTrainer(3), module)
    assert module.knobs.margin == 0.04 and ramp.stage == 1


@pytest.mark.parametrize(
    "stages,msg",
    [
        ([], "empty"),
        (
            [
                {"until": 3, "margin": 0.1, "target_frac": 0.1},
                {"until": 2, "margin": 0.1, "target_frac": 0.1},
                {"until": None, "margin": 0.1, "target_frac": 0.1},
            ],
            "increase",
        ),
        ([{"until": 3, "margin": 0.1, "target_frac": 0.1}], "last stage"),
        ([{"until": None, "margin": 0.1, "target_frac": 0.1}, {"until": None, "margin": 0.1, "target_frac": 0.1}], "only the last"),
    ],
)
def test_bad_tables_rejected(stages, msg):
    with pytest.raises(ValueError, match=msg):
        parse_stages(stages)
