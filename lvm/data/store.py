"""The article store (one row per chunk) and windows as index arithmetic over it.

A window is K consecutive chunks of one article plus a later chunk of the same article as the
target. Windows are two int64 arrays (context start row, target row); a batch is gathered from
the store with one vectorised index, so [N, K, D] copies never exist.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from lvm.runtime.errors import DataError

log = logging.getLogger(__name__)

NormalizePolicy = Literal["renormalize", "error"]

# Vectors whose L2 norm is further than this from 1 count as "not unit" (float32 rounding of a
# normalised 768-D vector stays below 1e-6).
UNIT_NORM_TOLERANCE = 1e-3
# Rows whose cosine with row 0 reaches this count as the same direction (float32 rounding of one
# direction stays far closer; distinct text embeddings stay far below).
SAME_DIRECTION_COS = 1 - 1e-6
# Rows checked at a time when scanning vectors, so checks never allocate a full [N, D] temporary.
_SCAN_ROWS = 65536


@dataclass(frozen=True)
class WindowSpec:
    """Window format: K context chunks, target = last context chunk + target_offset, prev slot
    (the formats and their defaults: conf/window/)."""

    context: int
    target_offset: int
    prev_slot: int

    def __post_init__(self) -> None:
        if self.context < 2:
            raise DataError(f"window.context must be >= 2 (got {self.context})")
        if self.target_offset < 1:
            raise DataError(f"window.target_offset must be >= 1 (got {self.target_offset})")
        if not -self.context <= self.prev_slot < self.context:
            raise DataError(f"window.prev_slot must index the context, in [{-self.context}, {self.context - 1}] (got {self.prev_slot})")

    @property
    def min_article_chunks(self) -> int:
        """Chunks an article needs to hold at least one window."""
        return self.context - 1 + self.target_offset + 1


class ArticleStore:
    """Unit chunk vectors [N, D] sorted by (article, chunk index), with their article ids.

    Construction validates everything a bad file can get wrong, so the rest of lvm can trust it.
    Non-unit vectors are renormalised (logged with their count and norm range) or rejected,
    by `normalize`; zero or non-finite vectors are always rejected, and so is a store whose
    vectors all point the same way (every prediction would tie, every metric be meaningless).
    """

    def __init__(
        self,
        vectors: np.ndarray,
        article_ids: np.ndarray,
        chunk_indices: np.ndarray,
        source: str = "<arrays>",
        normalize: NormalizePolicy = "renormalize",
    ) -> None:
        self.source = source
        raw = vectors
        vectors, article_ids, chunk_indices = _check_arrays(vectors, article_ids, chunk_indices, source)
        # Before sorting, so errors name the caller's row numbers; renormalising writes in place,
        # never into the caller's array.
        vectors = _check_and_normalize(vectors, source, normalize, copy_on_write=np.may_share_memory(vectors, raw))
        _check_not_constant(vectors, source)
        a, c = article_ids, chunk_indices
        if not np.all((a[1:] > a[:-1]) | ((a[1:] == a[:-1]) & (c[1:] >= c[:-1]))):
            order = np.lexsort((chunk_indices, article_ids))
            log.info("%s: sorting %d chunks by (article, chunk index)", source, len(order))
            vectors, article_ids, chunk_indices = vectors[order], article_ids[order], chunk_indices[order]
        same_article = article_ids[1:] == article_ids[:-1]
        dup = same_article & (chunk_indices[1:] == chunk_indices[:-1])
        if dup.any():
            row = int(np.flatnonzero(dup)[0])
            raise DataError(
                f"{source}: article {article_ids[row]} has chunk index {chunk_indices[row]} more than "
                f"once ({int(dup.sum())} duplicate (article, chunk) pairs); each chunk must appear once"
            )
        self.vectors = torch.from_numpy(vectors)
        starts = np.flatnonzero(np.concatenate(([True], ~same_article)))
        self.article_starts = starts
        self.article_lengths = np.diff(np.append(starts, len(article_ids)))
        self.article_id_of = article_ids[starts]  # id of each article, in store order
        # Per-row index arrays are the data path's only overhead beside the vectors: keep them narrow.
        self.row_article = np.repeat(np.arange(len(starts), dtype=_index_dtype(len(starts))), self.article_lengths)
        self.chunk_indices = chunk_indices.astype(_index_dtype(int(chunk_indices.max()) + 1))

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def __len__(self) -> int:
        return int(self.vectors.shape[0])

    @property
    def num_articles(self) -> int:
        return len(self.article_starts)

    def unique_articles(self) -> np.ndarray:
        """Article ids in store order (sorted)."""
        return self.article_id_of

    @property
    def article_ids(self) -> np.ndarray:
        """Article id of every row (built on demand: [N] int64)."""
        return self.article_id_of[self.row_article]

    def windows(self, spec: WindowSpec, articles: np.ndarray | None = None) -> "Windows":
        """All windows of `spec` inside one article each, restricted to `articles` if given."""
        return self.split_windows(spec, {"all": articles})["all"]

    def split_windows(self, spec: WindowSpec, articles: dict[str, np.ndarray | None]) -> dict[str, "Windows"]:
        """Windows of several article subsets (None: every article), finding windows only once."""
        starts, targets = window_rows(self.row_article, self.chunk_indices, spec)
        window_article = self.row_article[starts]
        out = {}
        for name, ids in articles.items():
            if ids is None:
                out[name] = Windows(self, spec, starts, targets)
                continue
            member = np.isin(self.unique_articles(), ids)  # one flag per article, not per row
            keep = member[window_article]
            out[name] = Windows(self, spec, starts[keep], targets[keep])
        return out

    def article_span(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(first row, number of chunks) of the article holding each of `rows`."""
        art = self.row_article[rows]
        return self.article_starts[art], self.article_lengths[art]


def window_rows(article_ids: np.ndarray, chunk_indices: np.ndarray, spec: WindowSpec) -> tuple[np.ndarray, np.ndarray]:
    """Context start rows and target rows of every valid window in a sorted store.

    Valid: the K context chunks are consecutive chunks of one article, and the chunk
    `target_offset` after the last of them exists in that article (gaps in chunk indices
    are respected, so a window never bridges a missing chunk).
    """
    n, k = len(article_ids), spec.context
    if n < k:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    first = np.arange(n - k + 1, dtype=_index_dtype(n))
    last = first + k - 1
    consecutive = (article_ids[first] == article_ids[last]) & (chunk_indices[last] - chunk_indices[first] == k - 1)
    starts = first[consecutive]
    del first, last, consecutive
    # Chunk indices increase strictly inside an article, so chunk (last + offset), if present,
    # sits at most `offset` rows after the last context row: test those few candidates.
    last = starts + (k - 1)
    wanted = chunk_indices[last] + spec.target_offset
    targets = np.full(len(starts), -1, dtype=starts.dtype)
    for step in range(1, spec.target_offset + 1):
        cand = np.minimum(last + step, n - 1)
        hit = (last + step < n) & (article_ids[cand] == article_ids[last]) & (chunk_indices[cand] == wanted)
        targets[hit] = cand[hit]
    found = targets >= 0
    return starts[found], targets[found]


class Windows(Dataset):
    """Windows of one split: a Dataset whose batches are gathered by one vectorised index."""

    def __init__(self, store: ArticleStore, spec: WindowSpec, starts: np.ndarray, targets: np.ndarray):
        self.store = store
        self.spec = spec
        self.starts = torch.from_numpy(np.ascontiguousarray(starts))
        self.targets = torch.from_numpy(np.ascontiguousarray(targets))
        self._offsets = torch.arange(spec.context)

    def __len__(self) -> int:
        return len(self.starts)

    def context_rows(self, idx: torch.Tensor) -> torch.Tensor:
        """[B, K] store rows of the context chunks of windows `idx`."""
        return self.starts[idx].unsqueeze(1) + self._offsets

    def gather(self, idx: torch.Tensor | np.ndarray | list[int]) -> dict[str, torch.Tensor]:
        """Batch of windows `idx`: context [B, K, D], target [B, D] and their store rows."""
        return gather_windows(self.store.vectors, self.starts, self.targets, self._offsets, idx)

    def on(self, device: torch.device, vectors: torch.Tensor) -> DeviceWindows:
        """These windows' index arrays on `device`, over `vectors` (the store's, already there)."""
        return DeviceWindows(vectors, self.starts.to(device), self.targets.to(device), self._offsets.to(device))

    def batches(self, size: int) -> Iterator[dict[str, torch.Tensor]]:
        """Every window once, in order, `size` at a time (passes over a whole split)."""
        for s in range(0, len(self), size):
            yield self.gather(torch.arange(s, min(s + size, len(self))))

    def __getitems__(self, idx: list[int]) -> dict[str, torch.Tensor]:
        # DataLoader calls this with the whole batch of indices when it exists.
        return self.gather(idx)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.gather([i]).items()}

    def article_ids(self) -> np.ndarray:
        """Article id of each window."""
        return self.store.article_id_of[self.store.row_article[self.starts.numpy()]]


def gather_windows(
    vectors: torch.Tensor, starts: torch.Tensor, targets: torch.Tensor, offsets: torch.Tensor, idx: torch.Tensor | np.ndarray | list[int]
) -> dict[str, torch.Tensor]:
    """Context [B, K, D], target [B, D] and target rows of windows `idx`, gathered where the
    arrays are (host or device): one vectorised index per tensor."""
    idx = torch.as_tensor(idx, dtype=torch.long, device=starts.device)
    rows = starts[idx].unsqueeze(1) + offsets
    target_rows = targets[idx]
    return {"context": vectors[rows], "target": vectors[target_rows], "target_row": target_rows}


@dataclass(frozen=True)
class DeviceWindows:
    """A split's windows with the store's vectors and its index arrays on the training device
    (data.on_device): a batch is one gather there, with no host copy."""

    vectors: torch.Tensor
    starts: torch.Tensor
    targets: torch.Tensor
    offsets: torch.Tensor

    def gather(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        return gather_windows(self.vectors, self.starts, self.targets, self.offsets, idx)


class WindowIndex(Dataset):
    """A split's window indices as a Dataset (data.on_device): its batches are {"index": [B]},
    gathered into windows on the device (callbacks/device_data.py)."""

    def __init__(self, windows: Windows) -> None:
        self.windows = windows

    def __len__(self) -> int:
        return len(self.windows)

    def __getitems__(self, idx: list[int]) -> dict[str, torch.Tensor]:
        return {"index": torch.as_tensor(idx, dtype=torch.long)}

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"index": torch.tensor(i)}


def collate_batch(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Collate for loaders over `Windows`: `__getitems__` already returns a stacked batch."""
    return batch


def _index_dtype(bound: int) -> type:
    """Narrowest of int32/int64 holding values below `bound`."""
    return np.int32 if bound < 2**31 else np.int64


def _check_arrays(
    vectors: np.ndarray, article_ids: np.ndarray, chunk_indices: np.ndarray, source: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    vectors = np.asarray(vectors)
    if vectors.ndim != 2:
        raise DataError(f"{source}: vectors must be 2-D [N, D], got shape {vectors.shape}")
    if not np.issubdtype(vectors.dtype, np.floating):
        raise DataError(f"{source}: vectors must be floating point, got dtype {vectors.dtype}")
    n, d = vectors.shape
    if n == 0 or d == 0:
        raise DataError(f"{source}: vectors is empty (shape {vectors.shape})")
    if vectors.dtype != np.float32:
        log.info("%s: converting vectors from %s to float32", source, vectors.dtype)
        vectors = vectors.astype(np.float32)
    vectors = np.ascontiguousarray(vectors)
    out = []
    for name, arr in (("article ids", article_ids), ("chunk_indices", chunk_indices)):
        arr = np.asarray(arr)
        if arr.shape != (n,):
            raise DataError(f"{source}: {name} must have shape ({n},) to match vectors, got {arr.shape}")
        if not np.issubdtype(arr.dtype, np.integer):
            if np.issubdtype(arr.dtype, np.floating) and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)):
                arr = arr.astype(np.int64)
            else:
                raise DataError(f"{source}: {name} must be integers, got dtype {arr.dtype}")
        out.append(arr.astype(np.int64, copy=False))
    if (out[1] < 0).any():
        raise DataError(f"{source}: chunk_indices must be >= 0 (min is {out[1].min()})")
    return vectors, out[0], out[1]


def check_policy(policy: str) -> None:
    """data.normalize names what to do with non-unit rows."""
    if policy not in ("renormalize", "error"):
        raise DataError(f"data.normalize must be renormalize or error (got {policy!r})")


def _check_and_normalize(vectors: np.ndarray, source: str, policy: NormalizePolicy, copy_on_write: bool = False) -> np.ndarray:
    """Reject non-finite and zero rows; renormalise or reject non-unit rows (unit rows stay untouched).

    Renormalises in place, after copying `vectors` first if `copy_on_write`; returns the result.
    """
    check_policy(policy)
    off_unit, lo, hi = 0, np.inf, 0.0
    for s in range(0, len(vectors), _SCAN_ROWS):
        block = vectors[s : s + _SCAN_ROWS]
        norms = np.sqrt(np.einsum("ij,ij->i", block, block, dtype=np.float64))
        bad = ~np.isfinite(norms)
        if bad.any():
            row = s + int(np.flatnonzero(bad)[0])
            raise DataError(f"{source}: vectors row {row} holds NaN or inf ({int(bad.sum())} such rows in block)")
        if (norms == 0).any():
            row = s + int(np.flatnonzero(norms == 0)[0])
            raise DataError(f"{source}: vectors row {row} is all zeros; a zero vector has no direction")
        off = np.abs(norms - 1.0) > UNIT_NORM_TOLERANCE
        if off.any():
            off_unit += int(off.sum())
            lo, hi = min(lo, float(norms.min())), max(hi, float(norms.max()))
            if policy == "renormalize":
                if copy_on_write:
                    vectors, copy_on_write = vectors.copy(), False
                    block = vectors[s : s + _SCAN_ROWS]
                block[off] /= norms[off, None].astype(np.float32)
    if off_unit:
        if policy == "error":
            raise DataError(
                f"{source}: {off_unit} vectors are not unit length (norms {lo:.4g}..{hi:.4g}); "
                "set data.normalize=renormalize to normalise them"
            )
        log.warning("%s: renormalised %d non-unit vectors (norms %.4g..%.4g)", source, off_unit, lo, hi)
    return vectors


def _check_not_constant(vectors: np.ndarray, source: str) -> None:
    """Reject a store (of 2+ rows) whose rows all point the way row 0 does.

    Scans in blocks and stops at the first block holding another direction: on real data that is
    the first block, so the check costs one block's matrix-vector product.
    """
    if len(vectors) < 2:
        return
    first = vectors[0].astype(np.float64)
    first /= np.linalg.norm(first)
    for s in range(0, len(vectors), _SCAN_ROWS):
        block = vectors[s : s + _SCAN_ROWS]
        dots = np.einsum("ij,j->i", block, first, dtype=np.float64)
        norms = np.sqrt(np.einsum("ij,ij->i", block, block, dtype=np.float64))
        if (dots < SAME_DIRECTION_COS * norms).any():
            return
    raise DataError(
        f"{source}: all {len(vectors)} vectors are identical (one direction: cosine with row 0 >= "
        f"{SAME_DIRECTION_COS}); expected distinct chunk embeddings, one per chunk: with a single vector "
        "every prediction ties and no metric means anything"
    )
