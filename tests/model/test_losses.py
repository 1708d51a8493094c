"""The P6b combined loss against an independent numpy computation."""

import math

import numpy as np
import pytest
import torch

from lvm.model.losses import (
    DirectionalKnobs,
    SkipRule,
    VariantTerms,
    adaptive_lambda,
    directional_grad_share,
    directional_term,
    p6b_loss,
)

KNOBS = DirectionalKnobs(margin=0.04, target_frac=0.2, gamma=8.0, lambda_min=1e-4, lambda_max=0.05)


def reference_loss(raw, target, prev, k: DirectionalKnobs, mse_on="raw", skipped=False):
    """Plain numpy/float64 transcription of docs/p6b.md section 3."""
    raw, target, prev = (np.asarray(x, dtype=np.float64) for x in (raw, target, prev))
    pred = raw / np.linalg.norm(raw, axis=1, keepdims=True)
    x = raw if mse_on == "raw" else pred
    mse = np.mean((x - target) ** 2)
    unit = lambda v: v / np.linalg.norm(v, axis=1, keepdims=True)  # noqa: E731
    pos = np.sum(pred * unit(target), axis=1)
    neg = np.sum(pred * unit(prev), axis=1)
    gap = pos - neg
    z = k.gamma * (k.margin - gap)
    d = np.mean(np.log1p(np.exp(-np.abs(z))) + np.maximum(z, 0)) / k.gamma
    lam = min(max(k.target_frac * mse / d, k.lambda_min), k.lambda_max)
    w = 0.0 if (skipped or not k.enabled) else 1.0
    return dict(loss=mse + w * lam * d, mse=mse, dir=d, lam=lam, pos=pos.mean(), neg=neg.mean(), frac=w * lam * d / mse)


def batch(seed=0, b=16, d=24, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    unit = lambda x: torch.nn.functional.normalize(x, dim=-1)  # noqa: E731
    target = unit(torch.randn(b, d, generator=g))
    prev = unit(target + 0.8 * torch.randn(b, d, generator=g))
    raw = scale * (target + torch.randn(b, d, generator=g))
    return raw, target, prev


@pytest.mark.parametrize("mse_on", ["raw", "unit"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_reference(mse_on, seed):
    raw, target, prev = batch(seed)
    t = p6b_loss(raw, target, prev, KNOBS, mse_on)
    ref = reference_loss(raw, target, prev, KNOBS, mse_on)
    assert t.loss.item() == pytest.approx(ref["loss"], rel=1e-5)
    assert t.mse.item() == pytest.approx(ref["mse"], rel=1e-5)
    assert t.dir.item() == pytest.approx(ref["dir"], rel=1e-5)
    assert t.lambda_eff.item() == pytest.approx(ref["lam"], rel=1e-5)
    assert t.pos.item() == pytest.approx(ref["pos"], abs=1e-6)
    assert t.neg.item() == pytest.approx(ref["neg"], abs=1e-6)
    assert t.gap.item() == pytest.approx(ref["pos"] - ref["neg"], abs=1e-6)
    assert t.frac_of_mse.item() == pytest.approx(ref["frac"], rel=1e-5)


def test_mse_on_raw_differs_from_unit_when_norm_is_small():
    raw, target, prev = batch(scale=0.1)
    raw_mse = p6b_loss(raw, target, prev, KNOBS, "raw").mse.item()
    unit_mse = p6b_loss(raw, target, prev, KNOBS, "unit").mse.item()
    # A near-zero raw output scores about 1/D on raw-MSE: the original's weakness.
    assert raw_mse < unit_mse
    assert p6b_loss(torch.zeros_like(raw) + 1e-6, target, prev, KNOBS, "raw").mse.item() == pytest.approx(1 / raw.shape[1], rel=1e-3)


def test_lambda_clamps_at_both_bounds():
    mse, d = torch.tensor(0.01), torch.tensor(0.02)
    # Unclamped: 0.2 * 0.01 / 0.02 = 0.1 -> clamped to lambda_max.
    assert adaptive_lambda(mse, d, 0.2, 1e-4, 0.05).item() == pytest.approx(0.05)
    assert adaptive_lambda(mse, d, 0.2, 1e-4, 0.5).item() == pytest.approx(0.1)
    # Tiny target_frac -> clamped up to lambda_min.
    assert adaptive_lambda(mse, d, 1e-6, 1e-4, 0.05).item() == pytest.approx(1e-4)
    # A vanishing directional term does not divide by zero: it pins at lambda_max.
    assert adaptive_lambda(mse, torch.tensor(0.0), 0.2, 1e-4, 0.05).item() == pytest.approx(0.05)


def test_no_gradient_through_lambda():
    """d loss / d raw equals d(mse)/d raw + lam * d(dir)/d raw with lam a constant."""
    raw, target, prev = batch(3)
    raw.requires_grad_(True)
    t = p6b_loss(raw, target, prev, KNOBS)
    (g_total,) = torch.autograd.grad(t.loss, raw)
    lam = t.lambda_eff.item()
    raw2 = raw.detach().clone().requires_grad_(True)
    t2 = p6b_loss(raw2, target, prev, KNOBS)
    (g_expected,) = torch.autograd.grad(t2.mse + lam * t2.dir, raw2)
    assert not t.lambda_eff.requires_grad
    assert torch.allclose(g_total, g_expected, atol=1e-7)


def test_directional_term_is_smooth_hinge():
    pos, neg = torch.tensor([0.5]), torch.tensor([0.5])
    # gap 0 with margin 0: softplus(0) / gamma = log 2 / gamma.
    assert directional_term(pos, neg, 0.0, 4.0).item() == pytest.approx(math.log(2) / 4)
    # A gap far above the margin costs ~0; far below costs ~ (margin - gap).
    assert directional_term(torch.tensor([1.0]), torch.tensor([-1.0]), 0.05, 8.0).item() < 1e-6
    assert directional_term(torch.tensor([-1.0]), torch.tensor([1.0]), 0.05, 8.0).item() == pytest.approx(2.05, rel=1e-4)


def test_skip_rule_zeroes_weight_but_keeps_graph():
    raw, target, prev = batch(4)
    raw.requires_grad_(True)
    ref = reference_loss(raw.detach(), target, prev, KNOBS, skipped=True)
    # A rule whose threshold sits just above this batch's own mean pos: it must skip this batch.
    t = p6b_loss(raw, target, prev, KNOBS, skip=SkipRule(pos_below=ref["pos"] + 1e-4, neg_below=-2.0))
    assert t.skipped.item() and t.weight.item() == 0.0
    assert t.loss.item() == pytest.approx(ref["mse"], rel=1e-6)
    assert t.frac_of_mse.item() == 0.0
    kept = p6b_loss(raw, target, prev, KNOBS, skip=SkipRule(pos_below=ref["pos"] - 1e-4, neg_below=-2.0))
    assert not kept.skipped.item() and kept.weight.item() == 1.0
    # The directional term is still part of the graph (same shape on every rank).
    assert t.dir.grad_fn is not None
    (g,) = torch.autograd.grad(t.loss, raw)
    (g_mse,) = torch.autograd.grad(p6b_loss(raw, target, prev, KNOBS).mse, raw)
    assert torch.allclose(g, g_mse, atol=1e-7)


@pytest.mark.parametrize(
    "pos,neg,skip",
    [(0.5, 0.5, False), (-0.058, -0.519, True), (0.3, -0.01, True), (-0.01, 0.4, True), (0.0, 0.0, False)],
)
def test_seed_rule(pos, neg, skip):
    assert bool(SkipRule(0.0, 0.0)(torch.tensor(pos), torch.tensor(neg))) is skip


def test_skip_decides_on_the_means_over_ranks():
    """Locally negative, but the mean over two ranks is positive: every rank keeps the term."""
    raw, target, prev = batch(6)
    rule = SkipRule(0.0, 0.0)
    pred = torch.nn.functional.normalize(raw, dim=-1)
    away = p6b_loss(-raw, target, prev, KNOBS, skip=rule)  # pred points away from both: both means < 0
    assert away.skipped.item()
    seen = []

    def mean_with_other_rank(t):
        seen.append(t.clone())
        return (t + torch.tensor([0.9, 0.9])) / 2  # the other rank's means

    shared = p6b_loss(-raw, target, prev, KNOBS, skip=rule, mean_over_ranks=mean_with_other_rank)
    assert not shared.skipped.item()
    local = torch.stack(
        [torch.nn.functional.cosine_similarity(-pred, target).mean(), torch.nn.functional.cosine_similarity(-pred, prev).mean()]
    )
    assert torch.allclose(seen[0], local, atol=1e-6)  # the rule was handed this rank's batch means


def test_disabled_term_is_plain_mse():
    raw, target, prev = batch(5)
    off = DirectionalKnobs(**{**KNOBS.__dict__, "enabled": False})
    t = p6b_loss(raw, target, prev, off)
    assert t.loss.item() == pytest.approx(t.mse.item())
    assert t.weight.item() == 0.0
    assert t.lambda_eff.item() > 0  # still computed and logged


OFF = dict(
    ratio_weight=0.0,
    ratio_margin=0.05,
    share_cap=None,
    gate_low=None,
    gate_width=0.15,
    pos_floor_weight=0.0,
    pos_floor=0.10,
    orthogonality=0.0,
)


def reference_variant(raw, target, prev, k: DirectionalKnobs, v: dict):
    """numpy float64 transcription of the v2.1-v2.3 terms (docs/p6b.md section 3), written apart
    from lvm.losses: softplus as log(1 + exp(z)), every term from its formula."""
    raw, target, prev = (np.asarray(x, dtype=np.float64) for x in (raw, target, prev))
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    pred = unit(raw)
    mse = np.mean((raw - target) ** 2)
    pos, neg = np.sum(pred * unit(target), 1), np.sum(pred * unit(prev), 1)
    softplus = lambda z: np.log(1 + np.exp(z))  # noqa: E731
    gap_term = np.mean(softplus(k.gamma * (k.margin - (pos - neg)))) / k.gamma
    ratio = (pos - neg) / (np.abs(pos) + np.abs(neg) + 1e-6)
    ratio_t = np.mean(softplus(k.gamma * (v["ratio_margin"] - ratio))) / k.gamma
    d = (1 - v["ratio_weight"]) * gap_term + v["ratio_weight"] * ratio_t
    lam = min(max(k.target_frac * mse / d, k.lambda_min), k.lambda_max)
    if v["share_cap"] is not None:
        lam = min(lam, v["share_cap"] * mse / d)
    if v["gate_low"] is not None:
        lam *= min(max((pos.mean() - v["gate_low"]) / v["gate_width"], 0.0), 1.0)
    pen = v["pos_floor_weight"] * np.mean(np.maximum(v["pos_floor"] - pos, 0) ** 2) + v["orthogonality"] * np.mean(neg**2)
    return dict(loss=mse + lam * d + pen, dir=d, lam=lam, penalties=pen, share=lam * d / mse)


@pytest.mark.parametrize(
    "terms",
    [
        {},
        {"ratio_weight": 0.3},
        {"share_cap": 0.05},
        {"gate_low": 0.15},
        {"pos_floor_weight": 1e-3, "pos_floor": 0.9},
        {"orthogonality": 5e-4},
        {"ratio_weight": 0.3, "share_cap": 0.25, "pos_floor_weight": 1e-3, "orthogonality": 5e-4, "gate_low": 0.15, "gate_width": 0.15},
    ],
    ids=["off", "ratio", "cap", "gate", "pos_floor", "orthogonality", "all"],
)
@pytest.mark.parametrize("seed", [0, 1])
def test_variant_terms_match_float64_reference(terms, seed):
    raw, target, prev = batch(seed)
    v = {**OFF, **terms}
    knobs = DirectionalKnobs(margin=0.04, target_frac=0.2, gamma=8.0, lambda_min=1e-4, lambda_max=5.0)
    t = p6b_loss(raw, target, prev, knobs, "raw", variant=VariantTerms(**v))
    ref = reference_variant(raw, target, prev, knobs, v)
    assert t.loss.item() == pytest.approx(ref["loss"], rel=1e-5)
    assert t.dir.item() == pytest.approx(ref["dir"], rel=1e-5)
    assert t.lambda_eff.item() == pytest.approx(ref["lam"], rel=1e-5)
    assert t.penalties.item() == pytest.approx(ref["penalties"], rel=1e-5, abs=1e-12)
    assert t.frac_of_mse.item() == pytest.approx(ref["share"], rel=1e-5)
    if terms == {"share_cap": 0.05}:
        assert t.frac_of_mse.item() == pytest.approx(terms["share_cap"], rel=1e-5)  # the cap binds here
    if terms.get("gate_low") is not None:
        assert 0 < (t.pos.item() - terms["gate_low"]) / v["gate_width"] < 1  # the gate is partly open here


def test_variants_off_are_bit_identical_to_v2():
    """All terms off (the config default) computes exactly the v1/v2 loss, gradients included."""
    raw, target, prev = batch(3)
    raw_a, raw_b = raw.clone().requires_grad_(), raw.clone().requires_grad_()
    a = p6b_loss(raw_a, target, prev, KNOBS, "raw")
    b = p6b_loss(raw_b, target, prev, KNOBS, "raw", variant=VariantTerms(**OFF))
    a.loss.backward()
    b.loss.backward()
    assert torch.equal(a.loss, b.loss) and torch.equal(raw_a.grad, raw_b.grad) and b.penalties.item() == 0.0


def test_confidence_gate_closes_below_its_threshold_and_penalties_outlive_a_skip():
    raw, target, prev = batch(0)
    knobs = DirectionalKnobs(margin=0.04, target_frac=0.2, gamma=8.0, lambda_min=1e-4, lambda_max=5.0)
    closed = p6b_loss(raw, target, prev, knobs, variant=VariantTerms(**{**OFF, "gate_low": 0.99}))
    assert closed.lambda_eff.item() == 0.0 and closed.loss.item() == pytest.approx(closed.mse.item())
    skip_all = SkipRule(2.0, 2.0)
    v = VariantTerms(**{**OFF, "orthogonality": 0.5})
    skipped = p6b_loss(raw, target, prev, knobs, skip=skip_all, variant=v)
    assert skipped.skipped.item() and skipped.loss.item() == pytest.approx(skipped.mse.item() + skipped.penalties.item())
    assert skipped.penalties.item() > 0


@pytest.mark.parametrize("pos,neg,skip", [(0.04, -0.06, True), (0.04, -0.04, False), (0.06, -0.06, False), (0.3, 0.2, False)])
def test_v2_1_also_skips_when_both_are_low(pos, neg, skip):
    rule = SkipRule(0.0, 0.0 if neg >= 0 else -1.0, both_pos_below=0.05, both_neg_below=-0.05)
    assert bool(rule(torch.tensor(pos), torch.tensor(neg))) is skip


def test_variant_settings_are_checked():
    with pytest.raises(ValueError, match="ratio_weight"):
        VariantTerms(**{**OFF, "ratio_weight": 1.5})
    with pytest.raises(ValueError, match="share_cap"):
        VariantTerms(**{**OFF, "share_cap": 0.0})
    with pytest.raises(ValueError, match="both_pos_below and both_neg_below"):
        SkipRule(0.0, 0.0, both_pos_below=0.05, both_neg_below=None)


def test_directional_grad_share_against_float64_gradients():
    """The share of the output gradient from the directional side, against gradients computed in
    float64 by autograd on a separate copy; 0 when the term is skipped or off."""
    raw, target, prev = batch(1)
    r32 = raw.clone().requires_grad_()
    t = p6b_loss(r32, target, prev, KNOBS, "raw")
    share = directional_grad_share(t, r32).item()
    r64 = raw.double().requires_grad_()
    pred = torch.nn.functional.normalize(r64, dim=-1)
    mse = ((r64 - target.double()) ** 2).mean()
    pos = (pred * target.double()).sum(-1)
    neg = (pred * torch.nn.functional.normalize(prev.double(), dim=-1)).sum(-1)
    d = torch.nn.functional.softplus(KNOBS.gamma * (KNOBS.margin - (pos - neg))).mean() / KNOBS.gamma
    g_mse = torch.autograd.grad(mse, r64, retain_graph=True)[0].norm()
    g_dir = torch.autograd.grad(t.lambda_eff.double().item() * d, r64)[0].norm()
    assert 0 < share < 1 and share == pytest.approx((g_dir / (g_dir + g_mse)).item(), rel=1e-4)
    assert r32.grad is None  # no gradient accumulated anywhere
    skipped = p6b_loss(r32, target, prev, KNOBS, "raw", skip=SkipRule(2.0, 2.0))
    off = p6b_loss(r32, target, prev, DirectionalKnobs(**{**KNOBS.__dict__, "enabled": False}), "raw")
    assert directional_grad_share(skipped, r32).item() == 0.0 and directional_grad_share(off, r32).item() == 0.0
