"""The built-in synthetic corpus: articles whose chunks drift around a topic, deterministic from a seed.

Chunk t of an article is normalize(topic_weight * u + drift_weight * w_t + noise * e_t), where u is
the article's topic (a random unit vector), w_t a unit random walk (w_t = normalize(w_{t-1} +
drift_step * xi_t)) and e_t fresh Gaussian noise of unit expected norm. The topic and the current
drift state can be estimated from the context, the future drift cannot: so a good predictor beats
copy-last (it averages the noise away) and still sits closer to the last context chunk than to the
target, as on real text.
"""

from __future__ import annotations

import numpy as np

from lvm.runtime.errors import require


def check_synthetic(
    dim: int, articles: int, min_chunks: int, max_chunks: int, noise: float, drift_step: float, common_weight: float
) -> None:
    """The generator's settings (data.synthetic), checked at start-up and before generating."""
    require(
        (dim >= 2 and articles >= 1, f"data.synthetic: dim must be >= 2 and articles >= 1 (got {dim}, {articles})"),
        (1 <= min_chunks <= max_chunks, f"data.synthetic needs 1 <= min_chunks <= max_chunks (got {min_chunks}, {max_chunks})"),
        (noise >= 0 and drift_step >= 0 and common_weight >= 0, "data.synthetic.noise, drift_step and common_weight must be >= 0"),
    )


def synthetic_corpus(
    dim: int,
    articles: int,
    min_chunks: int,
    max_chunks: int,
    topic_weight: float,
    drift_weight: float,
    drift_step: float,
    noise: float,
    seed: int,
    common_weight: float = 0.0,
    stream: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unit vectors [N, D] float32, article ids [N] and chunk indices [N], sorted by article.
    `common_weight` > 0 adds one direction shared by every chunk (anisotropic data, as many
    embedding models give: random pairs then have a clearly positive cosine); it is drawn from its
    own stream, so 0 leaves every other vector as it was. `stream` > 0 draws other articles from the
    same settings and common direction (a store written in blocks of articles, one stream each)."""
    check_synthetic(dim, articles, min_chunks, max_chunks, noise, drift_step, common_weight)
    rng = np.random.default_rng(seed if stream == 0 else [seed, 2, stream])
    common = common_weight * _unit(np.random.default_rng([seed, 1]).standard_normal((1, dim)))
    lengths = rng.integers(min_chunks, max_chunks + 1, size=articles)
    total = int(lengths.sum())
    out = np.empty((total, dim), np.float32)
    topic = _unit(rng.standard_normal((articles, dim)))
    walk = _unit(rng.standard_normal((articles, dim)))
    offsets = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    scale = 1.0 / np.sqrt(dim)  # Gaussian steps with unit expected norm
    for t in range(int(lengths.max())):
        alive = np.flatnonzero(lengths > t)
        if t:
            walk[alive] = _unit(walk[alive] + drift_step * scale * rng.standard_normal((len(alive), dim)))
        e = scale * rng.standard_normal((len(alive), dim))
        out[offsets[alive] + t] = _unit(topic_weight * topic[alive] + drift_weight * walk[alive] + noise * e + common)
    article_ids = np.repeat(np.arange(articles, dtype=np.int64), lengths)
    chunk_indices = np.concatenate([np.arange(n, dtype=np.int64) for n in lengths])
    return out, article_ids, chunk_indices


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)
