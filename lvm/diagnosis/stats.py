"""What an article store can and cannot teach: plain-numpy statistics behind `lvm.diagnosis.diagnose`.

Every statistic works on unit chunk vectors X [N, D] (rows sorted by article, then chunk) and a
`Layout` of the rows (lvm/diagnosis/layout.py). "Adjacent" and "k apart" always mean consecutive
chunk indices inside one article, so a gap in the chunk indices is never bridged. Cosines between
store rows are dot products (the store guarantees unit rows). This module holds the row geometry,
the lag / position / offset / similarity / duplicate statistics and `diagnose`, which runs them
all plus the predictive baselines of lvm/diagnosis/baselines.py.

Averages pool all items (pairs, windows, anchors); their confidence intervals come from a
bootstrap over articles (`core.article_bootstrap`), because items of one article are correlated.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from lvm.diagnosis.baselines import baselines
from lvm.diagnosis.layout import BLOCK, Layout, Settings, article_bootstrap, listed
from lvm.runtime.errors import DataError

log = logging.getLogger(__name__)

# Histogram bins for the within/cross-article cosine distributions.
HIST_EDGES = np.linspace(-1.0, 1.0, 101)
# Adjacent pairs at least this similar are compared bit for bit to count exact copies.
_EXACT_CANDIDATE = 0.9999


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
        "decay": listed(boot, slice(0, k)),
        "cos_last_prev": listed(boot, k),
        "mismatched_delta": listed(boot, k + 1),
        "matched_difference": listed(boot, k + 2),
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
        "profile": listed(boot, slice(0, 2 * m + 1)),
        "distances": list(range(1, m + 1)),
        "forward_minus_backward": listed(boot, slice(2 * m + 1, 3 * m + 1)),
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
