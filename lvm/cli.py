"""Command-line conventions shared by lvm's entry points (kept free of heavy imports)."""

from __future__ import annotations


def positional_override(argv: list[str], key: str) -> list[str]:
    """`prog VALUE k=v ...` as `prog key=VALUE k=v ...`: the first argument may be given bare."""
    if len(argv) > 1 and "=" not in argv[1] and not argv[1].startswith("-"):
        return [argv[0], f"{key}={argv[1]}", *argv[2:]]
    return argv
