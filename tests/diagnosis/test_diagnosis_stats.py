"""lvm/diagnosis/stats.py, baselines.py and layout.py: every statistic against values computed
independently on small hand-made stores (closed forms, brute force), and how the report reads them."""

from __future__ import annotations

import numpy as np
import pytest

from lvm.data.store import ArticleStore
from lvm.diagnosis import baselines, layout, stats
from lvm.diagnosis.diagnose import parse_settings, read_layout, split_codes
from lvm.diagnosis.report import findings
from lvm.runtime.errors import ConfigError
from tests.helpers import STANDARD, THETA, compose_cfg, rotation_store, unit_rows


def settings(*overrides: str) -> layout.Settings:
    """Settings from conf/diagnose.yaml with `overrides` (the config holds every default)."""
    return parse_settings(compose_cfg("diagnose", "store=unused.npz", "progress=false", *overrides))


FAST = settings("max_offset=3", "pairs=20000", "bootstrap=200", "ridge.alphas=[1e-6,1.0]")


def diagnose(store: ArticleStore, settings: layout.Settings = FAST) -> dict:
    codes, _ = split_codes(store, 0.3, 0.3, 0)
    return stats.diagnose(store.vectors.numpy(), read_layout(store), codes, settings)


# ----------------------------------------------------------------------------- closed forms


def test_rotation_store_matches_closed_forms():
    lengths = [12, 15, 9, 20, 14, 11, 18, 10, 16, 13]
    store = rotation_store(lengths)
    r = diagnose(store)
    c = np.cos
    w = r["windows"]
    assert w["windows"] == sum(n - 5 for n in lengths) == len(store.windows(STANDARD))
    np.testing.assert_allclose(w["decay"]["mean"], c(THETA * np.arange(1, 6)), atol=1e-5)
    assert w["cos_last_prev"]["mean"] == pytest.approx(c(THETA), abs=1e-5)
    assert w["matched_difference"]["mean"] == pytest.approx(0, abs=1e-5)
    assert w["mismatched_delta"]["mean"] == pytest.approx(c(2 * THETA) - c(THETA), abs=1e-5)
    adj = r["adjacent"]
    assert adj["pairs"] == sum(n - 1 for n in lengths)
    np.testing.assert_allclose([m for m in adj["relative"]["mean"] if m is not None], c(THETA), atol=1e-5)
    prof = r["offset_profile"]
    assert prof["anchors"] == sum(n - 6 for n in lengths)  # max_offset 3 on both sides
    np.testing.assert_allclose(prof["profile"]["mean"], c(THETA * np.arange(-3, 4)), atol=1e-5)
    np.testing.assert_allclose(prof["forward_minus_backward"]["mean"], 0, atol=1e-5)
    sim = r["similarity"]
    assert sim["different_articles"]["mean"] == pytest.approx(0, abs=1e-6)  # orthogonal planes
    # Every chunk weighs the same: mean over chunks of the mean over its far partners.
    far = [np.mean([c(THETA * (j - i)) for j in range(n) if abs(j - i) > 3]) for n in lengths for i in range(n)]
    assert sim["same_article_far"]["mean"] == pytest.approx(np.mean(far), abs=0.015)
    nd = r["near_duplicates"]
    assert nd["near_duplicate_pairs"] == 0 and nd["exact_copies_anywhere"]["extra_copies"] == 0
    b = r["baselines"]
    nxt, direction = b["next"]["predictors"], b["direction"]["predictors"]
    for scores, key in ((nxt, "next"), (direction, "forward"), (direction, "backward")):
        assert scores["copy_last"][key]["cos_target"]["mean"] == pytest.approx(c(THETA), abs=1e-5)
        assert scores["copy_last"][key]["cos_last"]["mean"] == pytest.approx(1.0, abs=1e-6)
        # The mean of 5 unit vectors at angles phi-2t..phi+2t points at phi: 3 steps from the target.
        assert scores["mean_context"][key]["cos_target"]["mean"] == pytest.approx(c(3 * THETA), abs=1e-5)
    assert direction["copy_last"]["forward_minus_backward"]["mean"] == pytest.approx(0, abs=1e-5)
    heldout = [n for a, n in enumerate(lengths) if split_codes(store, 0.3, 0.3, 0)[0][a] == layout.HELDOUT]
    assert b["next"]["scored"] == sum(n - 5 for n in heldout) and b["direction"]["scored"] == sum(max(n - 10, 0) for n in heldout)
    assert findings(r)  # findings read the report without error


def test_slot_linear_is_exact_on_rotations_and_agrees_with_training():
    """On a rotation by a constant angle c_{t+1} = 2 cos(theta) c_t - c_{t-1}: slot-linear predicts
    every held-out chunk exactly. Its weights are fitted on the training windows by
    lvm.metrics.fit_slot_weights (as lvm.train does), checked against numpy least squares on a
    store where they are unique."""
    store = rotation_store([12, 15, 9, 20, 14, 11, 18, 10, 16, 13])
    r = diagnose(store)
    b = r["baselines"]
    assert b["next"]["predictors"]["slot_linear"]["next"]["cos_target"]["mean"] == pytest.approx(1.0, abs=1e-5)
    codes, _ = split_codes(store, 0.3, 0.3, 0)
    starts = np.flatnonzero(stats.run_ahead(read_layout(store), 5) >= 5)
    train = starts[codes[store.row_article[starts]] != layout.HELDOUT]
    X = store.vectors.numpy()
    np.testing.assert_allclose(
        b["ridge"]["forward"]["slot_weights"], baselines.fit_slot_linear(X, *baselines.block_rows(train, 5, "forward")).w
    )
    X = unit_rows(300, 8, seed=3)
    ctx, tgt = baselines.block_rows(np.arange(0, 290, 3), 5, "forward")
    expected, *_ = np.linalg.lstsq(
        X[ctx].astype(np.float64).transpose(0, 2, 1).reshape(-1, 5), X[tgt].astype(np.float64).reshape(-1), rcond=None
    )
    np.testing.assert_allclose(baselines.fit_slot_linear(X, ctx, tgt).w, expected, rtol=1e-9, atol=1e-12)


def test_ridge_learns_a_shared_rotation_and_oracle_scores_one():
    store = rotation_store([14, 17, 12, 20, 15, 16, 13, 18, 19, 11, 14, 16], shared_plane=True)
    r = diagnose(store)
    b = r["baselines"]
    for scores, key in (
        (b["next"]["predictors"]["ridge"], "next"),
        (b["direction"]["predictors"]["ridge"], "forward"),
        (b["direction"]["predictors"]["ridge"], "backward"),
    ):
        assert scores[key]["cos_target"]["mean"] == pytest.approx(1.0, abs=1e-4)
        assert scores[key]["cos_last"]["mean"] == pytest.approx(np.cos(THETA), abs=1e-4)
    for direction in ("forward", "backward"):
        assert b["ridge"][direction]["alpha"] == 1e-6 and b["ridge"][direction]["prior"] == "mean_context"
    X = store.vectors.numpy()
    starts = np.flatnonzero(stats.run_ahead(read_layout(store), 5) >= 5)
    scored = baselines.score(X, *baselines.block_rows(starts, 5, "backward"), {"oracle": baselines.oracle})
    np.testing.assert_allclose(scored["oracle"]["target"], 1.0, atol=1e-6)


def test_solve_ridge_recovers_an_exact_linear_map():
    rng = np.random.default_rng(0)
    k, d, n = 3, 4, 200
    W, b = rng.standard_normal((k * d, d)), rng.standard_normal(d)
    ctx_vectors = rng.standard_normal((n * k, d))
    targets = ctx_vectors.reshape(n, k * d) @ W + b
    X = np.concatenate([ctx_vectors, targets]).astype(np.float32)
    ctx, tgt = np.arange(n * k).reshape(n, k), n * k + np.arange(n)
    g = baselines.gram(X, ctx, tgt, center=X.mean(0))
    half = baselines.gram(X, ctx[:100], tgt[:100], X.mean(0)) + baselines.gram(X, ctx[100:], tgt[100:], X.mean(0))
    np.testing.assert_allclose(half.xtx, g.xtx, rtol=1e-5, atol=1e-4)  # Gram statistics add up (float32 blocks)
    for prior in (None, baselines.prior_weights("mean_context", k, d)):
        fit = baselines.solve_ridge(g, 1e-8, prior)
        np.testing.assert_allclose(fit.W, W, atol=1e-3)
        np.testing.assert_allclose(fit.b, b, atol=1e-3)


def test_ridge_shrinks_toward_its_prior():
    X = unit_rows(80, 6, seed=1)
    ctx, tgt = baselines.block_rows(np.arange(0, 70, 2), 5, "forward")
    g = baselines.gram(X, ctx, tgt, X.mean(0))
    c = X[ctx]
    toward_mean = baselines.solve_ridge(g, 1e9, baselines.prior_weights("mean_context", 5, 6))
    # W -> W0 (the mean of the context); the intercept absorbs the mean target minus the mean prediction.
    np.testing.assert_allclose(toward_mean(c, None), c.mean(1) + X[tgt].mean(0) - c.mean(1).mean(0), atol=1e-4)
    toward_zero = baselines.solve_ridge(g, 1e9, baselines.prior_weights("zero", 5, 6))
    np.testing.assert_allclose(toward_zero(c, None), np.tile(X[tgt].mean(0), (len(c), 1)), atol=1e-4)


def test_baseline_scores_equal_direct_computation():
    X = unit_rows(60, 8, seed=3)
    starts = np.array([0, 7, 20, 33, 50])
    ctx, tgt = baselines.block_rows(starts, 5, "forward")
    bctx, btgt = baselines.block_rows(starts, 5, "backward")
    assert (ctx[:, -1] == starts + 4).all() and (tgt == starts + 5).all()
    assert (bctx[:, -1] == starts + 1).all() and (bctx[:, 0] == starts + 5).all() and (btgt == starts).all()
    scored = baselines.score(
        X, ctx, tgt, {"copy_last": baselines.copy_last, "mean_context": baselines.mean_context, "oracle": baselines.oracle}
    )
    for i, (c, t) in enumerate(zip(ctx, tgt)):
        mean = X[c].mean(0)
        assert scored["copy_last"]["target"][i] == pytest.approx(X[c[-1]] @ X[t], abs=1e-6)
        assert scored["mean_context"]["target"][i] == pytest.approx(mean @ X[t] / np.linalg.norm(mean), abs=1e-6)
        assert scored["mean_context"]["last"][i] == pytest.approx(mean @ X[c[-1]] / np.linalg.norm(mean), abs=1e-6)
    np.testing.assert_allclose(scored["oracle"]["target"], 1.0, atol=1e-6)


# ----------------------------------------------------------------------------- direction


def growing_steps(lengths: list[int], seed: int = 0) -> list[np.ndarray]:
    """Step angles that grow along every article: later pairs are less similar."""
    return [0.1 + 0.04 * np.arange(n) + np.random.default_rng([seed, a]).uniform(0, 0.02, n) for a, n in enumerate(lengths)]


def test_asymmetric_store_forward_differs_from_backward_by_construction():
    lengths = [14, 17, 12, 20, 15, 16, 13, 18]
    steps = growing_steps(lengths)
    r = diagnose(rotation_store(lengths, steps))
    fb = r["offset_profile"]["forward_minus_backward"]
    m = 3
    for d in range(1, m + 1):
        # Brute force: anchors i with m chunks on both sides, angle between chunks = sum of steps.
        diffs = []
        for st, n in zip(steps, lengths):
            phase = np.concatenate(([0.0], np.cumsum(st[1:n])))
            diffs += [np.cos(phase[i + d] - phase[i]) - np.cos(phase[i] - phase[i - d]) for i in range(m, n - m)]
        assert fb["mean"][d - 1] == pytest.approx(np.mean(diffs), abs=1e-5)
        assert fb["hi"][d - 1] < 0  # the interval excludes 0
    assert "telescopes" in " ".join(findings(r))  # read as drift along the article, not direction


def test_time_symmetric_store_interval_includes_zero():
    # Noisy articles plus each one reversed: the ensemble is symmetric under time reversal by construction.
    rng = np.random.default_rng(5)
    lengths = rng.integers(12, 30, 20)
    topic = baselines.unit(rng.standard_normal((20, 16)))
    rows = [baselines.unit(topic[a] + 0.2 * rng.standard_normal((n, 16))) for a, n in enumerate(lengths)]
    rows += [r[::-1] for r in rows]
    art = np.concatenate([np.full(len(r), a) for a, r in enumerate(rows)])
    store = ArticleStore(np.concatenate(rows).astype(np.float32), art, np.concatenate([np.arange(len(r)) for r in rows]))
    r = diagnose(store)
    fb = r["offset_profile"]["forward_minus_backward"]
    np.testing.assert_allclose(fb["mean"], 0, atol=1e-6)
    assert all(lo < 0 < hi for lo, hi in zip(fb["lo"], fb["hi"]))
    assert "no measurable difference" in " ".join(findings(r))


def test_matched_window_difference_is_a_boundary_term():
    n, k = 23, 5
    store = ArticleStore(unit_rows(n, 8, seed=2), np.zeros(n, int), np.arange(n))
    r = diagnose(store, settings("bootstrap=10", "pairs=100"))
    X = store.vectors.numpy()
    pair = lambda i: float(X[i] @ X[i + 1])  # noqa: E731
    assert r["windows"]["matched_difference"]["mean"] == pytest.approx((pair(n - 2) - pair(k - 2)) / (n - k), abs=1e-6)
    assert r["windows"]["matched_difference"]["lo"] is None  # one article: no interval
    assert "skipped" in r["baselines"]  # one article cannot be split


# ----------------------------------------------------------------------------- pieces


def test_gaps_in_chunk_indices_are_never_bridged():
    store = ArticleStore(unit_rows(9, 4), np.array([0] * 6 + [1] * 3), np.array([0, 1, 2, 4, 5, 6, 0, 1, 2]))
    layout = read_layout(store)
    np.testing.assert_array_equal(stats.run_ahead(layout, 9), [2, 1, 0, 2, 1, 0, 2, 1, 0])
    lag = stats.lag_cosines(store.vectors.numpy(), stats.run_ahead(layout, 9), 2)
    assert np.isnan(lag[1, [2, 5, 8]]).all() and np.isnan(lag[2, [1, 2, 4, 5]]).all()
    assert lag[2, 3] == pytest.approx(float(store.vectors[3] @ store.vectors[5]), abs=1e-6)


def test_near_duplicates_and_exact_copies():
    base = unit_rows(10, 8, seed=4)
    near = baselines.unit(base[2] + 0.1 * unit_rows(1, 8, seed=9)[0])  # cos ~0.995 with base[2]
    X = np.stack([base[0], base[0], base[1], base[2], near, base[3], base[4], base[0], base[5], base[6]]).astype(np.float32)
    store = ArticleStore(X, np.array([0] * 5 + [1] * 5), np.r_[0:5, 0:5])
    lag1 = stats.lag_cosines(X, stats.run_ahead(read_layout(store), 1), 1)[1]
    nd = stats.near_duplicates(X, lag1, read_layout(store), settings("examples=5"))
    expected = sum(float(X[i] @ X[i + 1]) >= 0.95 for i in range(9) if i != 4)
    assert nd["adjacent_pairs"] == 8 and nd["near_duplicate_pairs"] == expected == 2
    assert nd["exact_adjacent_pairs"] == 1
    assert nd["exact_copies_anywhere"] == {"extra_copies": 2, "groups": 1, "groups_spanning_articles": 1}
    assert nd["examples"][0]["rows"] == [0, 1] and nd["examples"][0]["article"] == 0


def test_anisotropy_of_known_sets():
    e = np.eye(4, dtype=np.float32)
    assert stats.anisotropy(stats.mean_vector(np.tile(e[0], (10, 1))))["mean_vector_norm"] == pytest.approx(1.0)
    assert stats.anisotropy(stats.mean_vector(np.stack([e[0], -e[0]] * 5)))["mean_vector_norm"] == pytest.approx(0.0)
    a = stats.anisotropy(stats.mean_vector(np.stack([e[0], e[1]] * 5)))
    assert a["mean_vector_norm"] == pytest.approx(np.sqrt(0.5)) and a["mean_vector_norm_squared"] == pytest.approx(0.5)


def test_pair_samples_weigh_every_chunk_the_same():
    store = ArticleStore(unit_rows(17, 4), np.array([0] * 9 + [1] * 3 + [2] * 5), np.r_[0:9, 0:3, 0:10:2])
    layout = read_layout(store)
    n = 60_000
    a, b = stats.far_pairs(layout, 3, n, np.random.default_rng(0))
    art, chunk = layout.row_article, layout.chunk_indices.astype(int)
    assert (art[a] == art[b]).all() and (np.abs(chunk[a] - chunk[b]) > 3).all()
    partners = {i: [j for j in range(17) if art[i] == art[j] and abs(chunk[i] - chunk[j]) > 3] for i in range(17)}
    rows = [i for i in partners if partners[i]]
    assert set(np.unique(a)) == set(rows)  # article 1 (3 chunks) and the middle of article 2 have none
    for i in rows:  # each chunk equally often first, its partners equally often second
        expected = n / len(rows) / len(partners[i])
        for j in partners[i]:
            assert abs(np.sum((a == i) & (b == j)) - expected) < 0.2 * expected
    a, b = stats.cross_pairs(layout, 5000, np.random.default_rng(1))
    assert (art[a] != art[b]).all()


def test_article_bootstrap():
    values = np.array([1.0, 1.0, 1.0, 3.0, 5.0])
    groups = np.array([7, 7, 7, 2, 2])
    boot = layout.article_bootstrap(values, groups, 500, seed=0)
    assert boot["mean"] == pytest.approx(11 / 5) and boot["articles"] == 2 and boot["items"] == 5
    assert 1.0 <= boot["lo"] <= boot["mean"] <= boot["hi"] <= 4.0  # article means are 1 and 4
    assert layout.article_bootstrap(values, np.zeros(5), 500, 0)["lo"] is None


def test_settings_are_checked():
    with pytest.raises(ConfigError, match="max_offset"):
        settings("max_offset=0")
    with pytest.raises(ConfigError, match="wrong type"):
        settings("pairs=many")
