"""Markdown tables and the numbers in them, for every report lvm writes (5CAT, dataset diagnosis,
sweep summary). No heavy imports: `python -m lvm.tools.sweep_report` stays light."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def fmt(v: Any, digits: int = 3) -> str:
    """A number for a markdown table: fixed digits, a sign only when negative, n/a for missing or NaN."""
    if v is None or (isinstance(v, float) and v != v):
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:+.{digits}f}" if v < 0 else f"{v:.{digits}f}"
    return str(v)


def md_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def md_header(columns: Sequence[str]) -> list[str]:
    """The header line and the separator line of a table."""
    return [md_row(columns), "|" + " --- |" * len(columns)]


def md_table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """A whole table's lines."""
    return [*md_header(columns), *(md_row(r) for r in rows)]
