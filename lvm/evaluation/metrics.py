"""Metric functions shared by mini-5CAT (in training) and the full 5CAT evaluation (plain torch).

Every function takes batched tensors and returns per-sample values, so callers choose how to
average and baselines go through exactly the same code as the model.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F

# Upper bound on the candidate components gathered at once in within-article ranking (windows x
# longest article x D; 16 MB in float32): its transient memory stays flat whatever D and the article lengths.
MAX_CANDIDATE_ELEMENTS = 1 << 22
# Upper bound on the context components slot_gram converts to float64 at once (8 MB).
GRAM_ELEMENTS = 1 << 20


def cos(pred: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """Per-sample cosine similarity of [B, D] tensors."""
    return F.cosine_similarity(pred, other, dim=-1)


def margin(pred: torch.Tensor, target: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """cos(pred, target) - cos(pred, other): > 0 when the prediction sits closer to the target."""
    return cos(pred, target) - cos(pred, other)


def copy_last(context: torch.Tensor) -> torch.Tensor:
    """Baseline prediction: the last context vector."""
    return context[:, -1]


def mean_context(context: torch.Tensor) -> torch.Tensor:
    """Baseline prediction: the normalised mean of the context vectors."""
    return F.normalize(context.mean(dim=1), dim=-1)


def slot_gram(context: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares statistics of one weight per context slot, in float64: G [K, K] with
    G[j, k] = sum over windows of ctx_j . ctx_k, and b [K] with b[k] = sum of ctx_k . target.
    Sums over batches add up, so a split is fitted in pieces; a batch is converted to float64
    GRAM_ELEMENTS context components at a time."""
    k, d = context.shape[1:]
    step = max(1, GRAM_ELEMENTS // (k * d))
    gram = torch.zeros(k, k, dtype=torch.float64)
    b = torch.zeros(k, dtype=torch.float64)
    for s in range(0, len(context), step):
        c, t = context[s : s + step].double(), target[s : s + step].double()
        # bmm over windows, not einsum: einsum's temporaries at [1024, 5, 768] left ~270 MB with the
        # allocator and ran 8x slower (measured; docs/performance.md)
        gram += torch.bmm(c, c.transpose(1, 2)).sum(0)
        b += torch.bmm(c, t.unsqueeze(2)).squeeze(2).sum(0)
        del c, t  # freed before the next piece is converted
    return gram, b


def fit_slot_weights(batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Weights w [K] minimising sum |sum_k w_k ctx_k - target|^2 over the (context, target)
    batches (least squares in float64; the minimum-norm solution when slots are collinear)."""
    gram = b = None
    for c, t in batches:  # running sums: a list of per-batch results held ~30 MB each (measured)
        g_i, b_i = slot_gram(c, t)
        gram, b = (g_i, b_i) if gram is None else (gram + g_i, b + b_i)
    if gram is None:
        raise ValueError("the slot-linear baseline needs at least one training window")
    return torch.linalg.lstsq(gram, b.unsqueeze(1), driver="gelsd").solution.squeeze(1)


def slot_linear(context: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Baseline prediction: the normalised weighted sum of the context slots (weights from
    `fit_slot_weights` on the train split)."""
    return F.normalize(torch.einsum("nkd,k->nd", context, weights.to(context.dtype)), dim=-1)


def unit_spread(x: torch.Tensor, units: bool = False) -> torch.Tensor:
    """Spread of a batch of directions: the std over the batch of the L2-normalised [B, D] rows,
    averaged over dimensions (lightly's std_of_l2_normalized). 0 for a constant output; a NaN row
    makes it NaN. Needs B >= 2. `units`: the rows are unit vectors already (not normalised again)."""
    return (x if units else F.normalize(x, dim=-1)).std(dim=0).mean()


def diversity(pred: torch.Tensor, target: torch.Tensor, units: bool = False) -> torch.Tensor:
    """unit_spread(pred) / unit_spread(target): ~0 for a constant prediction whatever the data's
    anisotropy (vectors sharing a common direction have a small spread of their own)."""
    return unit_spread(pred, units) / unit_spread(target, units).clamp_min(torch.finfo(target.dtype).tiny)


def contrastive_accuracy(pred: torch.Tensor, target: torch.Tensor, units: bool = False) -> torch.Tensor:
    """Per sample: the share of the batch's other targets that sit strictly farther from the
    prediction (lower cosine) than its own target; 0.5 is chance (the Large Concept Model's CA).
    A NaN prediction scores 0 (no comparison holds), never 1. Needs B >= 2."""
    p, t = (pred, target) if units else (F.normalize(pred, dim=-1), F.normalize(target, dim=-1))
    scores = p @ t.T
    own = scores.diagonal().unsqueeze(1)
    n = len(p)
    wins = (scores < own).sum(dim=1)  # the diagonal never counts: own < own is false
    return wins.to(pred.dtype) / (n - 1)


def nonfinite(pred: torch.Tensor) -> torch.Tensor:
    """Per sample: whether the [B, D] prediction holds any NaN or inf component."""
    return ~torch.isfinite(pred).all(dim=-1)


def _rank(scores: torch.Tensor, own_slot: torch.Tensor, valid: torch.Tensor, bad: torch.Tensor) -> torch.Tensor:
    """1 + the valid candidates other than `own_slot` [B, 1] that score >= the target's own score
    (ties count against the prediction); the worst rank (valid candidates) where `bad` [B]."""
    own = scores.gather(1, own_slot)
    ahead = (scores >= own) & valid
    ahead.scatter_(1, own_slot, False)  # the target does not count against itself
    return torch.where(bad, valid.sum(dim=1), ahead.sum(dim=1) + 1)


def ranks_in_bank(pred: torch.Tensor, bank: torch.Tensor, true_slot: int) -> torch.Tensor:
    """1-based rank of bank[:, true_slot] among the [B, M, D] bank by cosine with pred.

    Rank = 1 + other bank vectors scoring >= the true one, so ties count against the prediction
    (a zero prediction ties everywhere and ranks M); a prediction with a NaN/inf component ranks M.
    """
    scores = torch.einsum("bd,bmd->bm", F.normalize(pred, dim=-1), F.normalize(bank, dim=-1))
    slot = torch.full((len(scores), 1), true_slot, dtype=torch.long, device=scores.device)
    return _rank(scores, slot, torch.ones_like(scores, dtype=torch.bool), nonfinite(pred))


def six_bank_ranks(pred: torch.Tensor, context: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The original mini-5CAT's ranking: target among {K context vectors, target}.

    Kept only for comparison with the original's numbers: it is nearly always rank 1 and is exactly
    rank 1 for a collapsed model pointing away from the whole context.
    """
    return ranks_in_bank(pred, torch.cat([context, target.unsqueeze(1)], dim=1), context.shape[1])


def within_article_ranks(
    pred: torch.Tensor,
    vectors: torch.Tensor,
    target_rows: torch.Tensor,
    article_start: torch.Tensor,
    article_len: torch.Tensor,
) -> torch.Tensor:
    """1-based rank of each target among all chunks of its own article (store rows), by cosine.

    Rank = 1 + other chunks of the article scoring >= the target: ties count against the
    prediction, so a zero prediction (every score 0) ranks last, and an oracle ranks 1 unless the
    article holds a duplicate of the target vector (then 2). A prediction with a NaN/inf component
    ranks last (the article length): no comparison with NaN may read as a win.

    Retrieval by padded matrix products over each sample's article (hand-rolled: torchmetrics'
    retrieval metrics take flat (query, score) lists, which would mean materialising the same
    scores plus index tensors); padding slots never count.
    """
    bad = nonfinite(pred)
    pred = F.normalize(pred, dim=-1)
    out = torch.empty(len(pred), dtype=torch.long, device=pred.device)
    longest = int(article_len.max()) if len(article_len) else 0
    step = max(1, MAX_CANDIDATE_ELEMENTS // (max(longest, 1) * vectors.shape[-1]))
    for s in range(0, len(pred), step):
        sl = slice(s, s + step)
        width = int(article_len[sl].max())
        offs = torch.arange(width, device=pred.device)
        rows = article_start[sl, None] + offs
        valid = offs < article_len[sl, None]
        rows = torch.where(valid, rows, article_start[sl, None])
        scores = torch.bmm(vectors[rows].to(pred.dtype), pred[sl].unsqueeze(2)).squeeze(2)
        # The target's own score comes from the same product, so rounding cannot separate them.
        out[sl] = _rank(scores, (target_rows[sl] - article_start[sl]).unsqueeze(1), valid, bad[sl])
    return out


def recall_at(ranks: torch.Tensor, k: int) -> torch.Tensor:
    """Share of samples whose target ranks within the top k."""
    return (ranks <= k).float().mean()


def mrr(ranks: torch.Tensor) -> torch.Tensor:
    """Mean reciprocal rank."""
    return (1.0 / ranks.float()).mean()
