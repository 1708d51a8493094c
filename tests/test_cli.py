"""Command-line conventions shared by the entry points."""

from __future__ import annotations

from lvm.cli import positional_override


def test_a_bare_first_argument_is_the_store():
    assert positional_override(["prog", "a/b.npz", "seed=1"], "store") == ["prog", "store='a/b.npz'", "seed=1"]
    assert positional_override(["prog", "it's.npz"], "store") == ["prog", "store='it\\'s.npz'"]
    assert positional_override(["prog", "store=x.npz"], "store") == ["prog", "store=x.npz"]
    assert positional_override(["prog", "--help"], "store") == ["prog", "--help"]
