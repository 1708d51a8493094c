"""ArticleStore, window index arithmetic and batch gathering, checked against a naive loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from lvm.data import store as store_mod
from lvm.data.store import ArticleStore, Windows, WindowSpec, collate_batch
from lvm.runtime.errors import DataError
from tests.helpers import P6, STANDARD
from tests.helpers import unit_rows as _unit_rows

D = 6


def unit_rows(n: int, d: int = D, seed: int = 0) -> np.ndarray:
    return _unit_rows(n, d, seed)


# Article id -> its chunk indices. Non-contiguous ids, mixed lengths, gaps, a late start.
ARTICLES = {
    7: list(range(12)),  # plain article: 12 - 7 + 1 = 6 P6 windows, 7 standard windows
    3: [0, 1, 2, 3] + list(range(5, 14)),  # chunk 4 missing: no window may bridge it
    100: [0, 1, 2],  # too short for any window
    42: list(range(7)),  # exactly P6's minimum: one P6 window, two standard windows
    55: list(range(10, 18)),  # chunk indices starting at 10
    9: [0, 1, 2, 3, 4, 6],  # P6 target (6) exists although chunk 5 does not; no standard window
    1: list(range(6)),  # exactly the standard minimum, one short of P6
    # Chunk indices continue across these two: rows of 20 and 21 look consecutive by index.
    20: [0, 1, 2],
    21: list(range(3, 12)),
}


def make_raw(seed: int = 0, shuffle: bool = True):
    """Unsorted (article, chunk, vector) rows of ARTICLES and a dict (article, chunk) -> vector."""
    keys = [(a, c) for a, chunks in ARTICLES.items() for c in chunks]
    vecs = unit_rows(len(keys), seed=seed)
    order = np.random.default_rng(seed + 1).permutation(len(keys)) if shuffle else np.arange(len(keys))
    art = np.array([keys[i][0] for i in order], dtype=np.int64)
    chunk = np.array([keys[i][1] for i in order], dtype=np.int64)
    vectors = vecs[order]
    lookup = {keys[i]: vecs[i] for i in range(len(keys))}
    return vectors, art, chunk, lookup


def naive_windows(spec: WindowSpec, articles=None) -> list[tuple[int, int, int]]:
    """(article, first context chunk, target chunk) of every window, by brute force, sorted."""
    out = []
    for a in sorted(ARTICLES):
        if articles is not None and a not in articles:
            continue
        have = set(ARTICLES[a])
        for c in sorted(have):
            ctx = [c + j for j in range(spec.context)]
            tgt = c + spec.context - 1 + spec.target_offset
            if all(x in have for x in ctx) and tgt in have:
                out.append((a, c, tgt))
    return out


def window_keys(store: ArticleStore, w: Windows) -> list[tuple[int, int, int]]:
    s, t = w.starts.numpy(), w.targets.numpy()
    return [(int(store.article_ids[i]), int(store.chunk_indices[i]), int(store.chunk_indices[j])) for i, j in zip(s, t)]


@pytest.fixture
def raw():
    return make_raw()


@pytest.fixture
def store(raw):
    vectors, art, chunk, _ = raw
    return ArticleStore(vectors, art, chunk, source="toy")


# --------------------------------------------------------------------------- window indexing


def test_naive_reference_counts():
    # Hand counts, so the brute-force reference itself is checked.
    p6 = naive_windows(P6)
    assert sum(1 for a, _, _ in p6 if a == 7) == 6
    assert [k for k in p6 if k[0] == 3] == [(3, 5, 11), (3, 6, 12), (3, 7, 13)]
    assert [k for k in p6 if k[0] == 42] == [(42, 0, 6)]
    assert [k for k in p6 if k[0] == 9] == [(9, 0, 6)]
    assert not [k for k in p6 if k[0] in (100, 1, 20)]
    assert [k for k in p6 if k[0] == 21] == [(21, 3, 9), (21, 4, 10), (21, 5, 11)]
    std = naive_windows(STANDARD)
    assert [k for k in std if k[0] == 42] == [(42, 0, 5), (42, 1, 6)]
    assert [k for k in std if k[0] == 1] == [(1, 0, 5)]
    assert not [k for k in std if k[0] in (9, 100)]


def test_store_sorts_rows(store, raw):
    vectors, art, chunk, lookup = raw
    assert not np.array_equal(np.lexsort((chunk, art)), np.arange(len(art)))  # input really unsorted
    keys = list(zip(store.article_ids.tolist(), store.chunk_indices.tolist()))
    assert keys == sorted(keys)
    assert len(store) == len(art) and store.dim == D
    assert store.vectors.dtype == torch.float32
    for row, key in enumerate(keys):
        assert torch.equal(store.vectors[row], torch.from_numpy(lookup[key]))
    assert store.unique_articles().tolist() == sorted(ARTICLES)
    assert store.num_articles == len(ARTICLES)
    assert store.article_lengths.tolist() == [len(ARTICLES[a]) for a in sorted(ARTICLES)]


# Targets three chunks on, past the gaps: article 9's context 1..3 -> 6 and article 3's 0..2 -> 5
# and 1..3 -> 6 take their target from the run after the missing chunk.
FAR = WindowSpec(context=3, target_offset=3, prev_slot=-2)


@pytest.mark.parametrize("spec", [P6, STANDARD, FAR], ids=["p6", "standard", "far"])
def test_window_rows_match_naive(store, spec):
    w = store.windows(spec)
    starts, targets = w.starts.numpy(), w.targets.numpy()
    assert np.issubdtype(starts.dtype, np.integer) and np.issubdtype(targets.dtype, np.integer)
    got = [(int(store.article_ids[s]), int(store.chunk_indices[s]), int(store.chunk_indices[t])) for s, t in zip(starts, targets)]
    assert got == naive_windows(spec)
    if spec is FAR:
        assert {(9, 1, 6), (3, 0, 5), (3, 1, 6)} <= set(got)
    # Context rows are consecutive rows of the same article with consecutive chunk indices.
    for s, t in zip(starts, targets):
        rows = np.arange(s, s + spec.context)
        assert (store.article_ids[rows] == store.article_ids[s]).all()
        assert store.article_ids[t] == store.article_ids[s]
        assert (np.diff(store.chunk_indices[rows]) == 1).all()
        assert store.chunk_indices[t] == store.chunk_indices[rows[-1]] + spec.target_offset


@pytest.mark.parametrize("spec", [P6, STANDARD], ids=["p6", "standard"])
def test_windows_gather_vectors(store, raw, spec):
    lookup = raw[3]
    w = store.windows(spec)
    expected = naive_windows(spec)
    assert len(w) == len(expected)
    batch = w.gather(np.arange(len(w)))
    assert batch["context"].shape == (len(w), spec.context, D)
    assert batch["target"].shape == (len(w), D)
    for i, (a, c, tgt) in enumerate(expected):
        ctx = np.stack([lookup[(a, c + j)] for j in range(spec.context)])
        assert np.array_equal(batch["context"][i].numpy(), ctx)
        assert np.array_equal(batch["target"][i].numpy(), lookup[(a, tgt)])
        assert int(store.chunk_indices[batch["target_row"][i]]) == tgt
    assert w.article_ids().tolist() == [a for a, _, _ in expected]
    # Windows never cross articles.
    rows = w.context_rows(torch.arange(len(w))).numpy()
    arts = store.article_ids[rows]
    assert (arts == arts[:, :1]).all()
    assert (store.article_ids[w.targets.numpy()] == arts[:, 0]).all()


def test_gather_index_types_and_getitem(store):
    w = store.windows(P6)
    idx = [4, 0, 2]
    a = w.gather(idx)
    b = w.gather(np.array(idx))
    c = w.gather(torch.tensor(idx))
    for k in a:
        assert torch.equal(a[k], b[k]) and torch.equal(a[k], c[k])
    one = w[2]
    assert torch.equal(one["context"], a["context"][2])
    assert torch.equal(one["target"], a["target"][2])
    assert int(one["target_row"]) == int(a["target_row"][2])


def test_windows_subset_of_articles(store, raw):
    lookup = raw[3]
    chosen = np.array([3, 100, 55])
    w = store.windows(P6, chosen)
    expected = naive_windows(P6, {3, 100, 55})
    assert window_keys(store, w) == expected
    assert set(w.article_ids().tolist()) == {3, 55}
    batch = w.gather(np.arange(len(w)))
    for i, (a, c, tgt) in enumerate(expected):
        assert np.array_equal(batch["target"][i].numpy(), lookup[(a, tgt)])
    assert len(store.windows(P6, np.array([100, 1]))) == 0  # only short articles
    assert len(store.windows(P6, np.array([], dtype=np.int64))) == 0


@pytest.mark.parametrize("spec", [P6, STANDARD], ids=["p6", "standard"])
def test_dataloader_uses_batched_gather(store, spec):
    w = store.windows(spec)
    loader = DataLoader(w, batch_size=4, shuffle=False, collate_fn=collate_batch)
    batches = list(loader)
    assert len(batches) == -(-len(w) // 4)
    for b, batch in enumerate(batches):
        idx = list(range(4 * b, min(4 * b + 4, len(w))))
        ref = w.gather(idx)
        assert set(batch) == {"context", "target", "target_row"}
        assert batch["context"].shape == (len(idx), spec.context, D)
        for k in ref:
            assert torch.equal(batch[k], ref[k])


def test_sorted_input_equals_shuffled_input():
    v1, a1, c1, _ = make_raw(shuffle=False)
    v2, a2, c2, _ = make_raw(shuffle=True)
    s1, s2 = ArticleStore(v1, a1, c1), ArticleStore(v2, a2, c2)
    assert torch.equal(s1.vectors, s2.vectors)
    assert np.array_equal(s1.article_ids, s2.article_ids)
    assert np.array_equal(s1.chunk_indices, s2.chunk_indices)


def test_tiny_store_shorter_than_context():
    s = ArticleStore(unit_rows(3), np.zeros(3, np.int64), np.arange(3))
    w = s.windows(P6)
    assert len(w) == 0 and len(w.starts) == 0 and len(w.targets) == 0
    assert len(w.gather([])["target"]) == 0


def test_windows_are_segments_per_run_not_rows(store):
    """The layout is O(runs): one segment per (run, run holding its targets), however long the runs."""
    long = ArticleStore(unit_rows(5000), np.repeat([0, 1], 2500), np.tile(np.arange(2500), 2))
    w = long.windows(P6)
    assert len(w) == 2 * (2500 - 6) and len(w.first) == 2 and len(long.run_start) == 3
    assert w.rows(torch.tensor([0, 2493, 2494]))[0].tolist() == [0, 2493, 2500]


def test_article_span(store):
    rows = np.array([0, len(store) - 1, int(store.article_starts[2]) + 1])
    first, length = store.article_span(rows)
    for r, f, n in zip(rows, first, length):
        same = np.flatnonzero(store.article_ids == store.article_ids[r])
        assert f == same[0] and n == len(same)


@pytest.mark.parametrize(
    "kwargs, word",
    [
        ({"context": 1}, "context"),
        ({"target_offset": 0}, "target_offset"),
        ({"prev_slot": 5}, "prev_slot"),
        ({"prev_slot": -6}, "prev_slot"),
    ],
)
def test_window_spec_validation(kwargs, word):
    with pytest.raises(DataError, match=word):
        WindowSpec(**{"context": 5, "target_offset": 2, "prev_slot": -2, **kwargs})


def test_window_spec_min_chunks():
    assert P6.min_article_chunks == 7
    assert STANDARD.min_article_chunks == 6
    assert WindowSpec(context=5, target_offset=2, prev_slot=-5).prev_slot == -5  # bounds are inclusive
    assert WindowSpec(context=5, target_offset=2, prev_slot=4).prev_slot == 4


# --------------------------------------------------------------------------- validation


def simple(n: int = 8):
    return unit_rows(n), np.repeat([0, 1], n // 2), np.tile(np.arange(n // 2), 2)


def raises(vectors, art, chunk, *words, normalize="renormalize"):
    with pytest.raises(DataError) as e:
        ArticleStore(vectors, art, chunk, source="src.npz", normalize=normalize)
    msg = str(e.value)
    assert "src.npz" in msg, msg
    for w in words:
        assert w in msg, (w, msg)
    return msg


@pytest.mark.parametrize("shape", [(8,), (2, 4, 6)])
def test_rejects_wrong_ndim(shape):
    _, a, c = simple()
    raises(np.ones(shape, np.float32), a, c, "2-D", str(shape))


def test_rejects_empty_and_non_float():
    raises(np.zeros((0, 4), np.float32), np.zeros(0, int), np.zeros(0, int), "empty")
    _, a, c = simple()
    raises(np.ones((8, 4), np.int32), a, c, "floating point")


def test_rejects_length_mismatch():
    v, a, c = simple()
    raises(v, a[:-1], c, "article ids", "(8,)", "(7,)")
    raises(v, a, c[:-2], "chunk_indices", "(8,)", "(6,)")
    raises(v, a.reshape(2, 4), c, "article ids", "(2, 4)")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_rejects_non_finite_row(bad):
    v, a, c = simple()
    v[5, 1] = bad
    raises(v, a, c, "row 5", "NaN or inf")


def test_non_finite_row_number_is_the_input_row():
    # Unsorted input: the message must name the caller's row, not the sorted position.
    v, a, c = simple()
    v, a, c = v[::-1].copy(), a[::-1].copy(), c[::-1].copy()
    v[1, 0] = np.nan
    raises(v, a, c, "row 1")


def test_non_finite_row_number_across_scan_blocks(monkeypatch):
    monkeypatch.setattr(store_mod, "_SCAN_ROWS", 3)
    v, a, c = simple()
    v[7, 2] = np.nan
    raises(v, a, c, "row 7")
    v, a, c = simple()
    v[4] = 0
    raises(v, a, c, "row 4", "zeros")


def test_rejects_zero_row():
    v, a, c = simple()
    v[2] = 0
    raises(v, a, c, "row 2", "zeros")
    raises(v, a, c, "row 2", "zeros", normalize="error")


def test_rejects_duplicate_article_chunk():
    v, a, c = simple()
    a = np.array([5, 5, 5, 5, 6, 6, 6, 6])
    c = np.array([0, 2, 1, 2, 0, 1, 2, 3])
    raises(v, a, c, "article 5", "chunk index 2", "more than once")


def test_rejects_negative_chunk_index():
    v, a, c = simple()
    c = c.copy()
    c[3] = -1
    raises(v, a, c, "chunk_indices", ">= 0", "-1")


def test_rejects_non_integer_ids():
    v, a, c = simple()
    raises(v, a + 0.5, c, "article ids", "integers")
    raises(v, a, c.astype(np.float64) + 0.25, "chunk_indices", "integers")
    raises(v, a.astype(str), c, "article ids", "integers")
    nan_ids = a.astype(np.float64)
    nan_ids[0] = np.nan
    raises(v, nan_ids, c, "article ids", "integers")


def test_accepts_integral_float_ids():
    v, a, c = simple()
    s = ArticleStore(v, a.astype(np.float64), c.astype(np.float32))
    assert np.issubdtype(s.article_ids.dtype, np.integer) and np.issubdtype(s.chunk_indices.dtype, np.integer)
    assert s.article_ids.tolist() == a.tolist()


def test_normalize_error_rejects_non_unit():
    v, a, c = simple()
    v[3] *= 1.5
    v[6] *= 0.5
    msg = raises(v, a, c, "2 vectors are not unit", "renormalize", normalize="error")
    assert "0.5" in msg and "1.5" in msg  # the norm range


def test_normalize_error_accepts_unit_vectors_with_rounding():
    v, a, c = simple()
    v[1] *= 1 + 1e-5  # well inside the tolerance
    s = ArticleStore(v, a, c, normalize="error")
    assert np.array_equal(s.vectors.numpy(), v)


def test_renormalize_fixes_non_unit_and_keeps_unit_rows():
    v, a, c = simple()
    v[3] *= 3.0
    v[6] *= 0.2
    v[1] *= 1 + 1e-5  # unit within tolerance: must not be touched either
    before = v.copy()
    s = ArticleStore(v, a, c, normalize="renormalize")
    out = s.vectors.numpy()
    norms = np.linalg.norm(out.astype(np.float64), axis=1)
    np.testing.assert_allclose(norms[[3, 6]], 1.0, atol=1e-6)
    np.testing.assert_allclose(norms, 1.0, atol=store_mod.UNIT_NORM_TOLERANCE)
    for r in (3, 6):
        cos = out[r] @ before[r] / np.linalg.norm(before[r])
        assert cos == pytest.approx(1.0, abs=1e-6)
        np.testing.assert_allclose(out[r], before[r] / np.linalg.norm(before[r]), atol=1e-6)
    unit = [r for r in range(8) if r not in (3, 6)]
    assert np.array_equal(out[unit], before[unit])  # bit-identical
    assert np.array_equal(v, before)  # the caller's array is not modified


def test_bad_normalize_policy():
    v, a, c = simple()
    with pytest.raises(DataError, match="normalize"):
        ArticleStore(v, a, c, normalize="clip")


def test_float64_becomes_float32():
    v, a, c = simple()
    v64 = v.astype(np.float64)
    s = ArticleStore(v64, a, c)
    assert s.vectors.dtype == torch.float32
    assert np.array_equal(s.vectors.numpy(), v64.astype(np.float32))
    f16 = ArticleStore(v.astype(np.float16), a, c)
    assert f16.vectors.dtype == torch.float32


def test_rejects_store_of_identical_vectors():
    """One vector repeated (also up to scale, which renormalising removes) leaves nothing to predict."""
    v, a, c = simple()
    same = np.tile(v[:1], (8, 1))
    raises(same, a, c, "all 8 vectors are identical", "expected distinct chunk embeddings")
    scaled = same * np.linspace(0.5, 2.0, 8, dtype=np.float32)[:, None]
    raises(scaled, a, c, "all 8 vectors are identical")


def test_identical_check_scans_every_block(monkeypatch):
    monkeypatch.setattr(store_mod, "_SCAN_ROWS", 3)
    v, a, c = simple()
    same = np.tile(v[:1], (8, 1))
    raises(same, a, c, "identical")
    same[7] = v[7]  # one distinct row, in the last block: accepted
    assert len(ArticleStore(same, a, c)) == 8


def test_windows_article_ids_of_some_windows_and_a_sample_across_articles(store):
    w = store.windows(P6)
    every = w.article_ids()
    idx = torch.tensor([0, 3, len(w) - 1, 5])
    assert w.article_ids(idx).tolist() == every[idx.numpy()].tolist()
    assert w.num_articles == len(set(every.tolist()))
    pick = w.sample(w.num_articles, seed=0)
    assert sorted(every[pick].tolist()) == sorted(set(every.tolist()))  # one window in each article
