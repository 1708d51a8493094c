"""The files a run writes and reads back: atomic writes, JSON-lines records, strict JSON.

A file appears under its name only once it is completely written. A kill at any moment leaves either the old file or the new one, never a truncated mix: the
content goes to a hidden temporary file beside the target, is flushed to disk, then renamed over
it (`os.replace` is atomic within one filesystem).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from lvm.runtime.errors import DataError

log = logging.getLogger(__name__)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path to write to; renamed to `path` when the block ends without error."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        with tmp.open("rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_open(path: str | Path, mode: str = "w") -> Iterator[IO]:
    """`open(path, mode)` for writing, with the rename of `atomic_path` at the end."""
    with atomic_path(path) as tmp:
        encoding = None if "b" in mode else "utf-8"
        with tmp.open(mode, encoding=encoding) as f:
            yield f


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` to `path` atomically (UTF-8)."""
    with atomic_open(path) as f:
        f.write(text)


def drop_rows_after(path: str | Path, step: int) -> int:
    """Drop the rows of the JSON-lines record at `path` whose "step" is above `step` (rewritten
    atomically); returns how many were dropped. A resumed run calls it with its checkpoint's step,
    so rows written after the checkpoint by the interrupted run are not kept twice. A line cut
    short by a kill is dropped too."""
    path = Path(path)
    if not path.is_file():
        return 0
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = [line for line in lines if _row_step(line) <= step]
    if len(kept) < len(lines):
        atomic_write_text(path, "".join(kept))
    return len(lines) - len(kept)


def _row_step(line: str) -> float:
    try:
        return float(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):
        return float("inf")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The rows of a JSON-lines record (none when the file is missing). A last line without its
    newline is a write a kill cut short: it is left out, with a warning; a bad line elsewhere is a
    DataError naming the file and line."""
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if isinstance(row, dict):
            rows.append(row)
        elif i == len(lines) - 1 and not text.endswith("\n"):
            log.warning("%s: its last line was cut short (a killed write) and is left out: %r", path, line[:60])
        else:
            raise DataError(f"{path}: line {i + 1} is not a JSON object ({line[:60]!r})")
    return rows


def strict_json(obj: Any) -> Any:
    """`obj` with NaN/inf as None and numpy/torch scalars as Python numbers (for allow_nan=False)."""
    if isinstance(obj, Mapping):
        return {str(k): strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    if isinstance(obj, (torch.Tensor, np.generic)):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_files(
    report: dict[str, Any], paths: dict[str, Path], markdown: Callable[[dict[str, Any]], str], plot: Callable[[dict[str, Any], Path], None]
) -> dict[str, str]:
    """A report as strict JSON, markdown and a PNG at paths["json"], ["md"], ["png"] (their folder
    is created); returns the paths. Shared by 5CAT and the dataset diagnosis."""
    paths["json"].parent.mkdir(parents=True, exist_ok=True)
    paths["json"].write_text(json.dumps(strict_json(report), indent=2, allow_nan=False) + "\n")
    paths["md"].write_text(markdown(report))
    plot(report, paths["png"])
    return {k: str(v) for k, v in paths.items()}
