"""The synthetic corpus: deterministic, well-formed, and calibrated as documented."""

from __future__ import annotations

import numpy as np
import pytest

from lvm.data.splits import make_splits
from lvm.data.store import ArticleStore, WindowSpec
from lvm.data.synthetic import synthetic_corpus

P6 = WindowSpec(context=5, target_offset=2, prev_slot=-2)
# The shipped defaults (conf/data/synthetic.yaml) except size.
KW = dict(topic_weight=1.0, drift_weight=1.0, drift_step=0.5, noise=1.2)


def corpus(seed: int = 0, dim: int = 16, articles: int = 20, min_chunks: int = 3, max_chunks: int = 9, **kw):
    args = KW | kw
    return synthetic_corpus(dim=dim, articles=articles, min_chunks=min_chunks, max_chunks=max_chunks, seed=seed, **args)


def test_deterministic_for_a_seed():
    a, b = corpus(seed=7), corpus(seed=7)
    for x, y in zip(a, b):
        assert np.array_equal(x, y)


def test_differs_across_seeds():
    v0, a0, c0 = corpus(seed=0, min_chunks=10, max_chunks=10)
    v1, a1, c1 = corpus(seed=1, min_chunks=10, max_chunks=10)
    assert np.array_equal(a0, a1) and np.array_equal(c0, c1)  # fixed lengths: same layout
    assert not np.allclose(v0, v1)
    _, a2, _ = corpus(seed=2, max_chunks=30)
    _, a3, _ = corpus(seed=3, max_chunks=30)
    assert not np.array_equal(np.bincount(a2), np.bincount(a3))  # lengths drawn from the seed


def test_shapes_dtypes_unit_vectors():
    v, a, c = corpus(dim=24, articles=15)
    assert v.dtype == np.float32 and v.ndim == 2 and v.shape[1] == 24
    assert a.shape == c.shape == (len(v),)
    assert np.issubdtype(a.dtype, np.integer) and np.issubdtype(c.dtype, np.integer)
    np.testing.assert_allclose(np.linalg.norm(v.astype(np.float64), axis=1), 1.0, atol=1e-5)
    assert np.isfinite(v).all()


def test_lengths_and_order():
    v, a, c = corpus(articles=40, min_chunks=4, max_chunks=11)
    assert np.array_equal(np.unique(a), np.arange(40))
    lengths = np.bincount(a)
    assert lengths.min() >= 4 and lengths.max() <= 11
    assert len(set(lengths.tolist())) > 1  # really random lengths
    assert (np.diff(a) >= 0).all()  # sorted by article
    for art in range(40):
        assert np.array_equal(c[a == art], np.arange(lengths[art]))  # chunks 0..L-1 in order
    store = ArticleStore(v, a, c, normalize="error")  # unit vectors pass the strict policy
    assert np.array_equal(store.vectors.numpy(), v)  # already sorted: rows untouched
    assert len(v) == lengths.sum()


def test_fixed_length():
    _, a, _ = corpus(articles=6, min_chunks=5, max_chunks=5)
    assert np.bincount(a).tolist() == [5] * 6


def test_chunks_drift_within_article():
    # Adjacent chunks of an article are more alike than chunks of different articles.
    v, a, c = corpus(dim=64, articles=50, min_chunks=10, max_chunks=10)
    v = v.reshape(50, 10, 64)
    adjacent = np.einsum("atd,atd->at", v[:, 1:], v[:, :-1]).mean()
    cross = np.einsum("atd,atd->at", v[1:], v[:-1]).mean()
    assert adjacent > 0.3 and abs(cross) < 0.1


def cos(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return (x * y).sum(-1) / (np.linalg.norm(x, axis=-1) * np.linalg.norm(y, axis=-1))


@pytest.fixture(scope="module")
def calibration():
    v, a, c = synthetic_corpus(dim=64, articles=300, min_chunks=12, max_chunks=60, seed=0, **KW)
    store = ArticleStore(v, a, c)
    sp = make_splits(store, P6, val=0.2, ood=0.0, seed=0)
    out = {}
    for name in ("train", "val"):
        b = sp[name].gather(np.arange(len(sp[name])))
        out[name] = (b["context"].numpy().astype(np.float64), b["target"].numpy().astype(np.float64))
    return out


def test_calibration_mean_of_context_beats_copy_last(calibration):
    ctx, tgt = calibration["val"]
    copy_last = cos(ctx[:, -1], tgt).mean()
    mean_ctx = cos(ctx.mean(1), tgt).mean()
    assert mean_ctx - copy_last > 0.03, (mean_ctx, copy_last)
    assert 0.3 < copy_last < 0.8  # a sensible regime, not trivially easy or hopeless


def test_calibration_linear_predictor_sits_closer_to_last_context(calibration):
    ctx, tgt = calibration["train"]
    x = ctx.reshape(len(ctx), -1)
    # Ridge-regularised least squares via the normal equations (fast and stable).
    w = np.linalg.solve(x.T @ x + 1e-3 * np.eye(x.shape[1]), x.T @ tgt)
    vctx, vtgt = calibration["val"]
    pred = vctx.reshape(len(vctx), -1) @ w
    cos_target = cos(pred, vtgt).mean()
    cos_last = cos(pred, vctx[:, -1]).mean()
    assert cos_target - cos_last < 0, (cos_target, cos_last)  # negative margin by design
    assert cos_target > cos(vctx[:, -1], vtgt).mean()  # and still beats copy-last on the target


def test_common_direction_makes_data_anisotropic_and_zero_changes_nothing():
    plain = corpus(seed=3, dim=64, articles=200)
    zero = corpus(seed=3, dim=64, articles=200, common_weight=0.0)
    assert all(np.array_equal(a, b) for a, b in zip(plain, zero))
    aniso, articles, _ = corpus(seed=3, dim=64, articles=200, common_weight=2.5)
    assert np.array_equal(articles, plain[1])
    rng = np.random.default_rng(0)
    i, j = rng.integers(0, len(aniso), 4000), rng.integers(0, len(aniso), 4000)
    pair = lambda v: float(np.mean(np.sum(v[i] * v[j], axis=1)))  # noqa: E731
    assert abs(pair(plain[0])) < 0.05 and 0.55 < pair(aniso) < 0.75  # conf/data/anisotropic.yaml: random pairs ~0.64
    np.testing.assert_allclose(np.linalg.norm(aniso, axis=1), 1.0, atol=1e-5)


def test_the_generator_refuses_impossible_settings_with_the_start_up_check_s_line():
    """synthetic_corpus and start-up validation share one check (lvm.data.synthetic.check_synthetic)."""
    from lvm.data.synthetic import synthetic_corpus

    args = dict(dim=8, articles=3, min_chunks=9, max_chunks=4, topic_weight=1.0, drift_weight=1.0, drift_step=0.5, noise=-1.0, seed=0)
    with pytest.raises(ValueError, match=r"min_chunks <= max_chunks \(got 9, 4\); data.synthetic.noise"):
        synthetic_corpus(**args)
