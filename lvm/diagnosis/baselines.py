"""Predictive baselines of the diagnosis: how well simple predictors guess a chunk from its context.

copy-last, mean of context, slot-linear (the baseline training reports) and ridge on the
flattened context, fitted on the FIT / TUNE articles and scored on held-out ones, for the next
chunk and for the same targets predicted forward and backward (the arrow-of-time test). Predictions
are normalised before scoring; CIs come from `core.article_bootstrap`. Called by
`lvm.diagnosis.stats.diagnose`; imports only lvm/diagnosis/layout.py of the diagnosis, so no cycle.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from lvm.diagnosis.layout import BLOCK, FIT, HELDOUT, TUNE, Layout, Settings, article_bootstrap, listed
from lvm.evaluation.metrics import fit_slot_weights

BASELINES = ("copy_last", "mean_context", "slot_linear", "ridge")

Predictor = Callable[[np.ndarray, np.ndarray], np.ndarray]


def unit(x: np.ndarray) -> np.ndarray:
    """Rows of `x` scaled to unit length (zero rows stay zero)."""
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(norm > 0, norm, 1.0)


def cos_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-row cosine of two [n, D] arrays (both normalised here)."""
    return np.einsum("ij,ij->i", unit(a), unit(b))


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
            out.setdefault(name, {}).setdefault(label, {})[what] = listed(boot, i)
        else:
            out.setdefault(name, {})[label] = listed(boot, i)
    return {"scored": boot["items"], "articles": boot["articles"], "predictors": out}


def _sample(rows: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """All of `rows`, or `n` of them drawn uniformly without replacement (kept sorted)."""
    return rows if len(rows) <= n else np.sort(rng.choice(rows, n, replace=False))
