"""NPZ readers: valid files load exactly; every kind of bad file is a DataError naming path and problem."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from lvm.data import loaders
from lvm.data.loaders import load_splits, load_store, load_store_npz, load_windows_npz
from lvm.data.store import ArticleStore, Windows, WindowSpec
from lvm.runtime.errors import DataError
from tests.helpers import P6, STANDARD
from tests.helpers import unit_rows as _unit_rows

D = 8


def unit_rows(n: int, d: int = D, seed: int = 0) -> np.ndarray:
    return _unit_rows(n, d, seed)


def store_arrays():
    """A small unsorted article store: ids 4, 9, 2 (lengths 9, 7, 12), plus a short article 30."""
    lengths = {4: 9, 9: 7, 2: 12, 30: 3}
    art = np.concatenate([np.full(n, a) for a, n in lengths.items()]).astype(np.int64)
    chunk = np.concatenate([np.arange(n) for n in lengths.values()]).astype(np.int64)
    perm = np.random.default_rng(1).permutation(len(art))
    return unit_rows(len(art))[perm], art[perm], chunk[perm]


def expect_error(path, fn, *words):
    with pytest.raises(DataError) as e:
        fn()
    msg = str(e.value)
    assert str(path) in msg, msg
    for w in words:
        assert w in msg, (w, msg)
    return msg


# --------------------------------------------------------------------------- store NPZ


@pytest.mark.parametrize("id_key", ["article_indices", "article_ids"])
def test_load_store_npz_valid(tmp_path, id_key):
    v, a, c = store_arrays()
    path = tmp_path / "store.npz"
    np.savez(path, vectors=v, **{id_key: a}, chunk_indices=c, concept_texts=np.array(["x"] * len(a)))
    s = load_store_npz(path)
    ref = ArticleStore(v, a, c)
    assert s.source == str(path)
    assert torch.equal(s.vectors, ref.vectors)
    assert np.array_equal(s.article_ids, ref.article_ids)
    assert np.array_equal(s.chunk_indices, ref.chunk_indices)
    assert s.unique_articles().tolist() == [2, 4, 9, 30]
    # Independent check of one row: article 9, chunk 3.
    row = np.flatnonzero((s.article_ids == 9) & (s.chunk_indices == 3))[0]
    src = np.flatnonzero((a == 9) & (c == 3))[0]
    assert np.array_equal(s.vectors[row].numpy(), v[src])


def test_load_store_npz_compressed_and_normalize_error(tmp_path):
    v, a, c = store_arrays()
    path = tmp_path / "store.npz"
    np.savez_compressed(path, vectors=v * 2, article_indices=a, chunk_indices=c)
    s = load_store_npz(path)
    np.testing.assert_allclose(np.linalg.norm(s.vectors.numpy(), axis=1), 1.0, atol=1e-6)
    expect_error(path, lambda: load_store_npz(path, normalize="error"), "not unit length")


def test_missing_file(tmp_path):
    path = tmp_path / "nope.npz"
    expect_error(path, lambda: load_store_npz(path), "no such file")
    expect_error(path, lambda: load_windows_npz(path, P6), "no such file")


def test_directory_is_not_a_file(tmp_path):
    expect_error(tmp_path, lambda: load_store_npz(tmp_path), "no such file")


def test_random_bytes(tmp_path):
    path = tmp_path / "junk.npz"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    expect_error(path, lambda: load_store_npz(path), "not a readable NPZ")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.npz"
    path.write_bytes(b"")
    expect_error(path, lambda: load_store_npz(path))


def test_truncated_npz(tmp_path):
    v, a, c = store_arrays()
    good = tmp_path / "good.npz"
    np.savez(good, vectors=v, article_indices=a, chunk_indices=c)
    data = good.read_bytes()
    path = tmp_path / "truncated.npz"
    path.write_bytes(data[: len(data) // 2])
    expect_error(path, lambda: load_store_npz(path), "not a readable NPZ")


def test_npy_instead_of_npz(tmp_path):
    path = tmp_path / "vectors.npy"
    np.save(path, unit_rows(5))
    expect_error(path, lambda: load_store_npz(path), "not an NPZ")


def test_missing_key(tmp_path):
    v, a, c = store_arrays()
    path = tmp_path / "store.npz"
    np.savez(path, vectors=v, article_indices=a)
    msg = expect_error(path, lambda: load_store_npz(path), "missing key", "'chunk_indices'")
    assert "'vectors'" in msg  # lists what the file has
    np.savez(path, vectors=v, chunk_indices=c)
    expect_error(path, lambda: load_store_npz(path), "'article_indices' or 'article_ids'")


def test_wrong_shape(tmp_path):
    v, a, c = store_arrays()
    path = tmp_path / "store.npz"
    np.savez(path, vectors=v.ravel(), article_indices=a, chunk_indices=c)
    expect_error(path, lambda: load_store_npz(path), "vectors", "2-D")


def test_mismatched_lengths(tmp_path):
    v, a, c = store_arrays()
    path = tmp_path / "store.npz"
    np.savez(path, vectors=v, article_indices=a[:-3], chunk_indices=c)
    expect_error(path, lambda: load_store_npz(path), "article ids", f"({len(v)},)")
    np.savez(path, vectors=v, article_indices=a, chunk_indices=c[:5])
    expect_error(path, lambda: load_store_npz(path), "chunk_indices", "(5,)")


def test_nan_values(tmp_path):
    v, a, c = store_arrays()
    v[6, 2] = np.nan
    path = tmp_path / "store.npz"
    np.savez(path, vectors=v, article_indices=a, chunk_indices=c)
    expect_error(path, lambda: load_store_npz(path), "row 6", "NaN")


def test_object_dtype_array(tmp_path):
    v, a, c = store_arrays()
    path = tmp_path / "store.npz"
    obj = np.empty(len(v), dtype=object)
    obj[:] = list(v)
    np.savez(path, vectors=obj, article_indices=a, chunk_indices=c)
    expect_error(path, lambda: load_store_npz(path), "'vectors'", "numeric")
    np.savez(path, vectors=v, article_indices=a.astype(object), chunk_indices=c)
    expect_error(path, lambda: load_store_npz(path), "'article_indices'")


def test_string_ids(tmp_path):
    v, a, c = store_arrays()
    path = tmp_path / "store.npz"
    np.savez(path, vectors=v, article_indices=a.astype(str), chunk_indices=c)
    expect_error(path, lambda: load_store_npz(path), "article ids", "integers")


# --------------------------------------------------------------------------- windows NPZ


def source_windows(spec: WindowSpec = P6) -> tuple[ArticleStore, Windows, dict[str, np.ndarray]]:
    store = ArticleStore(*store_arrays())
    w = store.windows(spec)
    batch = w.gather(np.arange(len(w)))
    arrays = {
        "contexts": batch["context"].numpy(),
        "targets": batch["target"].numpy(),
        "article_ids": w.article_ids(),
        "target_indices": store.chunk_indices[w.targets.numpy()],
    }
    return store, w, arrays


def same_windows(a: Windows, b: Windows) -> None:
    assert len(a) == len(b)
    ga, gb = a.gather(np.arange(len(a))), b.gather(np.arange(len(b)))
    assert torch.equal(ga["context"], gb["context"])
    assert torch.equal(ga["target"], gb["target"])


def test_windows_with_article_ids_fold_back(tmp_path):
    store, w, arr = source_windows()
    assert len(w) == 3 + 1 + 6  # articles 4 (9 chunks), 9 (7), 2 (12); 30 is too short
    path = tmp_path / "win.npz"
    np.savez(path, **arr)
    folded = load_windows_npz(path, P6)
    assert folded.source == str(path)
    assert folded.unique_articles().tolist() == [2, 4, 9]
    same_windows(folded.windows(P6), w)
    assert np.array_equal(folded.windows(P6).article_ids(), w.article_ids())
    # Each chunk once, with its original vector; only chunks some window uses are kept
    # (article 9 has 7 chunks: its chunk 5 is withheld by its only window).
    assert len(folded) == 9 + 6 + 12
    for row in range(len(folded)):
        key = (folded.article_ids[row], folded.chunk_indices[row])
        src = np.flatnonzero((store.article_ids == key[0]) & (store.chunk_indices == key[1]))[0]
        assert torch.equal(folded.vectors[row], store.vectors[src])
    assert not ((folded.article_ids == 9) & (folded.chunk_indices == 5)).any()


def test_windows_alternative_key_names(tmp_path):
    _, w, arr = source_windows()
    path = tmp_path / "win.npz"
    np.savez(
        path,
        context_sequences=arr["contexts"],
        target_vectors=arr["targets"],
        article_ids=arr["article_ids"],
        target_indices=arr["target_indices"],
    )
    same_windows(load_windows_npz(path, P6).windows(P6), w)


def test_windows_with_metadata_dicts(tmp_path):
    _, w, arr = source_windows()
    meta = np.empty(len(w), dtype=object)
    meta[:] = [
        {"article_index": int(a), "target_chunk_index": int(t), "other": "x"} for a, t in zip(arr["article_ids"], arr["target_indices"])
    ]
    path = tmp_path / "win_meta.npz"
    np.savez(path, context_sequences=arr["contexts"], target_vectors=arr["targets"], metadata=meta)
    folded = load_windows_npz(path, P6)
    assert folded.unique_articles().tolist() == [2, 4, 9]
    same_windows(folded.windows(P6), w)


def test_windows_metadata_malformed(tmp_path):
    _, w, arr = source_windows()
    meta = np.empty(len(w), dtype=object)
    meta[:] = [{"article": 1, "target_chunk_index": 6}] * len(w)
    path = tmp_path / "win_meta.npz"
    np.savez(path, contexts=arr["contexts"], targets=arr["targets"], metadata=meta)
    expect_error(path, lambda: load_windows_npz(path, P6), "metadata", "article_index")


@pytest.mark.parametrize("spec", [P6, STANDARD], ids=["p6", "standard"])
def test_windows_without_metadata_are_pseudo_articles(tmp_path, spec):
    _, w, arr = source_windows(spec)
    path = tmp_path / "win_plain.npz"
    np.savez(path, contexts=arr["contexts"], targets=arr["targets"])
    pseudo = load_windows_npz(path, spec)
    assert pseudo.num_articles == len(w)  # windows never mix
    assert (pseudo.article_lengths == spec.context + 1).all()
    pw = pseudo.windows(spec)
    same_windows(pw, w)
    assert pw.article_ids().tolist() == list(range(len(w)))


def test_windows_dedupe_false_ignores_metadata(tmp_path):
    _, w, arr = source_windows()
    path = tmp_path / "win.npz"
    np.savez(path, **arr)
    pseudo = load_windows_npz(path, P6, dedupe=False)
    assert pseudo.num_articles == len(w)
    same_windows(pseudo.windows(P6), w)


def test_windows_dedupe_true_needs_metadata(tmp_path):
    _, _, arr = source_windows()
    path = tmp_path / "win.npz"
    np.savez(path, contexts=arr["contexts"], targets=arr["targets"])
    expect_error(path, lambda: load_windows_npz(path, P6, dedupe=True), "dedupe", "metadata")


def test_windows_wrong_k(tmp_path):
    _, _, arr = source_windows()
    path = tmp_path / "win.npz"
    np.savez(path, **arr)
    spec4 = WindowSpec(context=4, target_offset=2, prev_slot=-2)
    expect_error(path, lambda: load_windows_npz(path, spec4), "K=5", "window.context=4")


def test_windows_bad_shapes(tmp_path):
    _, _, arr = source_windows()
    path = tmp_path / "win.npz"
    np.savez(path, contexts=arr["contexts"], targets=arr["targets"][:-1])
    expect_error(path, lambda: load_windows_npz(path, P6), "targets must have shape")
    np.savez(path, contexts=arr["contexts"], targets=arr["targets"][:, :-1])
    expect_error(path, lambda: load_windows_npz(path, P6), "targets must have shape")
    np.savez(path, contexts=arr["contexts"][:, 0], targets=arr["targets"])
    expect_error(path, lambda: load_windows_npz(path, P6), "contexts", "3-D")
    np.savez(path, contexts=arr["contexts"])
    expect_error(path, lambda: load_windows_npz(path, P6), "missing key", "'targets'")


def test_windows_bad_metadata_arrays(tmp_path):
    _, _, arr = source_windows()
    path = tmp_path / "win.npz"
    np.savez(path, **(arr | {"article_ids": arr["article_ids"][:-1]}))
    expect_error(path, lambda: load_windows_npz(path, P6), "article ids", "shape")
    np.savez(path, **(arr | {"target_indices": arr["target_indices"] + 0.5}))
    expect_error(path, lambda: load_windows_npz(path, P6), "target indices", "integers")


def test_windows_wrong_target_offset_is_inconsistent(tmp_path):
    # A P6 file read as standard format: overlapping windows disagree on shared chunks.
    _, _, arr = source_windows(P6)
    path = tmp_path / "win.npz"
    np.savez(path, **arr)
    msg = expect_error(path, lambda: load_windows_npz(path, STANDARD), "disagree", "target_offset")
    assert "(now 1)" in msg


def test_windows_target_offset_too_large(tmp_path):
    _, _, arr = source_windows(P6)
    path = tmp_path / "win.npz"
    np.savez(path, **arr)
    spec3 = WindowSpec(context=5, target_offset=3, prev_slot=-2)
    expect_error(path, lambda: load_windows_npz(path, spec3), "too early", "target_offset")


def test_windows_corrupted_duplicate_chunk(tmp_path):
    _, _, arr = source_windows(P6)
    contexts = arr["contexts"].copy()
    contexts[1, 2] = unit_rows(1, seed=99)[0]  # window 1's chunk differs from window 0's copy
    path = tmp_path / "win.npz"
    np.savez(path, **(arr | {"contexts": contexts}))
    expect_error(path, lambda: load_windows_npz(path, P6), "1 windows disagree")
    # A difference below the tolerance is accepted.
    contexts = arr["contexts"].copy()
    contexts[1, 2] += 1e-7
    np.savez(path, **(arr | {"contexts": contexts}))
    assert len(load_windows_npz(path, P6)) == 27


# --------------------------------------------------------------------------- dispatch


def data_cfg(**kw):
    cfg = {
        "source": "synthetic",
        "path": None,
        "normalize": "renormalize",
        "synthetic": {
            "dim": 16,
            "articles": 12,
            "min_chunks": 8,
            "max_chunks": 12,
            "topic_weight": 1.0,
            "drift_weight": 1.0,
            "drift_step": 0.5,
            "noise": 1.2,
            "seed": 3,
        },
    }
    cfg.update(kw)
    return cfg


def test_load_store_dispatch(tmp_path):
    syn = load_store(data_cfg(), P6)
    assert syn.dim == 16 and syn.num_articles == 12 and "seed=3" in syn.source
    v, a, c = store_arrays()
    spath = tmp_path / "store.npz"
    np.savez(spath, vectors=v, article_indices=a, chunk_indices=c)
    s = load_store(data_cfg(source="store_npz", path=str(spath)), P6)
    assert s.source == str(spath) and len(s) == len(v)
    _, w, arr = source_windows()
    wpath = tmp_path / "win.npz"
    np.savez(wpath, **arr)
    ws = load_store(data_cfg(source="windows_npz", path=str(wpath), dedupe="auto"), P6)
    same_windows(ws.windows(P6), w)
    pseudo = load_store(data_cfg(source="windows_npz", path=str(wpath), dedupe=False), P6)
    assert pseudo.num_articles == len(w)


def test_load_store_normalize_policy_passed(tmp_path):
    v, a, c = store_arrays()
    spath = tmp_path / "store.npz"
    np.savez(spath, vectors=v * 3, article_indices=a, chunk_indices=c)
    with pytest.raises(DataError, match="not unit"):
        load_store(data_cfg(source="store_npz", path=str(spath), normalize="error"), P6)


def test_load_store_unknown_source():
    with pytest.raises(DataError, match="data.source") as e:
        load_store(data_cfg(source="parquet", path="x.npz"), P6)
    assert "'parquet'" in str(e.value)
    with pytest.raises(DataError, match="data.source"):
        load_store(data_cfg(source="parquet"), P6)  # unknown source wins over a missing path


@pytest.mark.parametrize("source", ["store_npz", "windows_npz"])
@pytest.mark.parametrize("path", [None, ""])
def test_load_store_missing_path(source, path):
    with pytest.raises(DataError, match="data.path") as e:
        load_store(data_cfg(source=source, path=path), P6)
    assert source in str(e.value)


def test_split_with_identical_targets_warns(tmp_path, caplog):
    """Val (article 2) holds one vector repeated: a warning names the split and the file."""
    v, a, c = store_arrays()
    v[a == 2] = v[a == 2][0]
    path = tmp_path / "store.npz"
    np.savez(path, vectors=v, article_indices=a, chunk_indices=c)
    ranges = {"train": [3, 10], "val": [0, 3]}
    with caplog.at_level(logging.WARNING, logger="lvm.data.loaders"):
        splits = load_splits(data_cfg(source="store_npz", path=str(path), split={"val": 0, "ood": 0, "seed": 0, "ranges": ranges}), P6)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(splits["val"]) == 6 and len(warnings) == 1, warnings
    assert "split 'val'" in warnings[0] and str(path) in warnings[0] and "variance" in warnings[0]


def test_ordinary_splits_do_not_warn(caplog):
    with caplog.at_level(logging.WARNING, logger="lvm.data.loaders"):
        splits = load_splits(data_cfg(split={"val": 0.25, "ood": 0.25, "seed": 0}), P6)
    assert all(len(w) > 1 for w in splits.values())
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


def test_target_variance_matches_numpy_and_stops_early_with_a_lower_bound(monkeypatch):
    v, a, c = store_arrays()
    monkeypatch.setattr(loaders, "_VARIANCE_ELEMENTS", 5 * v.shape[1])
    windows = ArticleStore(v, a, c).windows(P6)
    targets = v[np.lexsort((c, a))][windows.targets.numpy()].astype(np.float64)
    exact = targets.var(axis=0).sum()  # numpy: mean squared distance to the mean vector
    assert loaders.target_variance(windows) == pytest.approx(exact, rel=1e-9)
    bound = loaders.target_variance(windows, enough=1e-4)
    assert 1e-4 <= bound < exact  # stopped after the first block of 5 targets


def test_target_variance_gathers_a_bounded_block_at_wide_dimensions(monkeypatch):
    """At D=768 a block of 4,096 targets (25 MB in float64) was gathered at once; now at most
    _VARIANCE_ELEMENTS components, with the same variance."""
    rng = np.random.default_rng(0)
    v = rng.standard_normal((6000, 768)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    a, c = np.repeat(np.arange(100), 60), np.tile(np.arange(60), 100)
    windows = ArticleStore(v, a, c).windows(P6)
    gathered, take = [], windows.store.take
    monkeypatch.setattr(windows.store, "take", lambda rows: gathered.append(rows.numel() * 768) or take(rows))
    exact = v[windows.targets.numpy()].astype(np.float64).var(axis=0).sum()
    assert loaders.target_variance(windows) == pytest.approx(exact, rel=1e-9)
    assert len(gathered) > 1 and max(gathered) <= loaders._VARIANCE_ELEMENTS
