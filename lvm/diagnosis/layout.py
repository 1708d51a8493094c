"""Shared ground of the diagnosis (`lvm.diagnosis.stats` and `lvm.diagnosis.baselines`).

The `Layout` of the store rows (article, chunk index; rows sorted by article, then chunk), the
`Settings` of `diagnose`, the split codes and block size, and the bootstrap over articles that
every confidence interval uses (items of one article are correlated, so whole articles are
resampled). Kept apart so that the statistics and the baselines both import it without a cycle.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from lvm.runtime.errors import ConfigError, require

# Rows (or windows) handled per vectorised step: bounds temporaries to a few tens of MB at D=768.
BLOCK = 8192
# Bootstrap weights are drawn in batches of at most this many (resample x article) cells.
_BOOT_CELLS = 1 << 22
# Split codes of `diagnose(split_of_article=...)`.
FIT, TUNE, HELDOUT = 0, 1, 2

# What ridge shrinks its weights toward: zero, or the weights of the mean-of-context predictor.
PRIORS = ("mean_context", "zero")


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
    place); `lvm.diagnosis.diagnose.parse_settings` builds this from that config node."""

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


def listed(boot: Mapping[str, Any], i: int | slice) -> dict[str, Any]:
    """Column(s) `i` of a multi-column bootstrap result as plain floats or lists."""

    def pick(v):
        return None if v is None else v[i].tolist()

    return {"mean": pick(boot["mean"]), "lo": pick(boot["lo"]), "hi": pick(boot["hi"])}
