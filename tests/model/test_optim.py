"""DroppableAdamW against torch's AdamW, its dropped step, the rolling z-score, and the spike check end to end."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from lvm.model.optim import DroppableAdamW, RollingStat, keep_implementation
from lvm.runtime.errors import ConfigError
from lvm.runtime.objects import build
from lvm.training.run import run
from tests.helpers import cfg_for, compose_cfg, events, steps_per_epoch


def model_pair(seed=0):
    torch.manual_seed(seed)
    a = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    b = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    b.load_state_dict(a.state_dict())
    return a, b


def train_steps(model, opt, steps, keep=None, poison=()):
    gen = torch.Generator().manual_seed(1)
    for i in range(steps):
        x, y = torch.randn(16, 6, generator=gen), torch.randn(16, 3, generator=gen)
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        if i in poison:
            for p in model.parameters():
                p.grad.fill_(float("nan"))
        if keep is not None:
            opt.keep = torch.tensor(keep[i])
        opt.step()


def test_kept_steps_are_torch_adamw():
    a, b = model_pair()
    kw = dict(lr=1e-2, betas=(0.9, 0.999), weight_decay=0.05)
    train_steps(a, torch.optim.AdamW(a.parameters(), **kw), 30)
    train_steps(b, DroppableAdamW(b.parameters(), **kw), 30, keep=[1.0] * 30)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.allclose(pa, pb, rtol=1e-5, atol=1e-6)


def test_a_skipped_step_changes_nothing_even_with_nan_gradients():
    a, b = model_pair()
    kw = dict(lr=1e-2, weight_decay=0.05)
    opt_a, opt_b = DroppableAdamW(a.parameters(), **kw), DroppableAdamW(b.parameters(), **kw)
    train_steps(a, opt_a, 5, keep=[1.0] * 5)
    train_steps(b, opt_b, 5, keep=[1.0] * 5)
    before = {k: v.clone() for k, v in b.state_dict().items()}
    moments = [(s["step"].clone(), s["exp_avg"].clone(), s["exp_avg_sq"].clone()) for s in opt_b.state.values()]
    # One more step whose gradients are NaN, skipped: parameters, moments and step count as they were.
    train_steps(b, opt_b, 1, keep=[0.0], poison={0})
    assert all(torch.equal(before[k], v) for k, v in b.state_dict().items())
    for (step, m, v), s in zip(moments, opt_b.state.values()):
        assert torch.equal(step, s["step"]) and torch.equal(m, s["exp_avg"]) and torch.equal(v, s["exp_avg_sq"])
    # A skip from the very first step is a no-op too (no division by a zero bias correction).
    c, _ = model_pair()
    start = {k: v.clone() for k, v in c.state_dict().items()}
    train_steps(c, DroppableAdamW(c.parameters(), lr=1e-2), 1, keep=[0.0], poison={0})
    assert all(torch.equal(start[k], v) for k, v in c.state_dict().items())


def test_rolling_score_matches_numpy():
    stat = RollingStat(window=4)
    history: list[float] = []  # every value pushed so far
    for x in [1.0, 2.0, 4.0, float("nan"), 3.0, 5.0, 2.5, 9.0, 3.5]:
        z, ratio = (v.item() for v in stat.score(torch.tensor(x), min_history=3))
        recent = np.array([v for v in history[-4:] if math.isfinite(v)])  # the last 4 steps' finite values
        if len(recent) < 3:
            assert z == 0.0 and ratio == 0.0  # not enough history to call anything a spike
        elif math.isfinite(x):
            assert z == pytest.approx((x - recent.mean()) / recent.std(ddof=1), rel=1e-5)
            assert ratio == pytest.approx(x / recent.mean(), rel=1e-6)
        stat.push(torch.tensor(x))
        history.append(x)


def _spike_decisions(spike, norms: list[float]) -> list[bool]:
    """Feed gradient norms (full batches) through the callback; whether each step was skipped."""
    from types import SimpleNamespace

    layer = torch.nn.Linear(4, 1, bias=False)
    module = SimpleNamespace(parameters=layer.parameters)
    trainer = SimpleNamespace(callbacks=[])
    opt = DroppableAdamW(layer.parameters(), lr=1e-3)
    skipped = []
    for norm in norms:
        spike.on_train_batch_start(trainer, module, {"target": torch.zeros(8, 1)}, 0)
        layer.weight.grad = torch.full_like(layer.weight, norm / 2)  # 4 components: total norm = `norm`
        spike.on_before_optimizer_step(trainer, module, opt)
        skipped.append(opt.keep.item() == 0.0)
    return skipped


def test_a_healthy_step_up_in_a_smooth_run_is_not_a_spike_but_a_fault_is():
    """Measured on the plain-model control: the window's norms 0.050 +- 0.003, then a ramp stage's
    0.070 (1.4x) read z 6.8 and was skipped with sigma alone (a false alarm). The shipped settings
    need the norm also to be min_ratio (2) times the window's mean; every drill's spike is >= 2.7x."""
    shipped = OmegaConf.to_container(compose_cfg("train", "guard=rollback", "guard.spike.drop=true").guard.spike)
    rng = np.random.default_rng(0)
    smooth = list(0.05 + 0.003 * rng.standard_normal(128))
    for value, spike in ((0.07, False), (0.16, True), (float("nan"), True)):
        decisions = _spike_decisions(build("guard.spike", shipped), smooth + [value])
        assert not any(decisions[:-1])
        assert decisions[-1] == spike, value
    # sigma alone (min_ratio 1) calls the healthy 1.4x step a spike: the false alarm, reproduced.
    assert _spike_decisions(build("guard.spike", {**shipped, "min_ratio": 1.0}), smooth + [0.07])[-1]


def test_a_nan_batchs_update_is_dropped_on_its_own_step_and_nothing_rolls_back(tmp_path):
    guarded = [
        "+experiment=p6b_v2",
        "guard.spike.drop=true",
        "logger.flush_every=5",
        "trainer.max_epochs=3",
        "guard.rollback.detectors.val_floor=null",
        "guard.rollback.detectors.val_drop=null",
        "guard.rollback.detectors.below_copy_last=null",
    ]
    run(cfg_for(*guarded, "trainer.max_epochs=1"), tmp_path / "probe")
    n = steps_per_epoch(tmp_path / "probe")
    bad = n + 2
    results = run(cfg_for(*guarded, "+fault=inject", f"fault.nan_batch_at_steps=[{bad}]"), tmp_path / "run")
    ev = events(tmp_path / "run")
    assert [e["action"] for e in ev] == ["dropped update"], ev
    assert ev[0]["values"]["first_step"] == bad and ev[0]["values"]["count"] == 1
    assert results["status"] == "completed" and math.isfinite(results["final"]["val/cos"])
    assert results["guard"]["dropped_updates"] == 1  # the record counts the spike check's drops
    assert all(torch.isfinite(v).all() for v in torch.load(results["last_checkpoint"], weights_only=True)["state_dict"].values())
    # Without the drop the same record poisons the weights and the guard has to roll back.
    plain = run(
        cfg_for(*[g for g in guarded if "spike" not in g], "+fault=inject", f"fault.nan_batch_at_steps=[{bad}]"), tmp_path / "plain"
    )
    assert [e["detector"] for e in events(tmp_path / "plain") if e["action"] == "rollback"] == ["nonfinite"]
    assert plain["guard"]["rollbacks"] == 1 and plain["guard"]["dropped_updates"] == 0


def test_a_rollback_starts_the_gradient_norm_history_again():
    """The restored weights' gradients are not what the history describes (before: 3 false skips
    at z ~8 right after the corrupt-checkpoint drill's rollback, and a second rollback): the guard
    tells the spike check through its listener interface (RollbackListener.after_rollback)."""
    from types import SimpleNamespace

    from callbacks.spike import SpikeCheck

    trainer = SimpleNamespace(callbacks=[])
    spike = SpikeCheck(sigma=6.0, min_ratio=2.0, window=8, min_history=2, drop=False)
    batch = {"target": torch.zeros(4, 3)}
    for x in (1.0, 1.1, 0.9):
        spike.on_train_batch_start(trainer, None, batch, 0)
        spike.norms.score(torch.tensor(x), 2)
        spike.norms.push(torch.tensor(x))
    assert spike.norms.score(torch.tensor(5.0), 2)[0].item() > 6  # a spike against this history
    spike.after_rollback(step=3)
    spike.on_train_batch_start(trainer, None, batch, 0)
    assert spike.norms.score(torch.tensor(5.0), 2)[0].item() == 0.0  # no history yet: nothing is a spike


def test_an_epochs_short_remainder_batch_is_neither_judged_nor_kept():
    """Its gradient norm is larger by nature (before: z 17-23 for a batch of one, a dropped update
    on every healthy control at every epoch's end)."""
    from types import SimpleNamespace

    from callbacks.spike import SpikeCheck

    layer = torch.nn.Linear(3, 1)
    module = SimpleNamespace(parameters=layer.parameters)
    trainer = SimpleNamespace(callbacks=[])
    spike = SpikeCheck(sigma=6.0, min_ratio=2.0, window=16, min_history=2, drop=True)
    opt = DroppableAdamW(layer.parameters(), lr=1e-3)
    for size, scale in ((32, 1.0), (32, 1.1), (32, 0.9), (32, 1.0), (1, 50.0)):
        spike.on_train_batch_start(trainer, module, {"target": torch.zeros(size, 1)}, 0)
        for p in layer.parameters():
            p.grad = torch.full_like(p, scale)
        spike.on_before_optimizer_step(trainer, module, opt)
    assert opt.keep.item() == 1.0 and spike.stats()[1].item() == 0.0  # the batch of one: not a spike
    assert int(spike.norms.valid.sum()) == 4  # and not part of the history


def test_the_spike_check_clips_as_lightning_would_from_the_same_norm(tmp_path):
    """With the spike check on, it clips the gradients with the norm it computed (Lightning's
    clipping is handed over: one gradient norm per step, not two); the run is bit for bit the run
    Lightning's own clipping gives. A tight clip makes clipping act on every step."""
    from callbacks.spike import SpikeCheck
    from lvm.training.build import build_data, build_fit
    from tests.callbacks.test_resume import final_state

    common = ["+experiment=p6b_v2", "trainer.gradient_clip_val=0.05", "trainer.max_epochs=2"]
    cfg = cfg_for(*common)
    fit = build_fit(cfg, build_data(cfg), tmp_path / "built")
    assert fit.trainer.gradient_clip_val is None and [c.clip for c in fit.trainer.callbacks if isinstance(c, SpikeCheck)] == [0.05]
    run(cfg, tmp_path / "spike")
    run(cfg_for(*common, "guard.spike=null"), tmp_path / "lightning")
    a, b = final_state(tmp_path / "spike"), final_state(tmp_path / "lightning")
    assert all(torch.equal(v, b["weights"][k]) for k, v in a["weights"].items())
    from tests.helpers import history

    assert history(tmp_path / "spike") == history(tmp_path / "lightning")
    # And the clip does act: unclipped, the same run ends elsewhere.
    run(cfg_for(*common[:1], "trainer.gradient_clip_val=null", "trainer.max_epochs=2"), tmp_path / "unclipped")
    assert history(tmp_path / "unclipped") != history(tmp_path / "spike")


@pytest.mark.parametrize(
    "overrides,optimizer,scheduler",
    [
        ((), torch.optim.AdamW, torch.optim.lr_scheduler.ReduceLROnPlateau),
        (("guard.spike.drop=true",), DroppableAdamW, torch.optim.lr_scheduler.ReduceLROnPlateau),
        (("optim.scheduler=null", "optim.optimizer.lr=0.002"), torch.optim.AdamW, None),
    ],
)
def test_the_module_builds_the_configured_optimizer_and_scheduler(overrides, optimizer, scheduler):
    from lvm.model.module import LVMModule
    from lvm.runtime.objects import to_plain

    module = LVMModule(to_plain(cfg_for(*overrides)), dim=8)
    setup = module.configure_optimizers()
    opt = setup["optimizer"]
    group = opt.param_groups[0]
    o = cfg_for(*overrides).optim.optimizer
    assert type(opt) is optimizer and group["lr"] == o.lr and group["weight_decay"] == o.weight_decay
    assert tuple(group["betas"]) == tuple(o.betas) and {id(p) for p in group["params"]} == {id(p) for p in module.parameters()}
    if scheduler is None:
        assert "lr_scheduler" not in setup
    else:
        entry = setup["lr_scheduler"]
        assert type(entry["scheduler"]) is scheduler and entry["scheduler"].optimizer is opt
        assert (entry["monitor"], entry["interval"], entry["scheduler"].factor) == ("val/loss", "epoch", 0.5)


def test_an_optimizer_keeps_its_implementation_when_it_loads_a_checkpoint():
    """A state dict's param groups replace the optimizer's whole, flags included: the config's
    fused setting must survive a resume from a checkpoint saved without it."""
    a, b = model_pair()
    old = torch.optim.AdamW(a.parameters(), lr=1e-2, fused=False)
    train_steps(a, old, 2)
    saved = old.state_dict()
    plain = torch.optim.AdamW(b.parameters(), lr=1e-2, fused=True)
    plain.load_state_dict(saved)
    assert plain.param_groups[0]["fused"] is False  # torch's own behaviour: the checkpoint's flag wins
    kept = keep_implementation(torch.optim.AdamW(b.parameters(), lr=1e-2, fused=True))
    kept.load_state_dict(saved)
    assert kept.param_groups[0]["fused"] is True
    assert torch.equal(kept.state[next(b.parameters())]["exp_avg"], old.state[next(a.parameters())]["exp_avg"])


def test_droppable_adamw_is_fused_only():
    with pytest.raises(ConfigError, match="guard.spike.drop needs optim.optimizer.fused=true"):
        DroppableAdamW(torch.nn.Linear(2, 2).parameters(), lr=1e-3, fused=False)
