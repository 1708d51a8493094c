"""`python -m lvm.diagnosis.diagnose <store> [key=value ...]`: what an article store can teach.

Loads the store (a store directory, lvm/data/mapped.py, or an article-store NPZ), splits its
articles (held-out articles for the baselines, as training would), computes the statistics of
lvm/diagnosis/stats.py (baselines: lvm/diagnosis/baselines.py) and writes diagnose.json (strict
JSON), diagnose.md and diagnose.png (lvm/diagnosis/report.py) into `out_dir` (default: diagnose/
beside the store, so a build's out_dir/store gives out_dir/diagnose/). Exit code 0, or 2 with one
line on stderr for bad input or configuration.
"""

from __future__ import annotations

import logging
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from lvm.data.loaders import load_store_npz
from lvm.data.mapped import open_store
from lvm.data.splits import split_articles
from lvm.data.store import ArticleStore, NormalizePolicy
from lvm.diagnosis.layout import FIT, HELDOUT, TUNE, Layout, Settings
from lvm.diagnosis.report import findings, write_outputs
from lvm.diagnosis.stats import diagnose
from lvm.runtime.cli import CONF_DIR, entry_point, run_entry_point
from lvm.runtime.errors import ConfigError
from lvm.runtime.threads import set_threads

log = logging.getLogger(__name__)


def load(path: Path, normalize: NormalizePolicy) -> tuple[ArticleStore, np.ndarray]:
    """The store at `path` (a store directory, whose rows were checked when it was built, or an
    article-store NPZ, checked by `normalize`) and its rows as float32 (a half-precision store's too)."""
    store = open_store(path) if path.is_dir() else load_store_npz(path, normalize)
    vectors = store.vectors.numpy() if store.vectors.dtype == torch.float32 else store.take(np.arange(len(store))).numpy()
    return store, vectors


def read_layout(store: ArticleStore) -> Layout:
    """The row layout the statistics need, taken from a validated store."""
    return Layout(store.row_article, store.chunk_indices, store.article_starts, store.article_lengths, store.article_id_of)


# Settings read from the config's `ridge` node; every other one is a top-level key of the same name.
RIDGE_SETTINGS = ("alphas", "prior", "max_train")


def parse_settings(cfg: DictConfig) -> Settings:
    """Settings from the config (ConfigError naming the key when a value is impossible)."""
    values = {f.name: cfg.ridge[f.name] if f.name in RIDGE_SETTINGS else cfg[f.name] for f in fields(Settings)}
    values["alphas"] = tuple(values["alphas"])
    try:
        return Settings(**values)
    except TypeError as e:
        raise ConfigError(f"invalid diagnose settings: a value has the wrong type ({e})") from None


def check_fractions(val: float, tune: float) -> None:
    """split.val and ridge.tune must be fractions strictly between 0 and 1."""
    for name, value in (("split.val", val), ("ridge.tune", tune)):
        if not 0 < value < 1:
            raise ConfigError(f"{name} must be a fraction in (0, 1) (got {value})")


def split_codes(store: ArticleStore, val: float, tune: float, seed: int) -> tuple[np.ndarray, dict[str, int]]:
    """FIT / TUNE / HELDOUT per article: `val` of the articles held out (split_articles, `seed`),
    `tune` of the rest choosing ridge's alpha (split_articles, `seed` + 1)."""
    check_fractions(val, tune)
    ids = store.unique_articles()
    outer = split_articles(ids, val, 0.0, seed)
    inner = split_articles(outer["train"], tune, 0.0, seed + 1)
    codes = np.full(len(ids), FIT, np.int8)
    codes[np.isin(ids, inner["val"])] = TUNE
    codes[np.isin(ids, outer["val"])] = HELDOUT
    return codes, {"heldout": len(outer["val"]), "tune": len(inner["val"]), "fit": len(inner["train"])}


def run(cfg: DictConfig) -> dict[str, Any]:
    """The CLI's work: load, diagnose, write the three files; returns the report."""
    if OmegaConf.is_missing(cfg, "store") or not cfg.store:
        raise ConfigError("no store given: python -m lvm.diagnosis.diagnose <store directory or .npz> (or store=PATH)")
    settings = parse_settings(cfg)
    check_fractions(float(cfg.split.val), float(cfg.ridge.tune))  # before loading a large store
    set_threads(cfg.threads)
    path = Path(str(cfg.store))
    t0 = time.perf_counter()
    store, vectors = load(path, cfg.normalize)
    codes, articles = split_codes(store, float(cfg.split.val), float(cfg.ridge.tune), int(cfg.split.seed))
    stats = diagnose(vectors, read_layout(store), codes, settings, str(path))
    report = {
        "store": {"path": str(path), "chunks": len(store), "articles": store.num_articles, "dim": store.dim},
        "settings": OmegaConf.to_container(cfg, resolve=True),
        "split_articles": articles,
        **stats,
    }
    report["findings"] = findings(report)
    report["seconds_total"] = time.perf_counter() - t0
    out_dir = Path(cfg.out_dir) if cfg.out_dir else path.parent / "diagnose"
    report["outputs"] = write_outputs(report, out_dir)
    return report


# ----------------------------------------------------------------------------- entry point


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="diagnose")
@entry_point("lvm.diagnosis.diagnose")
def main(cfg: DictConfig) -> None:
    report = run(cfg)
    print(f"lvm.diagnosis.diagnose: wrote {', '.join(report['outputs'].values())}")


def cli() -> None:
    """The console script."""
    run_entry_point(main, positional="store")


if __name__ == "__main__":
    cli()
