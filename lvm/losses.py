"""The P6b combined loss: MSE plus an adaptively weighted directional margin term (plain torch).

    pos = cos(pred, target); neg = cos(pred, prev); gap = pos - neg
    dir = mean(softplus(gamma * (margin - gap))) / gamma
    lam = clamp(target_frac * mse.detach() / dir.detach(), lambda_min, lambda_max)
    loss = mse + weight * lam * dir

`weight` is 1 normally and 0 when the directional term is off or skipped for the batch (the
seed's v2 skip rule, part of the loss): the term stays in the graph either way, so every rank
builds the same graph.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

MseOn = Literal["raw", "unit"]
# A tensor -> its mean over the ranks of a distributed run (the identity on one process).
MeanOverRanks = Callable[[torch.Tensor], torch.Tensor]
MSE_ON = ("raw", "unit")


def _finite(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


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
        problems = [
            msg for ok, msg in (
                (_finite(self.gamma) and self.gamma > 0, f"loss.gamma must be > 0 (got {self.gamma})"),
                (_finite(self.lambda_min) and _finite(self.lambda_max) and 0 < self.lambda_min <= self.lambda_max,
                 f"need 0 < loss.lambda_min <= loss.lambda_max (got {self.lambda_min}, {self.lambda_max})"),
                (_finite(self.margin), f"loss.margin must be a finite number (got {self.margin})"),
                (_finite(self.target_frac) and self.target_frac >= 0, f"loss.target_frac must be >= 0 (got {self.target_frac})"),
            ) if not ok
        ]
        if problems:
            raise ValueError("; ".join(problems))


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

    @property
    def frac_of_mse(self) -> torch.Tensor:
        """Share of the MSE actually applied by the directional term (0 when skipped)."""
        return (self.weight * self.lambda_eff * self.dir / self.mse.clamp_min(torch.finfo(self.mse.dtype).tiny)).detach()


@dataclass(frozen=True)
class SkipRule:
    """The seed's v2 check: skip the directional term for a batch whose mean pos is below
    `pos_below` or whose mean neg is below `neg_below` (the seed: both 0)."""

    pos_below: float
    neg_below: float

    def __post_init__(self) -> None:
        if not (_finite(self.pos_below) and _finite(self.neg_below)):
            raise ValueError(f"guard.pos_below and guard.neg_below must be finite numbers (got {self.pos_below}, {self.neg_below})")

    def __call__(self, pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
        return (pos < self.pos_below) | (neg < self.neg_below)


def cosines(pred: torch.Tensor, target: torch.Tensor, prev: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample cos(pred, target) and cos(pred, prev)."""
    return F.cosine_similarity(pred, target, dim=-1), F.cosine_similarity(pred, prev, dim=-1)


def directional_term(pos: torch.Tensor, neg: torch.Tensor, margin: float, gamma: float) -> torch.Tensor:
    """mean(softplus(gamma * (margin - gap))) / gamma: a smooth hinge pushing gap above margin."""
    return F.softplus(gamma * (margin - (pos - neg))).mean() / gamma


def adaptive_lambda(
    mse: torch.Tensor, dir: torch.Tensor, target_frac: float, lambda_min: float, lambda_max: float
) -> torch.Tensor:
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
) -> LossTerms:
    """The combined loss of one batch. `raw` is the model's un-normalised output [B, D].

    mse_on="raw" reproduces the original (MSE of the raw output against the unit target);
    "unit" takes the MSE of the normalised prediction. `skip` judges this batch's mean cosines,
    averaged over ranks by `mean_over_ranks` so that every rank decides alike, and may zero the
    directional weight for this same batch.
    """
    pred = F.normalize(raw, dim=-1)
    mse = F.mse_loss(raw if mse_on == "raw" else pred, target)
    pos, neg = cosines(pred, target, prev)
    d = directional_term(pos, neg, knobs.margin, knobs.gamma)
    lam = adaptive_lambda(mse, d, knobs.target_frac, knobs.lambda_min, knobs.lambda_max)
    pos_m, neg_m = pos.mean().detach(), neg.mean().detach()
    if skip is None:
        skipped = torch.zeros((), dtype=torch.bool, device=raw.device)
    else:
        both = torch.stack([pos_m, neg_m])
        both = mean_over_ranks(both) if mean_over_ranks is not None else both
        skipped = skip(both[0], both[1])
    weight = (~skipped).to(mse.dtype) * float(knobs.enabled)
    return LossTerms(
        loss=mse + weight * lam * d,
        mse=mse,
        dir=d,
        lambda_eff=lam,
        weight=weight,
        skipped=skipped,
        pos=pos_m,
        neg=neg_m,
        gap=pos_m - neg_m,
    )
