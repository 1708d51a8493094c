"""What an article store can and cannot teach: plain-numpy statistics behind `lvm.diagnosis.diagnose`.

Every statistic works on unit chunk vectors X [N, D] (rows sorted by article, then chunk) and a
`Layout` of the rows. "Adjacent" and "k apart" always mean consecutive chunk indices inside one
article, so a gap in the chunk indices is never bridged. Cosines between store rows are dot
products (the store guarantees unit rows); predictions are normalised before scoring.

Averages pool all items (pairs, windows, anchors); their confidence intervals come from a
bootstrap over articles, because items of one article are correlated.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from lvm.evaluation.metrics import fit_slot_weights
from lvm.runtime.errors import ConfigError, DataError, require

log = logging.getLogger(__name__)

# Rows (or windows) handled per vectorised step: bounds temporaries to a few tens of MB at D=768.
BLOCK = 8192
# Bootstrap weights are drawn in batches of at most this many (resample x article) cells.
_BOOT_CELLS = 1 << 22
# Histogram bins for the within/cross-article cosine distributions.
HIST_EDGES = np.linspace(-1.0, 1.0, 101)
# Adjacent pairs at least this similar are compared bit for bit to count exact copies.
_EXACT_CANDIDATE = 0.9999
# Split codes of `diagnose(split_of_article=...)`.
FIT, TUNE, HELDOUT = 0, 1, 2

# What ridge shrinks its weights toward: zero, or the weights of the mean-of-context predictor.
PRIORS = ("mean_context", "zero")
BASELINES = ("copy_last", "mean_context", "slot_linear", "ridge")

Predictor = Callable[[np.ndarray, np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Layout:
    """Where each row sits: its article (0..A-1, store order) and chunk index, and each article's rows."""

    row_article: np.ndarray
    chunk_indices: np.ndarray
    article_starts: np.ndarray
    article_lengths: np.ndarray
    article_ids: np.ndarray

    @property
    def num_articles(self) -> int:
        return len(self.article_starts)


@dataclass(frozen=True)
class Settings:
    """The knobs of `diagnose`: their defaults and meaning are in conf/diagnose.yaml (the one
    place); `lvm.diagnosis.diagnose.settings_of` builds this from that config node."""

    context: int
    max_offset: int
    far_gap: int
    near_duplicate: float
    position_bins: int
    edge_pairs: int
    pairs: int
    bootstrap: int
    level: float
    alphas: tuple[float, ...]
    prior: str
    max_train: int
    max_eval: int
    examples: int
    seed: int
    progress: bool

    def __post_init__(self) -> None:
        require(
            (self.context >= 2, f"context must be >= 2 (got {self.context})"),
            (self.max_offset >= 1, f"max_offset must be >= 1 (got {self.max_offset})"),
            (self.far_gap >= 0, f"far_gap must be >= 0 (got {self.far_gap})"),
            (-1.0 <= self.near_duplicate <= 1.0, f"near_duplicate must be a cosine in [-1, 1] (got {self.near_duplicate})"),
            (self.position_bins >= 1, f"position_bins must be >= 1 (got {self.position_bins})"),
            (self.edge_pairs >= 1, f"edge_pairs must be >= 1 (got {self.edge_pairs})"),
            (self.pairs >= 1, f"pairs must be >= 1 (got {self.pairs})"),
            (self.bootstrap >= 10, f"bootstrap must be >= 10 resamples (got {self.bootstrap})"),
            (0.5 <= self.level < 1.0, f"level must be in [0.5, 1) (got {self.level})"),
            (
                len(self.alphas) >= 1 and all(a > 0 for a in self.alphas),
                f"ridge.alphas must be a non-empty list of numbers > 0 (got {list(self.alphas)})",
            ),
            (self.prior in PRIORS, f"ridge.prior must be one of {list(PRIORS)} (got {self.prior!r})"),
            (self.max_train >= 1, f"ridge.max_train must be >= 1 (got {self.max_train})"),
            (self.max_eval >= 1, f"max_eval must be >= 1 (got {self.max_eval})"),
            (self.examples >= 0, f"examples must be >= 0 (got {self.examples})"),
            error=ConfigError,
            prefix="invalid diagnose settings: ",
        )


# ----------------------------------------------------------------------------- row geometry


def run_ahead(layout: Layout, cap: int) -> np.ndarray:
    """For each row, how many consecutive chunks of its article follow it (at most `cap`).

    Row r and row r+k are k chunks apart in one article exactly when run_ahead[r] >= k.
    """
    art, chunk = layout.row_article, layout.chunk_indices
    n = len(art)
    step = np.zeros(n, bool)
    step[:-1] = (art[1:] == art[:-1]) & (np.diff(chunk.astype(np.int64)) == 1)
    idx = np.arange(n)
    stop = np.where(step, n, idx)
    next_stop = np.minimum.accumulate(stop[::-1])[::-1]  # first row at or after r that ends a run
    return np.minimum(next_stop - idx, cap).astype(np.int32)


def lag_cosines(X: np.ndarray, run: np.ndarray, lags: int, progress: bool = False) -> np.ndarray:
    """[lags + 1, N] float32: entry [k, r] = cos(row r, row r + k), NaN where they are not k apart.

    Row 0 is all ones. Computed from shifted slices (no gathers), so it is one pass per lag.
    """
    n = len(X)
    out = np.full((lags + 1, n), np.nan, np.float32)
    out[0] = 1.0
    for s in tqdm(range(0, n, BLOCK), desc="lag cosines", unit="block", disable=not progress):
        for k in range(1, lags + 1):
            e = min(s + BLOCK, n - k)
            if e > s:
                out[k, s:e] = np.einsum("ij,ij->i", X[s:e], X[s + k : e + k])
    for k in range(1, lags + 1):
        out[k, run < k] = np.nan
    return out


def pair_cos(X: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """cos(X[a[i]], X[b[i]]) for every i, gathering at most BLOCK rows at a time."""
    out = np.empty(len(a), np.float32)
    for s in range(0, len(a), BLOCK):
        out[s : s + BLOCK] = np.einsum("ij,ij->i", X[a[s : s + BLOCK]], X[b[s : s + BLOCK]])
    return out


def equal_rows(X: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Whether X[a[i]] and X[b[i]] are bitwise equal, gathering at most BLOCK rows at a time."""
    out = np.empty(len(a), bool)
    for s in range(0, len(a), BLOCK):
        out[s : s + BLOCK] = np.all(X[a[s : s + BLOCK]] == X[b[s : s + BLOCK]], axis=1)
    return out


def unit(x: np.ndarray) -> np.ndarray:
    """Rows of `x` scaled to unit length (zero rows stay zero)."""
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(norm > 0, norm, 1.0)


def cos_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-row cosine of two [n, D] arrays (both normalised here)."""
    return np.einsum("ij,ij->i", unit(a), unit(b))


# ----------------------------------------------------------------------------- bootstrap


def article_bootstrap(values: np.ndarray, groups: np.ndarray, resamples: int, seed: int, level: float = 0.95) -> dict[str, Any]:
    """Pooled mean of each column of `values` [n] or [n, S], with a percentile CI from resampling
    whole articles (`groups`, one label per item) with replacement.

    The CI is None with fewer than two articles (there is nothing to resample).
    """
    vals = np.asarray(values, np.float64)
    squeeze = vals.ndim == 1
    vals = vals.reshape(len(vals), -1)
    order = np.argsort(groups, kind="stable")  # linear for the already sorted labels used here
    vals, g = vals[order], np.asarray(groups)[order]
    first = np.flatnonzero(np.concatenate(([True], g[1:] != g[:-1]))) if len(g) else np.empty(0, np.int64)
    labels = g[first]
    sums = np.add.reduceat(vals, first, axis=0) if len(first) else np.zeros((0, vals.shape[1]))
    counts = np.diff(np.append(first, len(g))).astype(np.float64)
    mean = sums.sum(0) / max(counts.sum(), 1.0)
    lo = hi = None
    if len(labels) >= 2 and len(vals):
        stats = _bootstrap_means(sums, counts, resamples, np.random.default_rng(seed))
        tail = (1.0 - level) / 2 * 100
        lo, hi = np.percentile(stats, [tail, 100 - tail], axis=0)
    out = {"mean": mean, "lo": lo, "hi": hi}
    if squeeze:
        out = {k: None if v is None else float(v[0]) for k, v in out.items()}
    return {**out, "items": int(len(vals)), "articles": int(len(labels))}


def _bootstrap_means(sums: np.ndarray, counts: np.ndarray, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """[resamples, S] pooled means of articles drawn with replacement (A draws per resample)."""
    a = len(counts)
    per_batch = max(1, _BOOT_CELLS // a)
    out = []
    for s in range(0, resamples, per_batch):
        b = min(per_batch, resamples - s)
        draws = rng.integers(0, a, size=(b, a)) + a * np.arange(b)[:, None]
        weights = np.bincount(draws.ravel(), minlength=a * b).reshape(b, a).astype(np.float64)
        out.append((weights @ sums) / np.maximum(weights @ counts, 1.0)[:, None])
    return np.concatenate(out)


def _listed(boot: Mapping[str, Any], i: int | slice) -> dict[str, Any]:
    """Column(s) `i` of a multi-column bootstrap result as plain floats or lists."""

    def pick(v):
        return None if v is None else v[i].tolist()

    return {"mean": pick(boot["mean"]), "lo": pick(boot["lo"]), "hi": pick(boot["hi"])}


# ----------------------------------------------------------------------------- statistics


def adjacent_by_position(lag1: np.ndarray, layout: Layout, bins: int, edge: int) -> dict[str, Any]:
    """Mean cos of adjacent chunks by where the pair sits in its article.

    relative: pair rank p of n-1 pairs mapped to p / (n - 2) in [0, 1], in `bins` equal bins;
    from_start / from_end: the first and last `edge` pairs of each article (rank among the rows).
    """
    rows = np.flatnonzero(np.isfinite(lag1))
    cos = lag1[rows].astype(np.float64)
    art = layout.row_article[rows]
    rank = rows - layout.article_starts[art]
    last = layout.article_lengths[art] - 2  # rank of the article's last possible pair
    rel = rank / np.maximum(last, 1)
    which = np.minimum((rel * bins).astype(np.int64), bins - 1)

    def means(index: np.ndarray, size: int, keep: np.ndarray) -> tuple[list[float | None], list[int]]:
        count = np.bincount(index[keep], minlength=size)[:size]
        total = np.bincount(index[keep], weights=cos[keep], minlength=size)[:size]
        return [float(t / c) if c else None for t, c in zip(total, count)], count.tolist()

    rel_mean, rel_count = means(which, bins, np.ones(len(rows), bool))
    start_mean, start_count = means(rank, edge, rank < edge)
    from_end = last - rank
    end_mean, end_count = means(from_end, edge, from_end < edge)
    return {
        "pairs": int(len(rows)),
        "mean": float(cos.mean()) if len(rows) else None,
        "relative": {"bin_edges": np.linspace(0, 1, bins + 1).tolist(), "mean": rel_mean, "count": rel_count},
        "from_start": {"mean": start_mean, "count": start_count},
        "from_end": {"mean": end_mean, "count": end_count},
    }


def window_stats(lag: np.ndarray, starts: np.ndarray, layout: Layout, k: int, s: Settings) -> dict[str, Any]:
    """Next-chunk windows (ctx = rows b..b+k-1, target b+k): similarity decay and the two deltas.

    - decay[j-1] = mean cos(target, ctx[-j]), j = 1..k.
    - mismatched delta = mean cos(target, ctx[-2]) - mean cos(target, ctx[-1]): a pair 2 apart
      against a pair 1 apart, i.e. the decay itself; the original read it as a "backward bias".
    - matched difference = mean cos(ctx[-1], next) - mean cos(ctx[-1], ctx[-2]): both pairs 1 apart.
      Per article it telescopes to [cos(last pair) - cos(pair k-2)] / (windows): a boundary term.
    """
    t = starts + k
    decay = np.stack([lag[j, t - j] for j in range(1, k + 1)], axis=1)
    last_prev = lag[1, t - 2]
    cols = np.column_stack([decay, last_prev, decay[:, 1] - decay[:, 0], decay[:, 0] - last_prev])
    boot = article_bootstrap(cols, layout.row_article[starts], s.bootstrap, s.seed + 1, s.level)
    return {
        "windows": int(len(starts)),
        "decay": _listed(boot, slice(0, k)),
        "cos_last_prev": _listed(boot, k),
        "mismatched_delta": _listed(boot, k + 1),
        "matched_difference": _listed(boot, k + 2),
        "articles": boot["articles"],
    }


def centred_rows(run: np.ndarray, m: int) -> np.ndarray:
    """Rows with m consecutive chunks of their article on both sides (run_ahead capped at >= 2m)."""
    idx = np.arange(len(run))
    return idx[(idx >= m) & (run[np.maximum(idx - m, 0)] >= 2 * m)]


def offset_profile(lag: np.ndarray, run: np.ndarray, layout: Layout, s: Settings) -> dict[str, Any] | None:
    """Mean cos(c_i, c_{i+k}) for k = -m..m over ONE set of anchors (every k uses the same i),
    and forward minus backward at matched distances d: cos(c_i, c_{i+d}) - cos(c_i, c_{i-d}).

    Anchors: rows with m consecutive chunks on both sides in their article. None without anchors.
    """
    m = s.max_offset
    anchors = centred_rows(run, m)
    if not len(anchors):
        return None
    prof = np.empty((len(anchors), 2 * m + 1), np.float32)
    for k in range(-m, m + 1):
        prof[:, m + k] = lag[k, anchors] if k >= 0 else lag[-k, anchors + k]
    asym = prof[:, m + 1 :] - prof[:, m - 1 :: -1][:, :m]
    boot = article_bootstrap(np.hstack([prof, asym]), layout.row_article[anchors], s.bootstrap, s.seed + 2, s.level)
    return {
        "anchors": boot["items"],
        "articles": boot["articles"],
        "offsets": list(range(-m, m + 1)),
        "profile": _listed(boot, slice(0, 2 * m + 1)),
        "distances": list(range(1, m + 1)),
        "forward_minus_backward": _listed(boot, slice(2 * m + 1, 3 * m + 1)),
    }


def far_pairs(layout: Layout, gap: int, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """`n` row pairs of one article more than `gap` chunks apart: a uniform row (among rows that
    have such a partner), then a uniform partner. Every chunk weighs the same, as in training."""
    art = layout.row_article.astype(np.int64)
    chunk = layout.chunk_indices.astype(np.int64)
    scale = int(chunk.max()) + gap + 1  # keeps key +- gap inside the row's own article
    key = art * scale + chunk
    before_end = np.searchsorted(key, key - gap, "left")  # rows [start, before_end) are far before
    after_start = np.searchsorted(key, key + gap, "right")  # rows [after_start, end) are far after
    start = layout.article_starts[art]
    end = start + layout.article_lengths[art]
    n_before = before_end - start
    n_after = end - after_start
    partners = n_before + n_after
    eligible = np.flatnonzero(partners > 0)
    if not len(eligible):
        return np.empty(0, np.int64), np.empty(0, np.int64)
    first = rng.choice(eligible, size=n)
    u = (rng.random(n) * partners[first]).astype(np.int64)
    second = np.where(u < n_before[first], start[first] + u, after_start[first] + u - n_before[first])
    return first, second


def cross_pairs(layout: Layout, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """`n` row pairs of different articles: a uniform row, then a uniform row of another article."""
    rows = len(layout.row_article)
    if layout.num_articles < 2:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    a, b = rng.integers(0, rows, n), rng.integers(0, rows, n)
    while True:
        same = np.flatnonzero(layout.row_article[a] == layout.row_article[b])
        if not len(same):
            return a, b
        b[same] = rng.integers(0, rows, len(same))


def similarity_pairs(X: np.ndarray, layout: Layout, s: Settings) -> dict[str, Any]:
    """Same article more than far_gap apart against different articles (sampled pairs, seeded)."""
    rng = np.random.default_rng([s.seed, 3])
    out: dict[str, Any] = {"far_gap": s.far_gap, "histogram_edges": HIST_EDGES.tolist()}
    for name, (a, b) in (
        ("same_article_far", far_pairs(layout, s.far_gap, s.pairs, rng)),
        ("different_articles", cross_pairs(layout, s.pairs, rng)),
    ):
        cos = pair_cos(X, a, b)
        out[name] = {
            "pairs": int(len(cos)),
            "mean": float(cos.mean()) if len(cos) else None,
            "std": float(cos.std()) if len(cos) else None,
            "histogram": np.histogram(cos, HIST_EDGES)[0].tolist(),
        }
    return out


def mean_vector(X: np.ndarray) -> np.ndarray:
    """Mean of the rows, accumulated in float64 block by block."""
    total = np.zeros(X.shape[1])
    for s in range(0, len(X), BLOCK):
        total += X[s : s + BLOCK].sum(0, dtype=np.float64)
    return total / len(X)


def anisotropy(mean: np.ndarray) -> dict[str, float]:
    """Norm of the mean vector (0: directions spread evenly; 1: all rows equal), and its square,
    which is about the mean cos of two random chunks."""
    norm = float(np.linalg.norm(mean))
    return {"mean_vector_norm": norm, "mean_vector_norm_squared": norm**2}


def near_duplicates(X: np.ndarray, lag1: np.ndarray, layout: Layout, s: Settings) -> dict[str, Any]:
    """Adjacent chunks with cos >= threshold, adjacent exact copies, exact copies anywhere in the store."""
    rows = np.flatnonzero(np.isfinite(lag1))
    near = rows[lag1[rows] >= s.near_duplicate]
    almost = rows[lag1[rows] >= _EXACT_CANDIDATE]  # exact copies have cos 1 up to float rounding
    exact = int(equal_rows(X, almost, almost + 1).sum())
    top = near[np.argsort(-lag1[near], kind="stable")[: s.examples]]
    art = layout.row_article
    return {
        "threshold": s.near_duplicate,
        "adjacent_pairs": int(len(rows)),
        "near_duplicate_pairs": int(len(near)),
        "near_duplicate_fraction": float(len(near) / len(rows)) if len(rows) else None,
        "exact_adjacent_pairs": exact,
        "exact_copies_anywhere": exact_copies(X, layout),
        "examples": [
            {
                "article": int(layout.article_ids[art[r]]),
                "chunks": [int(layout.chunk_indices[r]), int(layout.chunk_indices[r + 1])],
                "rows": [int(r), int(r + 1)],
                "cos": float(lag1[r]),
            }
            for r in top
        ],
    }


def exact_copies(X: np.ndarray, layout: Layout) -> dict[str, int]:
    """Rows bitwise equal to another row: extra copies, groups of copies, groups spanning articles.

    Rows are hashed (64-bit wrap-around arithmetic on the float bits, no [N, D] temporary); rows
    with equal hashes, neighbours once sorted by hash, are then compared exactly.
    """
    bits = X.view(np.uint32)
    weights = np.random.default_rng(0).integers(1, 2**63, X.shape[1], dtype=np.uint64) | np.uint64(1)
    h = np.empty(len(X), np.uint64)
    for s in range(0, len(X), BLOCK):
        h[s : s + BLOCK] = (bits[s : s + BLOCK].astype(np.uint64) * weights).sum(1, dtype=np.uint64)
    order = np.argsort(h, kind="stable")
    cand = np.flatnonzero(h[order][1:] == h[order][:-1])
    links = cand[equal_rows(X, order[cand], order[cand + 1])]
    if not len(links):
        return {"extra_copies": 0, "groups": 0, "groups_spanning_articles": 0}
    # A group of c copies is a chain of c-1 links between neighbours in hash order.
    new_group = np.concatenate(([True], np.diff(links) != 1))
    group = np.cumsum(new_group) - 1
    cross = layout.row_article[order[links]] != layout.row_article[order[links + 1]]
    return {"extra_copies": int(len(links)), "groups": int(new_group.sum()), "groups_spanning_articles": int(len(np.unique(group[cross])))}


# ----------------------------------------------------------------------------- baselines


def block_rows(starts: np.ndarray, k: int, direction: str) -> tuple[np.ndarray, np.ndarray]:
    """Context rows [n, k] and target rows [n] of the blocks b..b+k (k+1 consecutive chunks).

    forward: ctx = b..b+k-1 (ctx[-1] = b+k-1, nearest), target b+k.
    backward: ctx = b+k..b+1 (time-reversed, so ctx[-1] = b+1 is again the nearest), target b.
    """
    if direction == "forward":
        return starts[:, None] + np.arange(k), starts + k
    return starts[:, None] + np.arange(k, 0, -1), starts


def copy_last(context: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Baseline: the nearest context chunk."""
    return context[:, -1]


def mean_context(context: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Baseline: the normalised mean of the context."""
    return unit(context.mean(1))


def oracle(context: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The target itself: scores exactly 1 (a check of the scoring code)."""
    return target


@dataclass
class Gram:
    """Sufficient statistics of least squares on flattened contexts, shifted by (cx, cy) for accuracy."""

    xtx: np.ndarray
    xty: np.ndarray
    xs: np.ndarray
    ys: np.ndarray
    n: int
    cx: np.ndarray
    cy: np.ndarray

    def __add__(self, other: "Gram") -> "Gram":
        return Gram(self.xtx + other.xtx, self.xty + other.xty, self.xs + other.xs, self.ys + other.ys, self.n + other.n, self.cx, self.cy)


@dataclass(frozen=True)
class Ridge:
    """A linear map from the flattened context [K*D] to the target [D]: pred = x @ W + b."""

    W: np.ndarray
    b: np.ndarray

    def __call__(self, context: np.ndarray, target: np.ndarray) -> np.ndarray:
        return context.reshape(len(context), -1) @ self.W + self.b


@dataclass(frozen=True)
class SlotLinear:
    """One weight per context slot (lvm.metrics' slot-linear baseline, the one training reports)."""

    w: np.ndarray

    def __call__(self, context: np.ndarray, target: np.ndarray) -> np.ndarray:
        return unit(np.einsum("nkd,k->nd", context, self.w))


def fit_slot_linear(X: np.ndarray, ctx: np.ndarray, tgt: np.ndarray) -> SlotLinear:
    """Least-squares slot weights on the windows (ctx rows [n, k], target rows [n]), fitted by
    lvm.metrics.fit_slot_weights so that diagnosis and training report the same baseline."""
    step = max(1, BLOCK // ctx.shape[1])
    blocks = ((torch.from_numpy(X[ctx[s : s + step]]), torch.from_numpy(X[tgt[s : s + step]])) for s in range(0, len(tgt), step))
    return SlotLinear(fit_slot_weights(blocks).numpy())


def gram(X: np.ndarray, ctx: np.ndarray, tgt: np.ndarray, center: np.ndarray, desc: str = "", progress: bool = False) -> Gram:
    """Gram statistics of (flattened X[ctx], X[tgt]), both shifted by the vector `center`."""
    k, d = ctx.shape[1], X.shape[1]
    cx, cy = np.tile(center, k).astype(np.float32), center.astype(np.float32)
    g = Gram(np.zeros((k * d, k * d)), np.zeros((k * d, d)), np.zeros(k * d), np.zeros(d), len(tgt), cx, cy)
    step = max(1, BLOCK // k)
    for s in tqdm(range(0, len(tgt), step), desc=desc, unit="block", disable=not progress):
        x = X[ctx[s : s + step]].reshape(-1, k * d) - cx
        y = X[tgt[s : s + step]] - cy
        g.xtx += x.T @ x
        g.xty += x.T @ y
        g.xs += x.sum(0, dtype=np.float64)
        g.ys += y.sum(0, dtype=np.float64)
    return g


def prior_weights(kind: str, k: int, d: int) -> np.ndarray | None:
    """W0 of `solve_ridge`: None (shrink to zero) or the map x -> mean of the k context vectors."""
    return None if kind == "zero" else np.tile(np.eye(d), (k, 1)) / k


def solve_ridge(g: Gram, alpha: float, prior: np.ndarray | None = None) -> Ridge:
    """Ridge with an unpenalised intercept, closed form: argmin |Y - XW - b|^2 + alpha |W - W0|^2.

    W0 = `prior` (None: zero). Shrinking toward the mean of context instead of zero means a
    large alpha falls back to about that baseline (plus the intercept) rather than to a constant,
    which matters when windows are few for K*D features.
    """
    mx, my = g.xs / g.n, g.ys / g.n
    a = g.xtx - g.n * np.outer(mx, mx)
    rhs = g.xty - g.n * np.outer(mx, my)
    if prior is not None:
        rhs -= a @ prior  # ridge on the residual Y - X W0, then W = W0 + V
    a[np.diag_indices_from(a)] += alpha
    w = np.linalg.solve(a, rhs)
    if prior is not None:
        w += prior
    b = g.cy + my - (g.cx + mx) @ w
    return Ridge(w.astype(np.float32), b.astype(np.float32))


def score(
    X: np.ndarray, ctx: np.ndarray, tgt: np.ndarray, predictors: Mapping[str, Predictor], desc: str = "", progress: bool = False
) -> dict[str, dict[str, np.ndarray]]:
    """Per window and predictor: cos(pred, target) and cos(pred, ctx[-1]) (predictions normalised)."""
    out = {name: {"target": np.empty(len(tgt), np.float32), "last": np.empty(len(tgt), np.float32)} for name in predictors}
    step = max(1, BLOCK // ctx.shape[1])
    for s in tqdm(range(0, len(tgt), step), desc=desc, unit="block", disable=not progress):
        c, t = X[ctx[s : s + step]], X[tgt[s : s + step]]
        for name, predict in predictors.items():
            p = predict(c, t)
            out[name]["target"][s : s + step] = cos_rows(p, t)
            out[name]["last"][s : s + step] = cos_rows(p, c[:, -1])
    return out


def tune_ridge(
    X: np.ndarray, fit: tuple[np.ndarray, np.ndarray], tune: tuple[np.ndarray, np.ndarray], center: np.ndarray, s: Settings, label: str
) -> tuple[Ridge, dict[str, Any]]:
    """Pick alpha by mean cos on the tuning articles, then refit on fit + tune with that alpha."""
    g_fit = gram(X, *fit, center, f"ridge {label} fit", s.progress)
    g_tune = gram(X, *tune, center, f"ridge {label} tune", s.progress)
    prior = prior_weights(s.prior, fit[0].shape[1], X.shape[1])
    scores = {}
    for alpha in tqdm(s.alphas, desc=f"ridge {label} alphas", unit="alpha", disable=not s.progress):
        scores[alpha] = float(score(X, *tune, {"r": solve_ridge(g_fit, alpha, prior)})["r"]["target"].mean())
    best = max(scores, key=scores.get)
    info = {
        "alpha": best,
        "prior": s.prior,
        "tune_cos_by_alpha": {str(a): v for a, v in scores.items()},
        "fit_windows": int(len(fit[1])),
        "tune_windows": int(len(tune[1])),
    }
    return solve_ridge(g_fit + g_tune, best, prior), info


def baselines(
    X: np.ndarray, starts: np.ndarray, centred: np.ndarray, layout: Layout, split_of_article: np.ndarray, center: np.ndarray, s: Settings
) -> dict[str, Any]:
    """copy-last, mean of context, slot-linear and ridge on held-out articles.

    - next: every held-out next-chunk window (ctx = the K chunks before, target = the next one).
    - direction: the SAME held-out target chunks (`centred`: K chunks on both sides), predicted
      from the K chunks before (forward) or the K after (backward, time-reversed so ctx[-1] is the
      nearest). Same targets, so forward minus backward is paired: the arrow-of-time test.

    Ridge (one per direction) is fitted on the FIT articles' windows with alpha chosen on the TUNE
    articles (both outside the held-out split), then refitted on both; slot-linear on both. CIs: bootstrap over articles.
    """
    k = s.context
    split = split_of_article[layout.row_article[starts]]
    counts = {name: int((split == code).sum()) for name, code in (("fit", FIT), ("tune", TUNE), ("heldout", HELDOUT))}
    if min(counts.values()) == 0:
        return {"skipped": f"needs windows in every split, got {counts} (more articles, or another split.val/seed)", "windows": counts}
    rng = np.random.default_rng([s.seed, 4])
    train = _sample(starts[split != HELDOUT], s.max_train, rng)
    in_fit = split_of_article[layout.row_article[train]] == FIT
    if in_fit.all() or not in_fit.any():
        return {"skipped": "the ridge training sample has no window in the fit or the tune articles", "windows": counts}
    models, info = {}, {}
    for direction in ("forward", "backward"):
        ridge, info[direction] = tune_ridge(
            X, block_rows(train[in_fit], k, direction), block_rows(train[~in_fit], k, direction), center, s, direction
        )
        slot = fit_slot_linear(X, *block_rows(train, k, direction))
        info[direction]["slot_weights"] = [float(w) for w in slot.w]
        models[direction] = {"slot_linear": slot, "ridge": ridge}
    nxt = _sample(starts[split == HELDOUT], s.max_eval, rng)
    targets = centred[split_of_article[layout.row_article[centred]] == HELDOUT]
    chosen = _sample(targets, s.max_eval, rng)
    direction = None
    if len(chosen):
        sets = {
            "forward": (*block_rows(chosen - k, k, "forward"), models["forward"]),
            "backward": (*block_rows(chosen, k, "backward"), models["backward"]),
        }
        direction = _score_sets(X, sets, layout.row_article[chosen], s, s.seed + 6)
    return {
        "windows": counts,
        "train_sampled": int(len(train)),
        "ridge": info,
        "next": _score_sets(X, {"next": (*block_rows(nxt, k, "forward"), models["forward"])}, layout.row_article[nxt], s, s.seed + 5),
        "direction_targets": int(len(targets)),
        "direction": direction,
    }


def _score_sets(
    X: np.ndarray, sets: Mapping[str, tuple[np.ndarray, np.ndarray, Mapping[str, Predictor]]], groups: np.ndarray, s: Settings, seed: int
) -> dict[str, Any]:
    """Bootstrap means of cos(pred, target) and cos(pred, ctx[-1]) per set (ctx rows, target rows,
    fitted models) and predictor; for two sets on the same targets also their paired difference."""
    columns, names = [], []
    for label, (ctx, tgt, fitted) in sets.items():
        scored = score(X, ctx, tgt, {"copy_last": copy_last, "mean_context": mean_context, **fitted}, f"score {label}", s.progress)
        for name, cos in scored.items():
            for what, values in cos.items():
                columns.append(values)
                names.append((name, label, f"cos_{what}"))
    if len(sets) == 2:
        a, b = sets
        for name in BASELINES:
            columns.append(columns[names.index((name, a, "cos_target"))] - columns[names.index((name, b, "cos_target"))])
            names.append((name, f"{a}_minus_{b}", ""))
    boot = article_bootstrap(np.column_stack(columns), groups, s.bootstrap, seed, s.level)
    out: dict[str, Any] = {}
    for i, (name, label, what) in enumerate(names):
        if what:
            out.setdefault(name, {}).setdefault(label, {})[what] = _listed(boot, i)
        else:
            out.setdefault(name, {})[label] = _listed(boot, i)
    return {"scored": boot["items"], "articles": boot["articles"], "predictors": out}


def _sample(rows: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """All of `rows`, or `n` of them drawn uniformly without replacement (kept sorted)."""
    return rows if len(rows) <= n else np.sort(rng.choice(rows, n, replace=False))


# ----------------------------------------------------------------------------- everything


def diagnose(X: np.ndarray, layout: Layout, split_of_article: np.ndarray, s: Settings, source: str = "<arrays>") -> dict[str, Any]:
    """Every statistic of the store (see the module docstring and docs/data.md), as a JSON-ready dict.

    `split_of_article` [A] holds FIT, TUNE or HELDOUT per article (for the baselines). Raises
    DataError naming `source` when no article holds a window (context + 1 consecutive chunks).
    """
    seconds: dict[str, float] = {}

    def timed(name: str, fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        log.info("diagnose: %s", name)
        value = fn()
        seconds[name] = time.perf_counter() - t0
        return value

    k = s.context
    run = run_ahead(layout, 2 * max(k, s.max_offset))
    starts = np.flatnonzero(run >= k)
    if not len(starts):
        longest = int(run.max()) + 1
        raise DataError(
            f"{source}: no window: no article has {k + 1} consecutive chunks (context={k} + the next one); the longest run is {longest}"
        )
    lag = timed("lag cosines", lambda: lag_cosines(X, run, max(k, s.max_offset), s.progress))
    center = timed("mean vector", lambda: mean_vector(X))
    return {
        "adjacent": timed("adjacent by position", lambda: adjacent_by_position(lag[1], layout, s.position_bins, s.edge_pairs)),
        "windows": timed("windows", lambda: window_stats(lag, starts, layout, k, s)),
        "offset_profile": timed("offset profile", lambda: offset_profile(lag, run, layout, s)),
        "similarity": timed("within vs cross article", lambda: similarity_pairs(X, layout, s)),
        "anisotropy": anisotropy(center),
        "near_duplicates": timed("near duplicates", lambda: near_duplicates(X, lag[1], layout, s)),
        "baselines": timed("baselines", lambda: baselines(X, starts, centred_rows(run, k), layout, split_of_article, center, s)),
        "seconds": seconds,
    }
