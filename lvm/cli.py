"""Command-line conventions shared by lvm's entry points (kept free of heavy imports)."""

from __future__ import annotations


def positional_override(argv: list[str], key: str) -> list[str]:
    """`prog VALUE k=v ...` as `prog key='VALUE' k=v ...`: the first argument may be given bare
    (a path without '='); quoted so that spaces and Hydra's special characters survive."""
    if len(argv) > 1 and "=" not in argv[1] and not argv[1].startswith("-"):
        quoted = argv[1].replace("'", "\\'")  # Hydra's quoted strings escape only quotes
        return [argv[0], f"{key}='{quoted}'", *argv[2:]]
    return argv
