"""Metric functions with the oracle, copy-last and mean-of-context predictions, against numpy."""

import numpy as np
import pytest
import torch

from lvm import metrics as M
from lvm.data.store import ArticleStore, WindowSpec


def tiny_store(seed=0, d=16, lengths=(9, 12, 7, 10)):
    rng = np.random.default_rng(seed)
    n = sum(lengths)
    v = rng.standard_normal((n, d)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    art = np.repeat(np.arange(len(lengths)), lengths)
    chunk = np.concatenate([np.arange(n_) for n_ in lengths])
    return ArticleStore(v, art, chunk, "tiny")


@pytest.fixture(scope="module")
def setup():
    store = tiny_store()
    windows = store.windows(WindowSpec(5, 2, -2))
    batch = windows.gather(np.arange(len(windows)))
    start, length = store.article_span(batch["target_row"].numpy())
    return store, windows, batch, torch.from_numpy(start), torch.from_numpy(length)


def numpy_within_article_rank(pred, store, target_row):
    """Naive loop: rank of the target among its article's chunks by cosine."""
    out = []
    vec = store.vectors.numpy()
    for p, r in zip(pred, target_row):
        art = store.article_ids[r]
        rows = np.flatnonzero(store.article_ids == art)
        p = p / np.linalg.norm(p)
        scores = vec[rows] @ p
        out.append(1 + int(np.sum(scores > scores[rows == r][0])))
    return np.array(out)


def test_oracle(setup):
    store, _, b, start, length = setup
    pred = b["target"]
    assert torch.allclose(M.cos(pred, b["target"]), torch.ones(len(pred)), atol=1e-6)
    ranks = M.within_article_ranks(pred, store.vectors, b["target_row"], start, length)
    assert (ranks == 1).all()
    assert M.recall_at(ranks, 1).item() == 1.0 and M.mrr(ranks).item() == 1.0
    expected_margin = 1 - np.sum(b["target"].numpy() * b["context"][:, -1].numpy(), axis=1)
    assert np.allclose(M.margin(pred, b["target"], b["context"][:, -1]).numpy(), expected_margin, atol=1e-6)
    assert (M.six_bank_ranks(pred, b["context"], b["target"]) == 1).all()


def test_copy_last(setup):
    store, _, b, start, length = setup
    pred = M.copy_last(b["context"])
    ctx_last, tgt = b["context"][:, -1].numpy(), b["target"].numpy()
    assert np.allclose(M.cos(pred, b["target"]).numpy(), np.sum(ctx_last * tgt, 1), atol=1e-6)
    assert np.allclose(M.margin(pred, b["target"], b["context"][:, -1]).numpy(), np.sum(ctx_last * tgt, 1) - 1, atol=1e-6)
    ranks = M.within_article_ranks(pred, store.vectors, b["target_row"], start, length)
    # ctx[-1] itself is in the article and scores 1: the target can never rank first.
    assert (ranks >= 2).all()
    assert np.array_equal(ranks.numpy(), numpy_within_article_rank(pred.numpy(), store, b["target_row"].numpy()))


def test_mean_context(setup):
    store, _, b, start, length = setup
    pred = M.mean_context(b["context"])
    m = b["context"].numpy().mean(1)
    m /= np.linalg.norm(m, axis=1, keepdims=True)
    assert np.allclose(pred.numpy(), m, atol=1e-6)
    ranks = M.within_article_ranks(pred, store.vectors, b["target_row"], start, length)
    assert np.array_equal(ranks.numpy(), numpy_within_article_rank(m, store, b["target_row"].numpy()))
    assert M.recall_at(ranks, 5).item() == pytest.approx(np.mean(ranks.numpy() <= 5))
    assert M.mrr(ranks).item() == pytest.approx(np.mean(1 / ranks.numpy()))


def test_random_predictions_match_naive_ranking(setup):
    store, _, b, start, length = setup
    pred = torch.randn(len(b["target"]), store.dim, generator=torch.Generator().manual_seed(1))
    ranks = M.within_article_ranks(pred, store.vectors, b["target_row"], start, length)
    assert np.array_equal(ranks.numpy(), numpy_within_article_rank(pred.numpy(), store, b["target_row"].numpy()))


def test_six_bank_reads_perfect_for_collapsed_model(setup):
    """A model pointing away from its whole context ranks the target first in the 6-bank."""
    _, _, b, _, _ = setup
    collapsed = -b["context"].mean(1)
    assert M.recall_at(M.six_bank_ranks(collapsed, b["context"], b["target"]), 5).item() == 1.0
    assert M.cos(collapsed, b["target"]).mean().item() < 0.1
