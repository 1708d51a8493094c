"""5CAT: the five evaluation tests of a predictor on held-out windows (plain torch, no Lightning).

A *predictor* maps a batch dict (`context` [B, K, D], `target` [B, D], `target_row` [B]) to
predictions [B, D]. Models read only the context; the oracle returns `target`, which is why
predictors see the whole batch. Every test calls the predictor with a batch whose `target` is the
true chunk for the contexts it holds, so the oracle is exact everywhere (also in the rollout).

Offsets are relative to the target: k = 0 is the target, k = -target_offset the last context chunk
(P6 format: k = -2; standard: k = -1). A prediction scores against the chunk `k` chunk indices from
the target; windows whose neighbours are missing (article edge or a gap in chunk indices) are left
out of that test.

- A offset sweep: mean cos(pred, chunk at target + k), k = -3..+3, over windows where all seven
  exist; margin = cos at k = 0 minus the largest cos at any other k.
- B within-article retrieval: rank of the target among all chunks of its article (articles with at
  least `MIN_RETRIEVAL_CHUNKS` chunks): R@1, R@5, MRR.
- C context ablations: change of the mean cos(pred, target) when the context is shuffled (a fixed
  random non-identity permutation per window), reversed, one slot dropped (set to zero; mean over
  the K slots), every slot set to the last one, or the last slot replaced by a chunk of another
  article (a fixed random row of a different article per window).
- D rollout: predict, append the prediction, drop the oldest slot, H times. The appended prediction
  stands for the chunk it predicts, so the next prediction is target_offset chunks after it: step h
  (1-based) is compared with the chunk at target + (h - 1) * target_offset (standard: t+1, t+2, ...;
  P6: t+2, t+4, ...).
- E coherence bins: windows binned by mean adjacent-context cosine (low / normal / high), mean
  cos(pred, target) per bin; the gate compares the VAL and OOD normal bins.

No wrong number: `nonfinite` is the share of windows whose prediction holds a NaN/inf component;
every mean over such a prediction is NaN (null in 5cat.json, a failed check in `judge`), and
retrieval ranks it last. Ties count against the prediction (lvm.metrics.within_article_ranks).

The gates that judge these figures are in lvm/evaluation/gates.py.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lvm.data.store import ArticleStore, Windows
from lvm.evaluation import metrics as M
from lvm.runtime.errors import DataError

Predictor = Callable[[dict[str, torch.Tensor]], torch.Tensor]

OFFSETS = tuple(range(-3, 4))
ABLATIONS = ("shuffle", "reverse", "drop_slot", "repeat_last", "cross_article")
BINS = ("low", "normal", "high")
MIN_RETRIEVAL_CHUNKS = 6
SPLIT_NAMES = ("val", "ood")
CROSS = "val_vs_ood"
# Metrics a gate check may name: per split (dotted path into `summarize`'s output) and across splits.
SPLIT_METRICS = (
    "nonfinite",
    "cos",
    "margin_last",
    "offset.cos_at_target",
    "offset.margin",
    "retrieval.r1",
    "retrieval.r5",
    "retrieval.mrr",
    *(f"ablation.{a}" for a in ABLATIONS),
    "rollout.mean",
    *(f"coherence.{b}.cos" for b in BINS),
)
CROSS_METRICS = ("coherence_normal_gap",)


# ---------------------------------------------------------------------------------------------
# Rows, perturbations and ablated contexts


def rows_at(store: ArticleStore, rows: torch.Tensor, offsets: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Store rows of the chunks `offsets` chunk indices from each of `rows` ([B, len(offsets)]),
    and whether all of them exist in the same article ([B])."""
    off = torch.as_tensor(list(offsets), dtype=torch.long)
    cand = rows.long().unsqueeze(1) + off
    inside = (cand >= 0) & (cand < len(store))
    safe = cand.clamp(0, len(store) - 1).numpy()
    art = torch.from_numpy(store.articles_of(safe))
    chunk = torch.from_numpy(store.chunks_of(safe))
    own_art = torch.from_numpy(store.articles_of(rows.numpy())).unsqueeze(1)
    own_chunk = torch.from_numpy(store.chunks_of(rows.numpy())).unsqueeze(1)
    ok = inside & (art == own_art) & (chunk == own_chunk + off)
    return torch.where(ok, cand, rows.long().unsqueeze(1)), ok.all(dim=1)


@dataclass(frozen=True)
class Perturbation:
    """Per-window randomness of the ablations, drawn once per split so every predictor sees the same."""

    perm: torch.Tensor  # [N, K] a non-identity permutation of the context slots
    other_row: torch.Tensor  # [N] a store row of a different article


def make_perturbation(windows: Windows, index: torch.Tensor, seed: int) -> Perturbation:
    """Seeded shuffles and cross-article rows for windows `index`."""
    store, k = windows.store, windows.spec.context
    if store.num_articles < 2:
        raise DataError(f"{store.source}: the cross-article ablation needs at least two articles")
    gen = torch.Generator().manual_seed(seed)
    n = len(index)
    perm = torch.rand(n, k, generator=gen).argsort(dim=1)
    identity = (perm == torch.arange(k)).all(dim=1)
    perm[identity] = perm[identity].roll(1, dims=1)
    own = torch.from_numpy(store.articles_of(windows.rows(index)[0].numpy()))
    other = torch.randint(len(store), (n,), generator=gen)
    for _ in range(1000):
        same = torch.from_numpy(store.articles_of(other.numpy())) == own
        if not same.any():
            break
        other[same] = torch.randint(len(store), (int(same.sum()),), generator=gen)
    else:
        raise DataError(f"{store.source}: could not draw rows of other articles for the cross-article ablation")
    return Perturbation(perm, other)


def ablated_contexts(context: torch.Tensor, perm: torch.Tensor, other: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each ablation's context [B, K, D] (`drop_slot` is [K, B, K, D]: slot j zeroed in the j-th)."""
    b, k, _ = context.shape
    dropped = context.unsqueeze(0).repeat(k, 1, 1, 1)
    dropped[torch.arange(k), :, torch.arange(k)] = 0.0
    cross = context.clone()
    cross[:, -1] = other
    return {
        "shuffle": context[torch.arange(b).unsqueeze(1), perm],
        "reverse": context.flip(1),
        "drop_slot": dropped,
        "repeat_last": context[:, -1:].expand(b, k, -1),
        "cross_article": cross,
    }


def coherence(context: torch.Tensor) -> torch.Tensor:
    """Mean cosine of adjacent context chunks, per window."""
    return M.cos(context[:, :-1], context[:, 1:]).mean(dim=1)


# ---------------------------------------------------------------------------------------------
# Per-window scores


def score_batch(
    predictor: Predictor,
    batch: dict[str, torch.Tensor],
    windows: Windows,
    perturb: Perturbation,
    horizon: int,
) -> dict[str, torch.Tensor]:
    """Per-window figures of every test for one gathered batch (with `perturb` rows for it)."""
    store, spec = windows.store, windows.spec
    context, target, rows = batch["context"], batch["target"], batch["target_row"]
    b, k = context.shape[:2]
    ab = ablated_contexts(context, perturb.perm, store.take(perturb.other_row))
    # Base and every ablation in one predictor call: the same targets, stacked.
    stacked = torch.cat(
        [context, ab["shuffle"], ab["reverse"], ab["drop_slot"].reshape(k * b, k, -1), ab["repeat_last"], ab["cross_article"]]
    )
    copies = len(stacked) // b
    preds = predictor({"context": stacked, "target": target.repeat(copies, 1), "target_row": rows.repeat(copies)})
    cos_all = M.cos(preds, target.repeat(copies, 1)).view(copies, b)
    pred = preds[:b]
    base = cos_all[0]
    out: dict[str, torch.Tensor] = {
        "nonfinite": M.nonfinite(pred),
        "cos": base,
        "margin_last": M.margin(pred, target, context[:, -1]),
        "coherence": coherence(context),
        "ablation.shuffle": cos_all[1] - base,
        "ablation.reverse": cos_all[2] - base,
        "ablation.drop_slot": (cos_all[3 : 3 + k] - base).T,  # [B, K]
        "ablation.repeat_last": cos_all[3 + k] - base,
        "ablation.cross_article": cos_all[4 + k] - base,
    }
    # A: offsets around the target.
    off_rows, off_ok = rows_at(store, rows, OFFSETS)
    out["offset.cos"] = M.cos(pred.unsqueeze(1), store.take(off_rows))
    out["offset.valid"] = off_ok
    # B: within-article retrieval.
    start, length = store.article_span(rows.numpy())
    length_t = torch.from_numpy(length.astype(np.int64))
    out["retrieval.rank"] = M.within_article_ranks(pred, store.vectors, rows, torch.from_numpy(start.astype(np.int64)), length_t)
    out["retrieval.valid"] = length_t >= MIN_RETRIEVAL_CHUNKS
    # D: rollout on the windows whose H true chunks exist.
    true_rows, roll_ok = rows_at(store, rows, [h * spec.target_offset for h in range(horizon)])
    roll = torch.full((b, horizon), float("nan"))
    sel = roll_ok.nonzero().squeeze(1)
    if len(sel):
        ctx = context[sel]
        for h in range(horizon):
            truth_rows = true_rows[sel, h]
            truth = store.take(truth_rows)
            # The first step predicts from the unchanged context: the base prediction, not a forward again.
            step = pred[sel] if h == 0 else predictor({"context": ctx, "target": truth, "target_row": truth_rows})
            roll[sel, h] = M.cos(step, truth)
            ctx = torch.cat([ctx[:, 1:], step.unsqueeze(1).to(ctx.dtype)], dim=1)
    out["rollout.cos"] = roll
    out["rollout.valid"] = roll_ok
    return out


def score_windows(
    predictor: Predictor,
    windows: Windows,
    index: torch.Tensor,
    perturb: Perturbation,
    horizon: int,
    batch_size: int,
    on_batch: Callable[[], None] | None = None,
) -> dict[str, torch.Tensor]:
    """`score_batch` over windows `index` in batches, concatenated; `on_batch` after each batch."""
    parts: list[dict[str, torch.Tensor]] = []
    with torch.inference_mode():
        for s in range(0, len(index), batch_size):
            sl = slice(s, s + batch_size)
            batch = windows.gather(index[sl])
            part = Perturbation(perturb.perm[sl], perturb.other_row[sl])
            parts.append(score_batch(predictor, batch, windows, part, horizon))
            if on_batch:
                on_batch()
    return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}


# ---------------------------------------------------------------------------------------------
# Summaries


def _mean(x: torch.Tensor) -> float:
    return float(x.double().mean()) if x.numel() else math.nan


def summarize(scores: dict[str, torch.Tensor], bins: Mapping[str, float]) -> dict[str, Any]:
    """Split-level metrics from `score_windows` output. `bins`: {low, high} coherence edges
    (low: < low, normal: low..high, high: > high)."""
    n = len(scores["cos"])
    ok = scores["offset.valid"]
    off = scores["offset.cos"][ok].double().mean(dim=0) if ok.any() else torch.full((len(OFFSETS),), math.nan)
    at = OFFSETS.index(0)
    others = torch.cat([off[:at], off[at + 1 :]])
    # The peak is the one offset with the highest mean; none when all are NaN (no window, NaN
    # predictions) or the highest is tied (a zero prediction scores 0 everywhere).
    best = torch.nan_to_num(off, nan=-math.inf)
    top = (best == best.max()).nonzero()
    peak = int(top[0]) if len(top) == 1 else None
    ranks = scores["retrieval.rank"][scores["retrieval.valid"]]
    roll = scores["rollout.cos"][scores["rollout.valid"]]
    coh = scores["coherence"]
    lo, hi = float(bins["low"]), float(bins["high"])
    masks = {"low": coh < lo, "normal": (coh >= lo) & (coh <= hi), "high": coh > hi}
    drop = scores["ablation.drop_slot"]
    return {
        "windows": n,
        "nonfinite": _mean(scores["nonfinite"]),
        "cos": _mean(scores["cos"]),
        "margin_last": _mean(scores["margin_last"]),
        "offset": {
            "k": list(OFFSETS),
            "windows": int(ok.sum()),
            "cos": [float(v) for v in off],
            "cos_at_target": float(off[at]),
            "margin": float(off[at] - others.max()) if ok.any() else math.nan,
            "peak_k": OFFSETS[peak] if peak is not None else None,
        },
        "retrieval": {
            "windows": len(ranks),
            "r1": float(M.recall_at(ranks, 1)) if len(ranks) else math.nan,
            "r5": float(M.recall_at(ranks, 5)) if len(ranks) else math.nan,
            "mrr": float(M.mrr(ranks)) if len(ranks) else math.nan,
        },
        "ablation": {
            "shuffle": _mean(scores["ablation.shuffle"]),
            "reverse": _mean(scores["ablation.reverse"]),
            "drop_slot": _mean(drop),
            "drop_slot_each": [_mean(drop[:, j]) for j in range(drop.shape[1])],
            "repeat_last": _mean(scores["ablation.repeat_last"]),
            "cross_article": _mean(scores["ablation.cross_article"]),
        },
        "rollout": {
            "windows": len(roll),
            "horizon": roll.shape[1],
            "cos": [_mean(roll[:, h]) for h in range(roll.shape[1])],
            "mean": _mean(roll),
        },
        "coherence": {b: {"windows": int(m.sum()), "cos": _mean(scores["cos"][m])} for b, m in masks.items()},
    }


def compare_splits(by_split: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """Cross-split figures: |VAL normal-bin cos - OOD normal-bin cos| (NaN without both)."""
    try:
        gap = abs(by_split["val"]["coherence"]["normal"]["cos"] - by_split["ood"]["coherence"]["normal"]["cos"])
    except KeyError:
        gap = math.nan
    return {"coherence_normal_gap": gap}
