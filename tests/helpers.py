"""Small builders shared by the data-layer tests."""

from __future__ import annotations

import numpy as np

from lvm.data.store import WindowSpec

P6 = WindowSpec(context=5, target_offset=2, prev_slot=-2)
STANDARD = WindowSpec(context=5, target_offset=1, prev_slot=-1)


def unit_rows(n: int, d: int, seed: int = 0) -> np.ndarray:
    """n random unit vectors of dimension d, float32."""
    x = np.random.default_rng(seed).standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
