"""`python -m lvm.sweep_report <sweep dir> [--metric M]`: regenerate a sweep's summary files."""

from __future__ import annotations

import argparse
import logging

from lvm.errors import LvmError
from lvm.sweep import METRICS, write_summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("sweep_dir", help="a Hydra sweep directory (hydra.sweep.dir)")
    parser.add_argument("--metric", default="best_val_cos", choices=METRICS, help="metric of the heatmap")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        paths = write_summary(args.sweep_dir, args.metric)
    except LvmError as e:
        raise SystemExit(f"lvm: {e}") from None
    for path in paths.values():
        print(path)


if __name__ == "__main__":
    main()
