"""`python -m lvm.tools.sweep_report <sweep dir> [metric=M]`: regenerate a sweep's summary files."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from lvm.runtime.cli import CONF_DIR, entry_point, run_entry_point
from lvm.tools.sweep import write_summary


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="sweep_report")
@entry_point("lvm.tools.sweep_report")
def main(cfg: DictConfig) -> None:
    for path in write_summary(cfg.sweep_dir, cfg.metric, cfg.axes).values():
        print(path)


def cli() -> None:
    """The console script."""
    run_entry_point(main, positional="sweep_dir")


if __name__ == "__main__":
    cli()
