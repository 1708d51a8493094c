"""Writing store directories (lvm/data/mapped.py) from the other sources, and back to an NPZ.

A synthetic store is generated `block_articles` articles at a time (block b from the generator's
stream b, so one block is exactly data=synthetic's corpus), so it may be larger than RAM. An NPZ
source (data=store_npz | windows_npz) is read, checked and written in blocks.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from lvm.data.loaders import load_store
from lvm.data.mapped import StoreWriter, open_store
from lvm.data.store import WindowSpec
from lvm.data.synthetic import synthetic_corpus
from lvm.runtime.files import atomic_path


def synthetic_blocks(settings: dict, block_articles: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The synthetic corpus of `settings`, `block_articles` articles at a time."""
    total = settings["articles"]
    for b, first in enumerate(range(0, total, block_articles)):
        n = min(block_articles, total - first)
        vectors, article_ids, chunk_indices = synthetic_corpus(**{**settings, "articles": n}, stream=b)
        yield vectors, article_ids + first, chunk_indices


def write_store(data_cfg: dict, spec: WindowSpec, out: Path, dtype: str, overwrite: bool, block_articles: int) -> Path:
    """A store directory at `out` holding the data `data_cfg` describes."""
    if data_cfg["source"] == "synthetic":
        syn = data_cfg["synthetic"]
        blocks = synthetic_blocks(syn, block_articles)
        count, source = -(-syn["articles"] // block_articles), f"synthetic(seed={syn['seed']}, block_articles={block_articles})"
        dim = syn["dim"]
    else:
        store = load_store(data_cfg, spec)
        rows = 65536
        count, source, dim = -(-len(store) // rows), str(data_cfg["path"]), store.dim
        article_ids, chunk_indices = store.article_ids, store.chunk_indices  # per row, built once
        blocks = (
            (store.take(np.arange(s, min(s + rows, len(store)))).numpy(), article_ids[s : s + rows], chunk_indices[s : s + rows])
            for s in range(0, len(store), rows)
        )
    with StoreWriter(out, dim, dtype, data_cfg["normalize"], source=source, overwrite=overwrite) as writer:
        for vectors, article_ids, chunk_indices in tqdm(blocks, total=count, desc="store", unit="block"):
            writer.add(vectors, article_ids, chunk_indices)
    return out


def write_npz(path: Path, out: Path) -> Path:
    """An article-store NPZ at `out` from the store directory at `path` (float32 vectors)."""
    store = open_store(path)
    with atomic_path(out) as tmp, open(tmp, "wb") as f:
        np.savez(f, vectors=store.take(np.arange(len(store))).numpy(), article_indices=store.article_ids, chunk_indices=store.chunk_indices)
    return out
