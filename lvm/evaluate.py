"""`python -m lvm.evaluate ckpt=PATH` (or `predictor=oracle|copy_last|mean_context|slot_linear`): the 5CAT suite.

Runs tests A-E (lvm/evaluation/fivecat.py) on VAL and OOD for the subject and, always, for the oracle and the
copy-last and mean-of-context baselines, so every figure sits beside what is reachable on the data.
Writes 5cat.json, 5cat.md and 5cat_offsets.png. Exit code: 0 pass, 1 fail, 2 no verdict (bad
input, configuration or checkpoint: one line on stderr).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from lvm.data.loaders import load_splits
from lvm.data.store import WindowSpec
from lvm.evaluation.fivecat_report import write_outputs
from lvm.evaluation.gates import parse_eval
from lvm.evaluation.suite import (
    PREDICTORS,
    REFERENCES,
    build_report,
    evaluate,
    evaluate_checkpoint,
    references,
)
from lvm.runtime.checkpoints import read_checkpoint
from lvm.runtime.cli import CONF_DIR, EXIT_FAIL, EXIT_OK, entry_point, run_entry_point
from lvm.runtime.errors import ConfigError
from lvm.runtime.objects import to_plain
from lvm.runtime.precision import check_precision
from lvm.runtime.threads import set_threads

log = logging.getLogger(__name__)


def _override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("~+")


def group_config(group: str, composed: DictConfig, stored: Mapping[str, Any] | None, overrides: Sequence[str]) -> dict[str, Any]:
    """The checkpoint's `group` settings with the command line's `group.*` overrides applied; the
    composed group when there is no checkpoint or the group itself was overridden (data=...)."""
    keys = [_override_key(o) for o in overrides]
    if stored is None or group in keys:
        return to_plain(composed[group])
    out = OmegaConf.create(stored[group])
    for key in keys:
        if key.startswith(group + "."):
            OmegaConf.update(out, key[len(group) + 1 :], OmegaConf.select(composed, key), force_add=True)
    return OmegaConf.to_container(out, resolve=True)  # type: ignore[return-value]


def run(cfg: DictConfig, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The CLI's work: pick data and predictor, evaluate, write outputs; returns the report."""
    if cfg.predictor not in PREDICTORS:
        raise ConfigError(f"predictor must be one of {list(PREDICTORS)} (got {cfg.predictor!r})")
    if cfg.predictor == "model" and not cfg.ckpt:
        raise ConfigError(f"predictor=model needs ckpt=PATH (or use predictor={'|'.join(REFERENCES)})")
    if cfg.predictor != "model" and cfg.ckpt:
        raise ConfigError(f"ckpt is given but predictor={cfg.predictor}; drop one of them")
    if cfg.sample is not None and (not isinstance(cfg.sample, int) or cfg.sample < 1):
        raise ConfigError(f"sample must be null (all windows) or an integer >= 1 (got {cfg.sample!r})")
    if not (isinstance(cfg.batch_size, int) and cfg.batch_size >= 1):
        raise ConfigError(f"batch_size must be an integer >= 1 (got {cfg.batch_size!r})")
    eval_cfg = to_plain(cfg.eval)
    parse_eval(eval_cfg)  # fail before loading anything
    check_precision("eval.precision", eval_cfg["precision"])
    set_threads(cfg.threads)
    ckpt = read_checkpoint(cfg.ckpt) if cfg.ckpt else None
    stored = ckpt["hyper_parameters"]["config"] if ckpt else None
    data_cfg = group_config("data", cfg, stored, overrides)
    window_cfg = group_config("window", cfg, stored, overrides)
    spec = WindowSpec(**window_cfg)
    splits = load_splits(data_cfg, spec)
    out_dir = Path(cfg.out_dir) if cfg.out_dir else None
    if cfg.ckpt:
        return evaluate_checkpoint(
            cfg.ckpt, splits, data_cfg, spec, eval_cfg, out_dir, cfg.sample, cfg.seed, cfg.batch_size, cfg.progress, ckpt
        )
    evaluation = evaluate(splits, references(splits["train"], cfg.batch_size), eval_cfg, cfg.sample, cfg.seed, cfg.batch_size, cfg.progress)
    report = build_report(cfg.predictor, evaluation, splits, data_cfg, spec, None, cfg.sample, cfg.seed)
    report["outputs"] = write_outputs(report, out_dir or Path("outputs") / "eval" / cfg.predictor)
    return report


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="evaluate")
@entry_point("lvm.evaluate")
def main(cfg: DictConfig) -> int:
    report = run(cfg, HydraConfig.get().overrides.task)
    v = report["verdict"]
    ck = report["checkpoint"]
    what = f"{ck['path']} (epoch {ck['epoch']}, step {ck['global_step']})" if ck else report["subject"]
    log.info(
        "5CAT %s: %s, %d/%d gates (%s) in %.1f s; %s",
        what,
        "PASS" if v["passed"] else "FAIL",
        v["gates_passed"],
        v["gates_total"],
        v["rule"],
        report["seconds"],
        report["outputs"]["md"],
    )
    return EXIT_OK if v["passed"] else EXIT_FAIL


def cli() -> None:
    """The console script."""
    run_entry_point(main)


if __name__ == "__main__":
    cli()
