"""The article store (one row per chunk) and windows as index arithmetic over it.

A window is K consecutive chunks of one article plus a later chunk of the same article as the
target. A split's windows are segments of consecutive start rows (O(runs of consecutive chunks),
never one entry per window); a batch is gathered from the store with one vectorised index, so
[N, K, D] copies never exist.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from lvm.data.sampler import stratified_sample
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
    """Unit chunk vectors [N, D] sorted by (article, chunk index), described by runs.

    A run is a maximal range of rows holding consecutive chunks of one article; the layout is
    O(runs) arrays (run starts, article and first chunk of each run), never per-row or per-window
    arrays, so a store mapped from disk (lvm/data/mapped.py) costs memory for its articles only.

    Construction from arrays validates everything a bad file can get wrong, so the rest of lvm can
    trust it. Non-unit vectors are renormalised (logged with their count and norm range) or
    rejected, by `normalize`; zero or non-finite vectors are always rejected, and so is a store
    whose vectors all point the same way (every prediction would tie, every metric be meaningless).
    """

    def __init__(
        self,
        vectors: np.ndarray,
        article_ids: np.ndarray,
        chunk_indices: np.ndarray,
        source: str = "<arrays>",
        normalize: NormalizePolicy = "renormalize",
    ) -> None:
        raw = vectors
        vectors, article_ids, chunk_indices = _check_arrays(vectors, article_ids, chunk_indices, source)
        # Before sorting, so errors name the caller's row numbers; renormalising writes in place,
        # never into the caller's array.
        vectors, renormalised, lo, hi = normalize_rows(vectors, source, normalize, copy_on_write=np.may_share_memory(vectors, raw))
        if renormalised:
            log.warning("%s: renormalised %d non-unit vectors (norms %.4g..%.4g)", source, renormalised, lo, hi)
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
        run_start = np.flatnonzero(np.concatenate(([True], ~same_article | (chunk_indices[1:] != chunk_indices[:-1] + 1))))
        self._set_layout(torch.from_numpy(vectors), run_start, article_ids[run_start], chunk_indices[run_start], source)

    @classmethod
    def from_runs(
        cls, vectors: torch.Tensor, run_start: np.ndarray, run_article_id: np.ndarray, run_first_chunk: np.ndarray, source: str
    ) -> "ArticleStore":
        """A store over checked `vectors` (mapped from disk, any float storage) and its run layout."""
        store = cls.__new__(cls)
        store._set_layout(vectors, run_start, run_article_id, run_first_chunk, source)
        return store

    def _set_layout(
        self, vectors: torch.Tensor, run_start: np.ndarray, run_article_id: np.ndarray, run_first_chunk: np.ndarray, source: str
    ) -> None:
        self.source = source
        self.vectors = vectors  # the storage (float32, or float16/bfloat16 from disk): read it with `take`
        n = int(vectors.shape[0])
        self.run_start = np.append(np.asarray(run_start, np.int64), n)  # [R + 1]
        self.run_first_chunk = np.asarray(run_first_chunk, np.int64)
        new_article = np.concatenate(([True], run_article_id[1:] != run_article_id[:-1]))
        self.run_article = np.cumsum(new_article) - 1  # article number (store order) of each run
        self.article_starts = self.run_start[:-1][new_article]
        self.article_lengths = np.diff(np.append(self.article_starts, n))
        self.article_id_of = np.asarray(run_article_id, np.int64)[new_article]  # id of each article, in store order

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

    def take(self, rows: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Vectors of store rows `rows`, as float32 whatever the storage."""
        return self.vectors[torch.as_tensor(rows, dtype=torch.long)].float()

    def runs_of(self, rows: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.run_start, rows, side="right") - 1

    def articles_of(self, rows: np.ndarray) -> np.ndarray:
        """Article number (store order, 0..num_articles-1) of each of `rows`."""
        return self.run_article[self.runs_of(rows)]

    def chunks_of(self, rows: np.ndarray) -> np.ndarray:
        """Chunk index of each of `rows`."""
        run = self.runs_of(rows)
        return self.run_first_chunk[run] + (np.asarray(rows) - self.run_start[run])

    @property
    def row_article(self) -> np.ndarray:
        """Article number of every row ([N]: built on demand, for whole-store analysis)."""
        return np.repeat(self.run_article, np.diff(self.run_start))

    @property
    def article_ids(self) -> np.ndarray:
        """Article id of every row ([N] int64, built on demand)."""
        return self.article_id_of[self.row_article]

    @property
    def chunk_indices(self) -> np.ndarray:
        """Chunk index of every row ([N] int64, built on demand)."""
        return self.chunks_of(np.arange(len(self)))

    def windows(self, spec: WindowSpec, articles: np.ndarray | None = None) -> "Windows":
        """All windows of `spec` inside one article each, restricted to `articles` if given."""
        return self.split_windows(spec, {"all": articles})["all"]

    def split_windows(self, spec: WindowSpec, articles: dict[str, np.ndarray | None]) -> dict[str, "Windows"]:
        """Windows of several article subsets (None: every article), finding windows only once."""
        segments = window_segments(self.run_start, self.run_article, self.run_first_chunk, spec)
        out = {}
        for name, ids in articles.items():
            keep = slice(None) if ids is None else np.isin(self.unique_articles(), ids)[segments[3]]
            out[name] = Windows(self, spec, *(part[keep] for part in segments[:3]))
        return out

    def article_span(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(first row, number of chunks) of the article holding each of `rows`."""
        art = self.articles_of(rows)
        return self.article_starts[art], self.article_lengths[art]


def window_segments(
    run_start: np.ndarray, run_article: np.ndarray, run_first_chunk: np.ndarray, spec: WindowSpec
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Every valid window, as segments of consecutive context start rows: (first start, count,
    target row - start row, article number) per segment, sorted by start row.

    Valid: the K context chunks are consecutive chunks of one article (they lie in one run), and
    the chunk `target_offset` after the last of them exists in that article: in the same run, or
    (target_offset > 1) in one of the article's next runs past a gap. Per pair (run j, run j + d)
    the windows form one range of starts with one target distance, so the segments are O(runs).
    """
    k, offset = spec.context, spec.target_offset
    start, length = run_start[:-1], np.diff(run_start)
    n_runs = len(start)
    parts = []
    for d in range(0, offset + 1):
        j = np.arange(n_runs - d)
        m = j + d
        # u = (start row - run j's start); the target chunk is first_chunk[j] + u + k - 1 + offset.
        base = run_first_chunk[m] - run_first_chunk[j] - (k - 1) - offset
        lo = np.maximum(base, 0)
        hi = np.minimum(base + length[m] - 1, length[j] - k)
        ok = (hi >= lo) & (run_article[m] == run_article[j])
        j, m, lo, hi = j[ok], m[ok], lo[ok], hi[ok]
        first = start[j] + lo
        delta = (start[m] - run_first_chunk[m]) - (start[j] - run_first_chunk[j]) + (k - 1) + offset
        parts.append((first, hi - lo + 1, delta, run_article[j]))
    first, count, delta, article = (np.concatenate(p).astype(np.int64) for p in zip(*parts))
    order = np.argsort(first, kind="stable")
    return first[order], count[order], delta[order], article[order]


def segment_rows(first: torch.Tensor, delta: torch.Tensor, ends: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Context start rows and target rows of windows `idx` (`ends`: cumulative window counts)."""
    seg = torch.searchsorted(ends, idx, right=True)
    before = torch.where(seg > 0, ends[(seg - 1).clamp(min=0)], torch.zeros_like(idx))
    starts = first[seg] + (idx - before)
    return starts, starts + delta[seg]


class Windows(Dataset):
    """Windows of one split, as segments of the store's rows: a Dataset whose batches are gathered
    by one vectorised index (memory O(segments), not O(windows))."""

    def __init__(self, store: ArticleStore, spec: WindowSpec, first: np.ndarray, count: np.ndarray, delta: np.ndarray):
        self.store = store
        self.spec = spec
        self.first = torch.from_numpy(np.ascontiguousarray(first, np.int64))
        self.delta = torch.from_numpy(np.ascontiguousarray(delta, np.int64))
        self.count = np.asarray(count, np.int64)
        self.ends = torch.from_numpy(np.cumsum(self.count))
        self._offsets = torch.arange(spec.context)

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def rows(self, idx: torch.Tensor | np.ndarray | list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(context start row, target row) of windows `idx`."""
        return segment_rows(self.first, self.delta, self.ends, torch.as_tensor(idx, dtype=torch.long))

    @property
    def starts(self) -> torch.Tensor:
        """Context start row of every window ([N]: built on demand, for whole-split work)."""
        return self.rows(torch.arange(len(self)))[0]

    @property
    def targets(self) -> torch.Tensor:
        """Target row of every window ([N]: built on demand)."""
        return self.rows(torch.arange(len(self)))[1]

    def context_rows(self, idx: torch.Tensor) -> torch.Tensor:
        """[B, K] store rows of the context chunks of windows `idx`."""
        return self.rows(idx)[0].unsqueeze(1) + self._offsets

    def gather(self, idx: torch.Tensor | np.ndarray | list[int]) -> dict[str, torch.Tensor]:
        """Batch of windows `idx`: context [B, K, D], target [B, D] and their store rows."""
        return gather_windows(self.store.vectors, self.first, self.delta, self.ends, self._offsets, idx)

    def on(self, device: torch.device, vectors: torch.Tensor) -> DeviceWindows:
        """These windows' segments on `device`, over `vectors` (the store's, already there)."""
        return DeviceWindows(vectors, self.first.to(device), self.delta.to(device), self.ends.to(device), self._offsets.to(device))

    def batches(self, size: int) -> Iterator[dict[str, torch.Tensor]]:
        """Every window once, in order, `size` at a time (passes over a whole split)."""
        for s in range(0, len(self), size):
            yield self.gather(torch.arange(s, min(s + size, len(self))))

    def __getitems__(self, idx: list[int]) -> dict[str, torch.Tensor]:
        # DataLoader calls this with the whole batch of indices when it exists.
        return self.gather(idx)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.gather([i]).items()}

    def article_ids(self, idx: torch.Tensor | np.ndarray | None = None) -> np.ndarray:
        """Article id of each window, or of windows `idx` (O(len(idx)))."""
        if idx is None:
            return np.repeat(self.store.article_id_of[self.segment_articles()], self.count)
        return self.store.article_id_of[self.store.articles_of(self.rows(idx)[0].numpy())]

    def segment_articles(self) -> np.ndarray:
        """Article number (store order) of each segment."""
        return self.store.articles_of(self.first.numpy())

    @property
    def num_articles(self) -> int:
        return len(np.unique(self.segment_articles()))

    def sample(self, n: int, seed: int) -> np.ndarray:
        """Indices of `n` windows drawn across articles, seeded (`stratified_sample`)."""
        return stratified_sample(self.segment_articles(), self.count, n, seed)


def gather_windows(
    vectors: torch.Tensor,
    first: torch.Tensor,
    delta: torch.Tensor,
    ends: torch.Tensor,
    offsets: torch.Tensor,
    idx: torch.Tensor | np.ndarray | list[int],
) -> dict[str, torch.Tensor]:
    """Context [B, K, D] and target [B, D] as float32, and target rows, of windows `idx`, gathered
    where the arrays are (host or device): one vectorised index per tensor."""
    idx = torch.as_tensor(idx, dtype=torch.long, device=first.device)
    starts, target_rows = segment_rows(first, delta, ends, idx)
    rows = starts.unsqueeze(1) + offsets
    return {"context": vectors[rows].float(), "target": vectors[target_rows].float(), "target_row": target_rows}


@dataclass(frozen=True)
class DeviceWindows:
    """A split's windows with the store's vectors and its segments on the training device
    (data.on_device): a batch is one gather there, with no host copy."""

    vectors: torch.Tensor
    first: torch.Tensor
    delta: torch.Tensor
    ends: torch.Tensor
    offsets: torch.Tensor

    def gather(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        return gather_windows(self.vectors, self.first, self.delta, self.ends, self.offsets, idx)


class WindowIndex(Dataset):
    """A split's window indices as a Dataset (data.on_device): its batches are {"index": [B]},
    gathered into windows on the device (lvm/training/data.py)."""

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


def normalize_rows(
    vectors: np.ndarray, source: str, policy: NormalizePolicy, copy_on_write: bool = False, first_row: int = 0
) -> tuple[np.ndarray, int, float, float]:
    """Reject non-finite and zero rows; renormalise or reject non-unit rows (unit rows stay untouched).

    Renormalises in place, after copying `vectors` first if `copy_on_write`. Returns the rows, how
    many were renormalised and their norms' range. Errors number rows from `first_row`.
    """
    check_policy(policy)
    off_unit, lo, hi = 0, np.inf, 0.0
    for s in range(0, len(vectors), _SCAN_ROWS):
        block = vectors[s : s + _SCAN_ROWS]
        norms = np.sqrt(np.einsum("ij,ij->i", block, block, dtype=np.float64))
        bad = ~np.isfinite(norms)
        if bad.any():
            row = first_row + s + int(np.flatnonzero(bad)[0])
            raise DataError(f"{source}: vectors row {row} holds NaN or inf ({int(bad.sum())} such rows in block)")
        if (norms == 0).any():
            row = first_row + s + int(np.flatnonzero(norms == 0)[0])
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
    return vectors, off_unit, lo, hi


def _check_not_constant(vectors: np.ndarray, source: str) -> None:
    """Reject a store (of 2+ rows) whose rows all point the way row 0 does.

    Scans in blocks and stops at the first block holding another direction: on real data that is
    the first block, so the check costs one block's matrix-vector product.
    """
    if len(vectors) < 2:
        return
    first = unit_direction(vectors[0])
    if not any(points_elsewhere(vectors[s : s + _SCAN_ROWS], first) for s in range(0, len(vectors), _SCAN_ROWS)):
        raise one_direction_error(source, len(vectors))


def unit_direction(row: np.ndarray) -> np.ndarray:
    """`row` as a unit float64 vector: the direction the one-direction check compares with."""
    row = row.astype(np.float64)
    return row / np.linalg.norm(row)


def points_elsewhere(block: np.ndarray, direction: np.ndarray) -> bool:
    """Whether any row of `block` has cosine below SAME_DIRECTION_COS with the unit `direction`."""
    dots = np.einsum("ij,j->i", block, direction, dtype=np.float64)
    norms = np.sqrt(np.einsum("ij,ij->i", block, block, dtype=np.float64))
    return bool((dots < SAME_DIRECTION_COS * norms).any())


def one_direction_error(source: str, rows: int) -> DataError:
    return DataError(
        f"{source}: all {rows} vectors are identical (one direction: cosine with row 0 >= "
        f"{SAME_DIRECTION_COS}); expected distinct chunk embeddings, one per chunk: with a single vector "
        "every prediction ties and no metric means anything"
    )
