"""Splits by article (never by window): train, val (held-out articles) and OOD (a separate block)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np

from lvm.data.store import ArticleStore, Windows, WindowSpec
from lvm.runtime.errors import DataError

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "ood")


def check_fractions(val: float, ood: float, val_required: bool = True) -> None:
    """The split fractions' rule: OOD in [0, 1), val in (0, 1) (a training run validates on held-out
    articles; [0, 1) where `val_required` is false) and val + ood < 1, so train keeps some."""
    low_ok = val > 0 if val_required else val >= 0
    if not (low_ok and val < 1 and 0 <= ood < 1 and val + ood < 1):
        bound = "0 < val < 1" if val_required else "0 <= val < 1"
        raise DataError(f"data.split needs {bound}, 0 <= ood < 1 and val + ood < 1 (got val={val}, ood={ood})")


def split_articles(
    articles: np.ndarray,
    val: float,
    ood: float,
    seed: int,
    ranges: Mapping[str, Sequence[int]] | None = None,
) -> dict[str, np.ndarray]:
    """Assign article ids to splits.

    With `ranges` ({split: [first_id, end_id)}), each split takes the ids in its half-open range.
    Otherwise OOD is the last `ood` fraction of the sorted ids (a block of different articles, as
    in the original), val a seeded random `val` fraction of the rest, train the remainder.
    """
    articles = np.sort(np.asarray(articles))
    if ranges:
        unknown = set(ranges) - set(SPLITS)
        if unknown:
            raise DataError(f"data.split.ranges has unknown split(s) {sorted(unknown)}; use {list(SPLITS)}")
        out = {}
        for name in SPLITS:
            lo, hi = ranges.get(name, (0, 0))
            out[name] = articles[(articles >= lo) & (articles < hi)]
        for i, a in enumerate(SPLITS):
            for b in SPLITS[i + 1 :]:
                both = np.intersect1d(out[a], out[b])
                if len(both):
                    raise DataError(f"data.split.ranges: {a} and {b} overlap on {len(both)} articles")
        unused = len(articles) - sum(len(v) for v in out.values())
        if unused:
            log.info("data.split.ranges leaves %d of %d articles unused", unused, len(articles))
        return out
    check_fractions(val, ood, val_required=False)
    n = len(articles)
    n_ood = int(round(ood * n))
    n_val = int(round(val * n))
    ood_ids = articles[n - n_ood :]
    rest = articles[: n - n_ood]
    perm = np.random.default_rng(seed).permutation(len(rest))
    val_ids = np.sort(rest[perm[:n_val]])
    train_ids = np.sort(rest[perm[n_val:]])
    return {"train": train_ids, "val": val_ids, "ood": ood_ids}


def make_splits(
    store: ArticleStore,
    spec: WindowSpec,
    val: float,
    ood: float,
    seed: int,
    ranges: Mapping[str, Sequence[int]] | None = None,
) -> dict[str, Windows]:
    """Windows of each split; raises if train or val (or a requested OOD) has no window."""
    short = int((store.article_lengths < spec.min_article_chunks).sum())
    if short:
        log.info(
            "%s: %d of %d articles have fewer than %d chunks and yield no window",
            store.source,
            short,
            store.num_articles,
            spec.min_article_chunks,
        )
    if not ranges:
        check_fractions(val, ood)
    ids = split_articles(store.unique_articles(), val, ood, seed, ranges)
    out = store.split_windows(spec, {name: ids[name] for name in SPLITS})
    # With ranges the fractions are ignored: OOD is requested only if it has a range.
    requested = {"train": True, "val": True, "ood": ("ood" in ranges) if ranges else ood > 0}
    for name, windows in out.items():
        if requested[name] and len(windows) == 0:
            raise DataError(
                f"{store.source}: split '{name}' has no window ({len(ids[name])} articles; a window needs "
                f"{spec.min_article_chunks} consecutive chunks of one article for context={spec.context}, "
                f"target_offset={spec.target_offset}). Check data.split or the window settings."
            )
    log.info(
        "%s: %d chunks, %d articles, D=%d; windows train=%d val=%d ood=%d",
        store.source,
        len(store),
        store.num_articles,
        store.dim,
        len(out["train"]),
        len(out["val"]),
        len(out["ood"]),
    )
    return out
