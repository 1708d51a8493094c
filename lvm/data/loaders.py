"""Readers that turn the four data sources into one `ArticleStore`.

- synthetic: the built-in corpus (lvm.data.synthetic), the default.
- store: a store directory, memory-mapped (lvm.data.mapped).
- store NPZ: `vectors` [N, D], `article_indices` or `article_ids` [N], `chunk_indices` [N].
- windows NPZ: `context_sequences`/`contexts` [N, K, D], `target_vectors`/`targets` [N, D], with
  optional `article_ids` + `target_indices` or a `metadata` object array of dicts
  (`article_index`, `target_chunk_index`). With article metadata the windows are folded back into
  an article store (each chunk once; a chunk seen with two different vectors is an error). Without
  it, each window becomes its own pseudo-article: windows never mix.
"""

from __future__ import annotations

import logging
import math
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lvm.data.mapped import check_memory, open_store
from lvm.data.sampler import check_shuffle
from lvm.data.splits import check_fractions, make_splits
from lvm.data.store import ArticleStore, NormalizePolicy, Windows, WindowSpec, check_policy
from lvm.data.synthetic import check_synthetic, synthetic_corpus
from lvm.runtime.errors import DataError, require

log = logging.getLogger(__name__)

# Two copies of one chunk (from overlapping windows) must agree to this absolute tolerance.
DEDUPE_ATOL = 1e-5
# A split whose target vectors have a smaller total variance (mean squared distance to their mean
# vector; about 1 for unrelated unit vectors) is warned about: its targets are (nearly) one vector.
MIN_TARGET_VARIANCE = 1e-4
_BLOCK = 4096
# Target components gathered at a time by target_variance (8 MB in float64), whatever D.
_VARIANCE_ELEMENTS = 1 << 20


def check_source(data_cfg: Mapping[str, Any]) -> str:
    """data.source, checked: synthetic, or an NPZ kind whose data.path is an existing file."""
    source = data_cfg["source"]
    if source not in ("synthetic", "store", "store_npz", "windows_npz"):
        raise DataError(f"data.source must be synthetic, store, store_npz or windows_npz (got {source!r})")
    path = data_cfg.get("path")
    hint = f" ({data_cfg['hint']})" if data_cfg.get("hint") else ""
    if source == "store" and not (path and Path(str(path)).is_dir()):
        raise DataError(f"data.path must be an existing store directory for data.source=store (got {path!r}){hint}")
    if source in ("store_npz", "windows_npz") and not (path and Path(str(path)).is_file()):
        raise DataError(f"data.path must be an existing NPZ file for data.source={source} (got {path!r}){hint}")
    return source


def check_data(data_cfg: Mapping[str, Any]) -> None:
    """Every rule of the `data` settings, checked at start-up before anything is read: the source
    and its file, the normalisation policy, batch sizes and workers, the split and the generator's
    settings (each rule lives with the code that applies it)."""
    source = check_source(data_cfg)
    if source == "store":
        check_memory(data_cfg["memory"])
    check_policy(data_cfg["normalize"])
    check_shuffle(data_cfg["shuffle"], data_cfg["shuffle_block"])
    if not data_cfg["split"].get("ranges"):
        check_fractions(data_cfg["split"]["val"], data_cfg["split"]["ood"])
    require(
        (data_cfg["batch_size"] >= 1 and data_cfg["eval_batch_size"] >= 1, "data.batch_size and data.eval_batch_size must be >= 1"),
        (data_cfg["num_workers"] >= 0, f"data.num_workers must be >= 0 (got {data_cfg['num_workers']})"),
    )
    if source == "synthetic":
        syn = data_cfg["synthetic"]
        check_synthetic(**{k: syn[k] for k in ("dim", "articles", "min_chunks", "max_chunks", "noise", "drift_step", "common_weight")})


def load_store(data_cfg: Mapping[str, Any], spec: WindowSpec) -> ArticleStore:
    """The article store the `data` config describes."""
    source = check_source(data_cfg)
    normalize = data_cfg["normalize"]
    if source == "synthetic":
        syn = dict(data_cfg["synthetic"])
        vectors, article_ids, chunk_indices = synthetic_corpus(**syn)
        return ArticleStore(vectors, article_ids, chunk_indices, f"synthetic(seed={syn['seed']})", normalize)
    path = data_cfg["path"]
    if source == "store":
        return open_store(path, data_cfg["memory"])
    if source == "store_npz":
        return load_store_npz(path, normalize)
    return load_windows_npz(path, spec, normalize, data_cfg.get("dedupe", "auto"))


def load_splits(data_cfg: Mapping[str, Any], spec: WindowSpec) -> dict[str, Windows]:
    """Windows of the train / val / ood splits the data settings define (training and evaluation);
    warns about any split whose targets are (nearly) all one vector."""
    store = load_store(data_cfg, spec)
    s = data_cfg["split"]
    splits = make_splits(store, spec, s["val"], s["ood"], s["seed"], s.get("ranges") or None)
    for name, windows in splits.items():
        if len(windows) < 2:  # one target has no variance to speak of
            continue
        var = target_variance(windows, enough=MIN_TARGET_VARIANCE)
        if var < MIN_TARGET_VARIANCE:
            log.warning(
                "%s: split '%s' has near-zero target variance (%.3g over %d windows; unrelated unit "
                "vectors give about 1): its targets are (nearly) one vector, so cosine and retrieval figures "
                "on it say nothing about the model",
                store.source,
                name,
                var,
                len(windows),
            )
    return splits


def target_variance(windows: Windows, enough: float = math.inf) -> float:
    """Total variance of the windows' target vectors (mean squared distance to their mean vector),
    gathered in blocks so no [N, D] copy exists. Stops early, returning a lower bound, once that
    bound reaches `enough`: the blocks' own variances weighted by their share of the windows add up
    to at most the total (the between-block part is never negative), so on ordinary data the first
    block decides."""
    n, step = len(windows), max(1, _VARIANCE_ELEMENTS // windows.store.dim)
    total = torch.zeros(windows.store.dim, dtype=torch.float64)
    squares = bound = 0.0
    for s in range(0, n, step):
        block = windows.store.take(windows.rows(torch.arange(s, min(s + step, n)))[1]).double()
        block_total, block_squares = block.sum(dim=0), float(torch.einsum("ij,ij->", block, block))
        bound += (block_squares - float(block_total @ block_total) / len(block)) / n
        if bound >= enough:
            return bound
        total += block_total
        squares += block_squares
    mean = total / n
    return squares / n - float(mean @ mean)


def load_store_npz(path: str | Path, normalize: NormalizePolicy = "renormalize") -> ArticleStore:
    """An article-store NPZ: one row per chunk."""
    npz = _open_npz(path)
    vectors = _require(npz, path, ("vectors",), "[N, D] float")
    article_ids = _require(npz, path, ("article_indices", "article_ids"), "[N] int")
    chunk_indices = _require(npz, path, ("chunk_indices",), "[N] int")
    return ArticleStore(vectors, article_ids, chunk_indices, str(path), normalize)


def load_windows_npz(
    path: str | Path,
    spec: WindowSpec,
    normalize: NormalizePolicy = "renormalize",
    dedupe: str | bool = "auto",
) -> ArticleStore:
    """A pre-built windows NPZ, folded into an article store (see module docstring)."""
    npz = _open_npz(path)
    contexts = _require(npz, path, ("context_sequences", "contexts"), "[N, K, D] float")
    targets = _require(npz, path, ("target_vectors", "targets"), "[N, D] float")
    if contexts.ndim != 3:
        raise DataError(f"{path}: contexts must be 3-D [N, K, D], got shape {contexts.shape}")
    n, k, d = contexts.shape
    if k != spec.context:
        raise DataError(f"{path}: contexts hold K={k} chunks but window.context={spec.context}")
    if targets.shape != (n, d):
        raise DataError(f"{path}: targets must have shape ({n}, {d}) to match contexts {contexts.shape}, got {targets.shape}")
    meta = _window_metadata(npz, path, n)
    if dedupe == "auto":
        dedupe = meta is not None
    if dedupe and meta is None:
        raise DataError(f"{path}: data.dedupe=true needs article_ids + target_indices or metadata in the file")
    if not dedupe:
        return _pseudo_articles(contexts, targets, spec, str(path), normalize)
    return _fold_windows(contexts, targets, *meta, spec, str(path), normalize)


def _open_npz(path: str | Path) -> np.lib.npyio.NpzFile:
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: no such file")
    try:
        npz = np.load(p, allow_pickle=False)
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise DataError(f"{p}: not a readable NPZ file ({e})") from None
    if not isinstance(npz, np.lib.npyio.NpzFile):  # a bare .npy array
        raise DataError(f"{p}: holds a single .npy array, not an NPZ archive of named arrays")
    return npz


def _require(npz: np.lib.npyio.NpzFile, path: str | Path, names: tuple[str, ...], expected: str) -> np.ndarray:
    for name in names:
        if name in npz.files:
            try:
                return npz[name]
            except ValueError as e:  # object arrays need pickle; corrupt members fail here too
                raise DataError(f"{path}: key '{name}' cannot be read as a numeric array ({e})") from None
            except (zipfile.BadZipFile, OSError, EOFError) as e:
                raise DataError(f"{path}: key '{name}' is corrupt ({e})") from None
    raise DataError(f"{path}: missing key {' or '.join(repr(n) for n in names)} ({expected}); file has {npz.files}")


def _window_metadata(npz: np.lib.npyio.NpzFile, path: str | Path, n: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(article id, target chunk index) per window, from explicit arrays or a `metadata` object array."""
    if "article_ids" in npz.files and "target_indices" in npz.files:
        art = _require(npz, path, ("article_ids",), "[N] int")
        tgt = _require(npz, path, ("target_indices",), "[N] int")
    elif "metadata" in npz.files:
        # Object arrays of dicts need pickle; read only this key that way.
        with np.load(path, allow_pickle=True) as full:
            meta = full["metadata"]
        try:
            art = np.array([m["article_index"] for m in meta])
            tgt = np.array([m["target_chunk_index"] for m in meta])
        except (TypeError, KeyError, IndexError) as e:
            raise DataError(
                f"{path}: 'metadata' must hold one dict per window with 'article_index' and 'target_chunk_index' ({type(e).__name__}: {e})"
            ) from None
    else:
        return None
    for name, arr in (("article ids", art), ("target indices", tgt)):
        if arr.shape != (n,):
            raise DataError(f"{path}: {name} must have shape ({n},) to match contexts, got {arr.shape}")
        if not np.issubdtype(arr.dtype, np.integer):
            raise DataError(f"{path}: {name} must be integers, got dtype {arr.dtype}")
    return art.astype(np.int64), tgt.astype(np.int64)


def _pseudo_articles(contexts: np.ndarray, targets: np.ndarray, spec: WindowSpec, source: str, normalize: NormalizePolicy) -> ArticleStore:
    """Each window becomes an article: chunks 0..K-1, then the target at K-1+offset."""
    n, k, d = contexts.shape
    log.info("%s: no article metadata; each of %d windows is its own pseudo-article", source, n)
    vectors = np.concatenate([contexts, targets[:, None, :]], axis=1).reshape(n * (k + 1), d)
    article_ids = np.repeat(np.arange(n, dtype=np.int64), k + 1)
    chunk = np.append(np.arange(k), k - 1 + spec.target_offset).astype(np.int64)
    return ArticleStore(vectors, article_ids, np.tile(chunk, n), source, normalize)


def _fold_windows(
    contexts: np.ndarray,
    targets: np.ndarray,
    article_ids: np.ndarray,
    target_indices: np.ndarray,
    spec: WindowSpec,
    source: str,
    normalize: NormalizePolicy,
) -> ArticleStore:
    """Deduplicate overlapping windows into one row per (article, chunk), checking they agree."""
    n, k, d = contexts.shape
    first_ctx = target_indices - spec.target_offset - (k - 1)
    if (first_ctx < 0).any():
        i = int(np.flatnonzero(first_ctx < 0)[0])
        raise DataError(
            f"{source}: window {i} has target chunk {target_indices[i]}, too early for context={k} and "
            f"target_offset={spec.target_offset}; is window.target_offset right for this file?"
        )
    # Slot j of window i is chunk first_ctx[i] + j for j < K, and the target for slot K.
    chunk = np.concatenate([first_ctx[:, None] + np.arange(k), target_indices[:, None]], axis=1)
    art = np.repeat(article_ids[:, None], k + 1, axis=1)
    keys = np.stack([art.ravel(), chunk.ravel()], axis=1)
    uniq, first, inverse = np.unique(keys, axis=0, return_index=True, return_inverse=True)
    inverse = inverse.reshape(n, k + 1)
    vectors = np.empty((len(uniq), d), np.float32)
    vectors[:] = _slot_vectors(contexts, targets, first // (k + 1), first % (k + 1))
    mismatched = 0
    for s in range(0, n, _BLOCK):
        blk = slice(s, s + _BLOCK)
        diff = np.abs(contexts[blk] - vectors[inverse[blk, :k]]).max(axis=(1, 2))
        diff = np.maximum(diff, np.abs(targets[blk] - vectors[inverse[blk, k]]).max(axis=1))
        mismatched += int((~(diff <= DEDUPE_ATOL)).sum())  # NaN counts as a mismatch
    if mismatched:
        raise DataError(
            f"{source}: {mismatched} windows disagree with other windows on the vector of a shared "
            f"(article, chunk); check window.target_offset (now {spec.target_offset}) matches the file, "
            "or set data.dedupe=false to treat each window as its own article"
        )
    log.info("%s: folded %d windows into %d unique chunks", source, n, len(uniq))
    return ArticleStore(vectors, uniq[:, 0], uniq[:, 1], source, normalize)


def _slot_vectors(contexts: np.ndarray, targets: np.ndarray, window: np.ndarray, slot: np.ndarray) -> np.ndarray:
    k = contexts.shape[1]
    out = np.empty((len(window), contexts.shape[2]), np.float32)
    is_ctx = slot < k
    out[is_ctx] = contexts[window[is_ctx], slot[is_ctx]]
    out[~is_ctx] = targets[window[~is_ctx]]
    return out
