"""The P6b combined loss: MSE plus an adaptively weighted directional margin term (plain torch).

    pos = cos(pred, target); neg = cos(pred, prev); gap = pos - neg
    dir = mean(softplus(gamma * (margin - gap))) / gamma
    lam = clamp(target_frac * mse.detach() / dir.detach(), lambda_min, lambda_max)
    loss = mse + weight * lam * dir

`weight` is 1 normally and 0 when the directional term is off or skipped for the batch (the
original's v2 skip rule, part of the loss): the term stays in the graph either way, so every rank
builds the same graph.

The later variants (v2.1-v2.3, docs/p6b.md section 3) add terms, each off unless configured
(`VariantTerms`): a ratio term mixed into dir, a cap on the applied share lam * dir / mse, a
confidence gate on lam, a positive-floor and an orthogonality penalty (outside `weight`: they
regularise the prediction whether or not the directional term is skipped).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from lvm.runtime.errors import finite, require

MseOn = Literal["raw", "unit"]
# A tensor -> its mean over the ranks of a distributed run (the identity on one process).
MeanOverRanks = Callable[[torch.Tensor], torch.Tensor]
MSE_ON = ("raw", "unit")


@dataclass
class DirectionalKnobs:
    """The directional term's settings: the ramp schedule owns margin, target_frac and lambda_max
    (callbacks/ramp.py), config the rest."""

    margin: float
    target_frac: float
    gamma: float
    lambda_min: float
    lambda_max: float
    enabled: bool = True

    def __post_init__(self) -> None:
        require(
            (finite(self.gamma) and self.gamma > 0, f"loss.gamma must be > 0 (got {self.gamma})"),
            (
                finite(self.lambda_min) and finite(self.lambda_max) and 0 < self.lambda_min <= self.lambda_max,
                f"need 0 < loss.lambda_min <= loss.lambda_max (got {self.lambda_min}, {self.lambda_max})",
            ),
            (finite(self.margin), f"loss.margin must be a finite number (got {self.margin})"),
            (finite(self.target_frac) and self.target_frac >= 0, f"loss.target_frac must be >= 0 (got {self.target_frac})"),
        )


@dataclass(frozen=True)
class VariantTerms:
    """The later variants' terms (config `loss.variant`); the defaults of conf/loss/p6b.yaml turn
    every one off, which is v1 and v2."""

    ratio_weight: float  # dir = (1 - w) * gap term + w * ratio term
    ratio_margin: float  # the ratio term's margin: softplus(gamma * (ratio_margin - ratio)) / gamma
    share_cap: float | None  # cap on lam * dir / mse (None: no cap)
    gate_low: float | None  # lam *= clamp((batch mean pos - gate_low) / gate_width, 0, 1) (None: no gate)
    gate_width: float
    pos_floor_weight: float  # + w * mean(relu(pos_floor - pos)^2)
    pos_floor: float
    orthogonality: float  # + w * mean(cos(pred, prev)^2)

    def __post_init__(self) -> None:
        require(
            (
                finite(self.ratio_weight) and 0 <= self.ratio_weight <= 1,
                f"loss.variant.ratio_weight must be in [0, 1] (got {self.ratio_weight})",
            ),
            (finite(self.ratio_margin), f"loss.variant.ratio_margin must be a finite number (got {self.ratio_margin})"),
            (
                self.share_cap is None or (finite(self.share_cap) and self.share_cap > 0),
                f"loss.variant.share_cap must be null or > 0 (got {self.share_cap})",
            ),
            (
                self.gate_low is None or finite(self.gate_low),
                f"loss.variant.gate_low must be null or a finite number (got {self.gate_low})",
            ),
            (finite(self.gate_width) and self.gate_width > 0, f"loss.variant.gate_width must be > 0 (got {self.gate_width})"),
            (
                finite(self.pos_floor_weight) and self.pos_floor_weight >= 0,
                f"loss.variant.pos_floor_weight must be >= 0 (got {self.pos_floor_weight})",
            ),
            (finite(self.pos_floor), f"loss.variant.pos_floor must be a finite number (got {self.pos_floor})"),
            (finite(self.orthogonality) and self.orthogonality >= 0, f"loss.variant.orthogonality must be >= 0 (got {self.orthogonality})"),
        )


@dataclass
class LossTerms:
    """Every quantity of one batch's loss, as tensors (no host sync)."""

    loss: torch.Tensor
    mse: torch.Tensor
    dir: torch.Tensor
    lambda_eff: torch.Tensor
    weight: torch.Tensor
    skipped: torch.Tensor
    pos: torch.Tensor  # batch means
    neg: torch.Tensor
    gap: torch.Tensor
    penalties: torch.Tensor  # the variants' positive-floor and orthogonality penalties (0 when off)

    @property
    def frac_of_mse(self) -> torch.Tensor:
        """Share of the MSE actually applied by the directional term (0 when skipped)."""
        return (self.weight * self.lambda_eff * self.dir / self.mse.clamp_min(torch.finfo(self.mse.dtype).tiny)).detach()


@dataclass(frozen=True)
class SkipRule:
    """The original's v2 check: skip the directional term for a batch whose mean pos is below
    `pos_below` or whose mean neg is below `neg_below` (the seed: both 0). v2.1 also skips when
    mean pos < `both_pos_below` and mean neg < `both_neg_below` together (None: not checked)."""

    pos_below: float
    neg_below: float
    both_pos_below: float | None = None
    both_neg_below: float | None = None

    def __post_init__(self) -> None:
        if not (finite(self.pos_below) and finite(self.neg_below)):
            raise ValueError(f"guard.skip_rule.pos_below and neg_below must be finite numbers (got {self.pos_below}, {self.neg_below})")
        both = (self.both_pos_below, self.both_neg_below)
        if both != (None, None) and not all(finite(x) for x in both):
            raise ValueError(f"guard.skip_rule.both_pos_below and both_neg_below must both be finite numbers, or both null (got {both})")

    def __call__(self, pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
        out = (pos < self.pos_below) | (neg < self.neg_below)
        if self.both_pos_below is not None:
            out = out | ((pos < self.both_pos_below) & (neg < self.both_neg_below))
        return out


class P6bLoss:
    """The combined loss of a run (config `loss`, built by `instantiate`): the directional knobs,
    which the ramp schedule changes as training goes (`knobs`), what the MSE is taken of, and the
    variants' terms. Called on a batch, it is `p6b_loss` with these settings."""

    def __init__(
        self,
        enabled: bool,
        mse_on: MseOn,
        gamma: float,
        lambda_min: float,
        lambda_max: float,
        margin: float,
        target_frac: float,
        variant: VariantTerms,
    ) -> None:
        if mse_on not in MSE_ON:
            raise ValueError(f"loss.mse_on must be one of {', '.join(MSE_ON)} (got {mse_on!r})")
        self.knobs = DirectionalKnobs(margin, target_frac, gamma, lambda_min, lambda_max, enabled)
        self.mse_on = mse_on
        self.variant = variant

    def __call__(
        self,
        raw: torch.Tensor,
        target: torch.Tensor,
        prev: torch.Tensor,
        skip: SkipRule | None = None,
        mean_over_ranks: MeanOverRanks | None = None,
    ) -> LossTerms:
        return p6b_loss(raw, target, prev, self.knobs, self.mse_on, skip, mean_over_ranks, self.variant)


def cosines(pred: torch.Tensor, target: torch.Tensor, prev: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample cos(pred, target) and cos(pred, prev)."""
    return F.cosine_similarity(pred, target, dim=-1), F.cosine_similarity(pred, prev, dim=-1)


def directional_term(pos: torch.Tensor, neg: torch.Tensor, margin: float, gamma: float) -> torch.Tensor:
    """mean(softplus(gamma * (margin - gap))) / gamma: a smooth hinge pushing gap above margin."""
    return F.softplus(gamma * (margin - (pos - neg))).mean() / gamma


def ratio_term(pos: torch.Tensor, neg: torch.Tensor, margin: float, gamma: float) -> torch.Tensor:
    """v2.1's scale-free gap: mean(softplus(gamma * (margin - gap / (|pos| + |neg| + 1e-6)))) / gamma."""
    return F.softplus(gamma * (margin - (pos - neg) / (pos.abs() + neg.abs() + 1e-6))).mean() / gamma


def confidence_gate(pos_mean: torch.Tensor, low: float, width: float) -> torch.Tensor:
    """v2.3's factor on lam: 0 while the batch's mean pos is at or below `low`, 1 from low + width."""
    return ((pos_mean - low) / width).clamp(0.0, 1.0)


def adaptive_lambda(mse: torch.Tensor, dir: torch.Tensor, target_frac: float, lambda_min: float, lambda_max: float) -> torch.Tensor:
    """Weight making lam * dir about target_frac of the MSE, clamped; carries no gradient."""
    ratio = target_frac * mse.detach() / dir.detach().clamp_min(torch.finfo(dir.dtype).tiny)
    return ratio.clamp(lambda_min, lambda_max)


def p6b_loss(
    raw: torch.Tensor,
    target: torch.Tensor,
    prev: torch.Tensor,
    knobs: DirectionalKnobs,
    mse_on: MseOn = "raw",
    skip: SkipRule | None = None,
    mean_over_ranks: MeanOverRanks | None = None,
    variant: VariantTerms | None = None,
) -> LossTerms:
    """The combined loss of one batch. `raw` is the model's un-normalised output [B, D].

    mse_on="raw" reproduces the original (MSE of the raw output against the unit target);
    "unit" takes the MSE of the normalised prediction. `skip` judges this batch's mean cosines,
    averaged over ranks by `mean_over_ranks` so that every rank decides alike, and may zero the
    directional weight for this same batch. `variant`: the v2.1-v2.3 terms (None: none).
    """
    pred = F.normalize(raw, dim=-1)
    mse = F.mse_loss(raw if mse_on == "raw" else pred, target)
    pos, neg = cosines(pred, target, prev)
    d = directional_term(pos, neg, knobs.margin, knobs.gamma)
    pos_m, neg_m = pos.mean().detach(), neg.mean().detach()
    penalties = torch.zeros((), dtype=mse.dtype, device=raw.device)
    if variant is not None and variant.ratio_weight:
        d = (1 - variant.ratio_weight) * d + variant.ratio_weight * ratio_term(pos, neg, variant.ratio_margin, knobs.gamma)
    lam = adaptive_lambda(mse, d, knobs.target_frac, knobs.lambda_min, knobs.lambda_max)
    if variant is not None:
        tiny = torch.finfo(d.dtype).tiny
        if variant.share_cap is not None:  # lam * dir / mse <= cap
            lam = torch.minimum(lam, variant.share_cap * mse.detach() / d.detach().clamp_min(tiny))
        if variant.gate_low is not None:
            lam = lam * confidence_gate(pos_m, variant.gate_low, variant.gate_width)
        if variant.pos_floor_weight:
            penalties = penalties + variant.pos_floor_weight * F.relu(variant.pos_floor - pos).pow(2).mean()
        if variant.orthogonality:
            penalties = penalties + variant.orthogonality * neg.pow(2).mean()
        penalties = penalties * float(knobs.enabled)
    if skip is None:
        skipped = torch.zeros((), dtype=torch.bool, device=raw.device)
    else:
        both = torch.stack([pos_m, neg_m])
        both = mean_over_ranks(both) if mean_over_ranks is not None else both
        skipped = skip(both[0], both[1])
    weight = (~skipped).to(mse.dtype) * float(knobs.enabled)
    return LossTerms(
        loss=mse + weight * lam * d + penalties,
        mse=mse,
        dir=d,
        lambda_eff=lam,
        weight=weight,
        skipped=skipped,
        pos=pos_m,
        neg=neg_m,
        gap=pos_m - neg_m,
        penalties=penalties.detach(),
    )


def directional_grad_share(terms: LossTerms, raw: torch.Tensor) -> torch.Tensor:
    """How much of the push on the model's output comes from the directional side of the loss:
    |d(loss - mse)/d raw| / (|d(loss - mse)/d raw| + |d mse/d raw|), in [0, 1] (0 when the term is
    skipped or off). Gradients with respect to `raw` only: no parameter gradient is touched."""
    (g_mse,) = torch.autograd.grad(terms.mse, raw, retain_graph=True)
    (g_dir,) = torch.autograd.grad(terms.loss - terms.mse, raw, retain_graph=True)
    a, b = g_dir.norm(), g_mse.norm()
    return (a / (a + b).clamp_min(torch.finfo(a.dtype).tiny)).detach()
