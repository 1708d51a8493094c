"""`python -m lvm.tools.store out=DIR`: write a store directory from any data source, or back.

The writers are lvm/data/convert.py's: synthetic data in blocks of `block_articles` articles (any
size), an NPZ (data=store_npz | windows_npz) in blocks; with to=npz a store directory (data=store)
becomes an article-store NPZ (float32 vectors, article_indices, chunk_indices).
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig

from lvm.data.convert import write_npz, write_store
from lvm.data.loaders import check_data
from lvm.data.mapped import STORAGE, read_manifest
from lvm.data.store import WindowSpec
from lvm.runtime.cli import CONF_DIR, entry_point, run_entry_point
from lvm.runtime.errors import ConfigError
from lvm.runtime.objects import to_plain
from lvm.runtime.threads import set_threads

log = logging.getLogger(__name__)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="store")
@entry_point("lvm.tools.store")
def main(cfg: DictConfig) -> None:
    set_threads(cfg.threads)
    if cfg.to not in ("store", "npz"):
        raise ConfigError(f"to must be store or npz (got {cfg.to!r})")
    if cfg.dtype not in STORAGE:
        raise ConfigError(f"dtype must be one of {sorted(STORAGE)} (got {cfg.dtype!r})")
    if not (isinstance(cfg.block_articles, int) and cfg.block_articles >= 1):
        raise ConfigError(f"block_articles must be an integer >= 1 (got {cfg.block_articles!r})")
    data = to_plain(cfg.data)
    check_data(data)
    out = Path(cfg.out)
    if cfg.to == "npz":
        if data["source"] != "store":
            raise ConfigError(f"to=npz reads a store directory: data=store data.path=DIR (got data.source={data['source']})")
        print(f"lvm.tools.store: wrote {write_npz(Path(data['path']), out)}")
        return
    write_store(data, WindowSpec(**cfg.window), out, cfg.dtype, cfg.overwrite, cfg.block_articles)
    m = read_manifest(out)
    print(f"lvm.tools.store: wrote {out}: {m['rows']} rows x {m['dim']} ({m['dtype']}), {m['articles']} articles")


def cli() -> None:
    """The console script."""
    run_entry_point(main)


if __name__ == "__main__":
    cli()
