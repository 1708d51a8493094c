"""The store directory: vectors that training reads by memory map, never whole.

    <store>/vectors.bin    rows x D, flat and headerless: float32, float16 or bfloat16 storage
    <store>/offsets.bin    int64 [runs + 1]: first row of each run, then the row count
    <store>/articles.bin   int64 [runs, 2]: (article id, first chunk index) of each run
    <store>/manifest.json  rows, dim, dtype, runs, articles, fingerprint, encoder, source, the
                           checks' results and each file's size and mtime; written last, atomically

A run is a range of rows holding consecutive chunks of one article (an article with a gap in its
chunk indices has two). Opening maps the files and reads only the O(runs) layout; the content
checks (NaN or Inf rows, zero or non-unit norms, one direction throughout) are made by a bounded
scan at build time, and again at open only when a file's size or mtime differs from the manifest.
A directory without a manifest is a build that did not finish: it is refused, and a new build in
it starts over.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from lvm.data.store import (
    ArticleStore,
    NormalizePolicy,
    check_policy,
    normalize_rows,
    one_direction_error,
    points_elsewhere,
    unit_direction,
)
from lvm.runtime.errors import DataError
from lvm.runtime.files import atomic_open, atomic_write_text

log = logging.getLogger(__name__)

FORMAT = 1
MANIFEST, VECTORS, OFFSETS, ARTICLES = "manifest.json", "vectors.bin", "offsets.bin", "articles.bin"
FILES = (VECTORS, OFFSETS, ARTICLES)
STORAGE = {"float32": 4, "float16": 2, "bfloat16": 2}  # storage dtype: bytes per value
MEMORY = ("map", "load")  # how a run holds the vectors (open_store)


def _as_storage(block: np.ndarray, dtype: str) -> np.ndarray:
    """float32 rows as the bytes of `dtype` storage (bfloat16 as its uint16 bit patterns)."""
    if dtype == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(block)).to(torch.bfloat16).view(torch.int16).numpy()
    return np.ascontiguousarray(block, dtype=np.float32 if dtype == "float32" else np.float16)


class StoreWriter:
    """Streams sorted rows into a store directory, block by block, never holding all vectors.

    Rows arrive sorted by (article id, chunk index) across `add` calls. Each block is checked
    (non-finite and zero rows are errors; non-unit rows are renormalised or rejected by
    `normalize`) before it is written; `close` writes the layout, then the manifest, atomically.
    Use as a context manager: an exception leaves no manifest, so the directory is never taken
    for a complete store.
    """

    def __init__(
        self,
        path: str | Path,
        dim: int,
        dtype: str = "float32",
        normalize: NormalizePolicy = "renormalize",
        encoder: str | None = None,
        source: str | None = None,
        overwrite: bool = False,
    ) -> None:
        if dtype not in STORAGE:
            raise DataError(f"store dtype must be one of {sorted(STORAGE)} (got {dtype!r})")
        check_policy(normalize)
        self.path = Path(path)
        self.dim, self.dtype, self.normalize = dim, dtype, normalize
        self.info = {"encoder": encoder, "source": source}
        manifest = self.path / MANIFEST
        if manifest.exists():
            if not overwrite:
                raise DataError(f"{self.path}: a complete store is already here (manifest.json); choose another path or overwrite it")
            manifest.unlink()
        elif any((self.path / name).exists() for name in FILES):
            log.warning("%s: an earlier build did not finish (no manifest.json); starting it over", self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        self._vectors: BinaryIO = open(self.path / VECTORS, "wb")  # noqa: SIM115 (closed by close())
        self._hash = hashlib.blake2b(digest_size=16)
        self.rows = 0
        self._runs: list[np.ndarray] = []  # [run start, article id, first chunk] per block
        self._last: tuple[int, int] | None = None  # (article id, chunk index) of the last row written
        self._first: np.ndarray | None = None  # row 0, for the one-direction check
        self._varied = False
        self._renormalised = 0
        self._norms = (np.inf, 0.0)  # range of the renormalised rows' norms

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: Any) -> None:
        if kind is None:
            self.close()
        else:
            self._vectors.close()

    def add(self, vectors: np.ndarray, article_ids: np.ndarray, chunk_indices: np.ndarray) -> None:
        """Append rows (sorted by (article id, chunk index), continuing the rows already added)."""
        vectors = np.asarray(vectors)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim or not np.issubdtype(vectors.dtype, np.floating):
            raise DataError(f"{self.path}: rows must be floating point [n, {self.dim}] (got {vectors.dtype} {vectors.shape})")
        art, chunk = np.asarray(article_ids, np.int64), np.asarray(chunk_indices, np.int64)
        if art.shape != (len(vectors),) or chunk.shape != (len(vectors),):
            raise DataError(f"{self.path}: article ids and chunk indices must be [{len(vectors)}] like the rows")
        if not len(vectors):
            return
        prev_art = np.concatenate(([self._last[0]], art[:-1])) if self._last else np.concatenate(([art[0] - 1], art[:-1]))
        prev_chunk = np.concatenate(([self._last[1]], chunk[:-1])) if self._last else np.concatenate(([-1], chunk[:-1]))
        unsorted = (art < prev_art) | ((art == prev_art) & (chunk <= prev_chunk))
        if unsorted.any():
            row = self.rows + int(np.flatnonzero(unsorted)[0])
            raise DataError(
                f"{self.path}: row {row} (article {art[row - self.rows]}, chunk {chunk[row - self.rows]}) does not follow the "
                "row before it; rows must arrive sorted by (article id, chunk index), each chunk once"
            )
        if (chunk < 0).any():
            raise DataError(f"{self.path}: chunk indices must be >= 0 (min is {chunk.min()})")
        block, renormalised, lo, hi = normalize_rows(
            np.asarray(vectors, dtype=np.float32), str(self.path), self.normalize, copy_on_write=True, first_row=self.rows
        )
        if renormalised:
            self._renormalised += renormalised
            self._norms = (min(self._norms[0], lo), max(self._norms[1], hi))
        self._check_direction(block)
        new_run = (art != prev_art) | (chunk != prev_chunk + 1)
        starts = np.flatnonzero(new_run)
        self._runs.append(np.stack([self.rows + starts, art[starts], chunk[starts]], axis=1))
        data = _as_storage(block, self.dtype).tobytes()
        self._vectors.write(data)
        self._hash.update(data)
        self.rows += len(block)
        self._last = (int(art[-1]), int(chunk[-1]))

    def _check_direction(self, block: np.ndarray) -> None:
        if self._first is None:
            self._first = unit_direction(block[0])
        self._varied = self._varied or points_elsewhere(block, self._first)

    def close(self) -> Path:
        """Write offsets, articles and (last) the manifest; returns the store's path. The data files
        reach the disk (fsync) before the manifest is written: a crash never leaves a manifest that
        vouches for vectors still in the page cache."""
        self._vectors.flush()
        os.fsync(self._vectors.fileno())
        self._vectors.close()
        if not self.rows:
            raise DataError(f"{self.path}: no rows were written; a store needs at least one chunk")
        if self.rows > 1 and not self._varied:
            raise one_direction_error(str(self.path), self.rows)
        runs = np.concatenate(self._runs)
        offsets = np.append(runs[:, 0], self.rows).astype(np.int64)
        articles = np.ascontiguousarray(runs[:, 1:], np.int64)
        for name, arr in ((OFFSETS, offsets), (ARTICLES, articles)):
            data = arr.tobytes()
            with atomic_open(self.path / name, "wb") as f:  # on disk (fsync) when the block ends
                f.write(data)
            self._hash.update(data)
        if self._renormalised:
            log.warning("%s: renormalised %d non-unit vectors (norms %.4g..%.4g)", self.path, self._renormalised, *self._norms)
        manifest = {
            "format": FORMAT,
            "rows": self.rows,
            "dim": self.dim,
            "dtype": self.dtype,
            "runs": len(runs),
            "articles": int(len(np.unique(articles[:, 0]))),
            "fingerprint": self._hash.hexdigest(),
            **self.info,
            "checked": {"finite": True, "nonzero": True, "unit_norm": True, "renormalised": self._renormalised, "distinct": True},
            "files": _stamps(self.path),
        }
        atomic_write_text(self.path / MANIFEST, json.dumps(manifest, indent=2) + "\n")
        log.info(
            "%s: %d rows x %d (%s), %d articles, %.2f GB",
            self.path,
            self.rows,
            self.dim,
            self.dtype,
            manifest["articles"],
            store_bytes(manifest) / 1e9,
        )
        return self.path


def store_bytes(manifest: dict[str, Any]) -> int:
    return manifest["rows"] * manifest["dim"] * STORAGE[manifest["dtype"]]


def _stamps(path: Path) -> dict[str, list[int]]:
    return {name: [(st := (path / name).stat()).st_size, st.st_mtime_ns] for name in FILES}


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of store directory `path`, its keys and the files' sizes checked."""
    path = Path(path)
    file = path / MANIFEST
    if not path.is_dir():
        raise DataError(f"{path}: no such store directory")
    if not file.is_file():
        raise DataError(f"{path}: no {MANIFEST}: not a complete store (a build that did not finish?); build it again")
    try:
        manifest = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{file}: not valid JSON ({e})") from None
    missing = [k for k in ("format", "rows", "dim", "dtype", "runs", "fingerprint") if k not in manifest]
    if missing:
        raise DataError(f"{file}: missing key(s) {missing}")
    if manifest["format"] != FORMAT:
        raise DataError(f"{file}: store format {manifest['format']!r}, this lvm reads format {FORMAT}; rebuild or convert the store")
    if manifest["dtype"] not in STORAGE:
        raise DataError(f"{file}: dtype {manifest['dtype']!r} is not one of {sorted(STORAGE)}")
    for key in ("rows", "dim", "runs"):
        if not (isinstance(manifest[key], int) and manifest[key] >= 1):
            raise DataError(f"{file}: {key} must be an integer >= 1 (got {manifest[key]!r})")
    expected = {VECTORS: store_bytes(manifest), OFFSETS: 8 * (manifest["runs"] + 1), ARTICLES: 16 * manifest["runs"]}
    for name, size in expected.items():
        f = path / name
        if not f.is_file():
            raise DataError(f"{f}: missing (the manifest lists {size} bytes)")
        got = f.stat().st_size
        if got != size:
            what = "truncated" if got < size else "larger than the manifest says"
            raise DataError(
                f"{f}: {what}: {got} bytes, expected {size} ({manifest['rows']} x {manifest['dim']} {manifest['dtype']} rows)"
                if name == VECTORS
                else f"{f}: {what}: {got} bytes, expected {size} for {manifest['runs']} runs"
            )
    return manifest


def check_memory(memory: str) -> None:
    if memory not in MEMORY:
        raise DataError(f"data.memory must be one of {list(MEMORY)} (got {memory!r})")


def open_store(path: str | Path, memory: str = "map") -> ArticleStore:
    """The store at `path`, its vectors mapped (`map`: copy-on-write, so every rank shares one
    page-cache copy) or read into this process's memory (`load`)."""
    check_memory(memory)
    path = Path(path)
    manifest = read_manifest(path)
    rows, dim, dtype, runs = manifest["rows"], manifest["dim"], manifest["dtype"], manifest["runs"]
    offsets = np.fromfile(path / OFFSETS, np.int64)
    articles = np.fromfile(path / ARTICLES, np.int64).reshape(runs, 2)
    _check_layout(path, offsets, articles, rows)
    if manifest.get("files") != _stamps(path):
        _rescan(path, manifest)
    kind = np.uint16 if dtype == "bfloat16" else np.dtype(dtype)
    if memory == "map":
        raw = np.memmap(path / VECTORS, dtype=kind, mode="c", shape=(rows, dim))
    else:
        raw = np.fromfile(path / VECTORS, dtype=kind).reshape(rows, dim)
    vectors = torch.from_numpy(raw)
    if dtype == "bfloat16":
        vectors = vectors.view(torch.bfloat16)
    return ArticleStore.from_runs(vectors, offsets[:-1], articles[:, 0], articles[:, 1], str(path))


def _check_layout(path: Path, offsets: np.ndarray, articles: np.ndarray, rows: int) -> None:
    if offsets[0] != 0 or offsets[-1] != rows:
        raise DataError(f"{path / OFFSETS}: must start at 0 and end at rows={rows} (got {offsets[0]} .. {offsets[-1]})")
    if not (np.diff(offsets) > 0).all():
        i = int(np.flatnonzero(np.diff(offsets) <= 0)[0])
        raise DataError(f"{path / OFFSETS}: offsets must increase (entry {i + 1} is {offsets[i + 1]} after {offsets[i]})")
    art, first = articles[:, 0], articles[:, 1]
    last = first[:-1] + np.diff(offsets)[:-1] - 1  # chunk index of each run's last row
    ordered = (art[1:] > art[:-1]) | ((art[1:] == art[:-1]) & (first[1:] > last + 1))
    if not ordered.all() or (first < 0).any():
        i = int(np.flatnonzero(~ordered)[0]) + 1 if not ordered.all() else int(np.flatnonzero(first < 0)[0])
        raise DataError(
            f"{path / ARTICLES}: run {i} (article {art[i]}, first chunk {first[i]}) is out of order; runs must be sorted by "
            "(article id, chunk index), chunk indices >= 0, and runs of one article separated by a gap"
        )


def _rescan(path: Path, manifest: dict[str, Any]) -> None:
    """Files whose size or mtime changed since the build (a copy, a touch): their fingerprint must
    still be the build's, whose scan checked every row; the manifest then records the new stamps."""
    log.info("%s: files changed since the manifest was written (size or mtime); checking their fingerprint", path)
    digest = hashlib.blake2b(digest_size=16)
    with open(path / VECTORS, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    for name in (OFFSETS, ARTICLES):
        digest.update((path / name).read_bytes())
    if digest.hexdigest() != manifest["fingerprint"]:
        raise DataError(
            f"{path}: content differs from its manifest (fingerprint {digest.hexdigest()}, manifest {manifest['fingerprint']}): "
            "the files were changed after the build; rebuild the store"
        )
    manifest["files"] = _stamps(path)
    try:
        atomic_write_text(path / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    except OSError:
        log.info("%s: store is read-only; its checks run again at every open until the manifest's stamps match", path)
