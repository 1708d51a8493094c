"""5CAT of a predictor on the held-out splits, beside the oracle and the baselines; the report of a checkpoint and of a finished run."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from lvm.data.store import Windows, WindowSpec
from lvm.evaluation.baselines import BASELINES, fit_slot_linear, reference_predictors
from lvm.evaluation.fivecat import (
    CROSS,
    SPLIT_NAMES,
    Predictor,
    compare_splits,
    make_perturbation,
    score_windows,
    summarize,
)
from lvm.evaluation.fivecat_report import write_outputs
from lvm.evaluation.gates import judge, parse_eval
from lvm.model.module import LVMModule, accelerator_device, predict_units
from lvm.runtime.checkpoints import check_dim, read_checkpoint
from lvm.runtime.errors import LvmError
from lvm.runtime.objects import to_plain
from lvm.runtime.precision import resolve_precision

log = logging.getLogger(__name__)

log = logging.getLogger(__name__)

REFERENCES = ("oracle", *BASELINES)
PREDICTORS = ("model", *REFERENCES)


def references(train: Windows, batch_size: int) -> dict[str, Predictor]:
    """The oracle and the baselines, slot-linear fitted on `train`."""
    return reference_predictors(fit_slot_linear(train, batch_size))


def model_predictor(module: LVMModule, batch_size: int, precision: str) -> Predictor:
    """The model's unit predictions, in forwards of at most `batch_size` windows at `precision`."""
    return lambda batch: predict_units(module, batch["context"], batch_size, precision)


def eval_precision(module: LVMModule, windows: Windows, eval_cfg: Mapping[str, Any], batch_size: int) -> tuple[str, dict[str, Any] | None]:
    """eval.precision for this model, measured on `batch_size` of `windows` when auto."""
    context = windows.gather(torch.arange(min(batch_size, len(windows))))["context"].to(module.device)
    return resolve_precision("eval.precision", eval_cfg["precision"], module, context, None, eval_cfg["precision_auto"])


def load_model(ckpt: dict[str, Any], path: str | Path, dim: int, compile: bool = False) -> LVMModule:
    """The checkpoint's module in eval mode, after checking it was trained on D = `dim`; compiled
    (in place) with `compile` (eval.compile), whatever the training run chose."""
    hp = ckpt["hyper_parameters"]
    check_dim(path, hp, dim)
    module = LVMModule({**hp["config"], "compile": compile}, dim)
    module.load_state_dict(ckpt["state_dict"])
    return module.to(accelerator_device()).eval()


def find_run_dir(ckpt_path: str | Path) -> Path:
    """The run directory of a checkpoint (the parent of its checkpoints/ folder)."""
    parent = Path(ckpt_path).resolve().parent
    return parent.parent if parent.name == "checkpoints" else parent


def sample_index(windows: Windows, sample: int | None, seed: int) -> torch.Tensor:
    """All window indices, or `sample` of them drawn at random across articles (seeded)."""
    if sample is None or sample >= len(windows):
        return torch.arange(len(windows))
    return torch.from_numpy(windows.sample(sample, seed))


def evaluate(
    splits: Mapping[str, Windows],
    predictors: Mapping[str, Predictor],
    eval_cfg: Mapping[str, Any],
    sample: int | None,
    seed: int,
    batch_size: int,
    progress: bool,
) -> dict[str, Any]:
    """Metrics of every predictor on VAL and OOD (splits with windows), verdicts and timings.
    The settings' defaults are in conf/evaluate.yaml."""
    gates, rule = parse_eval(eval_cfg)
    chosen = {s: sample_index(splits[s], sample, seed) for s in SPLIT_NAMES if s in splits and len(splits[s])}
    if "val" not in chosen:
        raise LvmError("5CAT needs VAL windows; the val split is empty")
    perturb = {s: make_perturbation(splits[s], idx, seed) for s, idx in chosen.items()}
    total = len(predictors) * sum(math.ceil(len(i) / batch_size) for i in chosen.values())
    results: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    with tqdm(total=total, desc="5CAT", unit="batch", disable=not progress) as bar:
        for name, predictor in predictors.items():
            t0 = time.perf_counter()
            per: dict[str, Any] = {}
            for s, idx in chosen.items():
                bar.set_postfix_str(f"{name} {s}")
                scores = score_windows(predictor, splits[s], idx, perturb[s], eval_cfg["horizon"], batch_size, lambda: bar.update(1))
                per[s] = summarize(scores, eval_cfg["coherence_bins"])
            per[CROSS] = compare_splits(per)
            results[name] = per
            seconds[name] = time.perf_counter() - t0
    rule_text = "all gates" if rule.mode == "all" else f"at least {rule.k} of {len(gates)} gates"
    if rule.require_nonnegative_margin:
        rule_text += ", A margin >= 0 on every split"
    return {
        "results": results,
        "verdicts": {name: {**judge(m, gates, rule), "rule": rule_text} for name, m in results.items()},
        "evaluated": {s: len(i) for s, i in chosen.items()},
        "seconds": time.perf_counter() - start,
        "seconds_by_predictor": seconds,
    }


def build_report(
    subject: str,
    evaluation: dict[str, Any],
    splits: Mapping[str, Windows],
    data_cfg: Mapping[str, Any],
    spec: WindowSpec,
    checkpoint: dict[str, Any] | None,
    sample: int | None,
    seed: int,
) -> dict[str, Any]:
    store = splits["val"].store
    k = spec.target_offset
    return {
        "subject": subject,
        "verdict": evaluation["verdicts"][subject],
        "checkpoint": checkpoint,
        "data": {
            "source": data_cfg["source"],
            "path": data_cfg.get("path"),
            "dim": store.dim,
            "chunks": len(store),
            "articles": store.num_articles,
            "split": data_cfg.get("split"),
        },
        "window": {"context": spec.context, "target_offset": k, "prev_slot": spec.prev_slot},
        "splits": {
            s: {"windows": len(splits[s]), "evaluated": n, "articles": splits[s].num_articles} for s, n in evaluation["evaluated"].items()
        },
        "sample": sample,
        "seed": seed,
        "offset_convention": f"k is counted in chunks from the target: k=0 is the target, k={-k} the last context chunk",
        "rollout_convention": f"step h (1-based) is compared with the chunk at target + (h-1)*{k}",
        "seconds": evaluation["seconds"],
        "seconds_by_predictor": evaluation["seconds_by_predictor"],
        "results": evaluation["results"],
        "verdicts": evaluation["verdicts"],
    }


def evaluate_checkpoint(
    path: str | Path,
    splits: Mapping[str, Windows],
    data_cfg: Mapping[str, Any],
    spec: WindowSpec,
    eval_cfg: Mapping[str, Any],
    out_dir: Path | None,
    sample: int | None,
    seed: int,
    batch_size: int,
    progress: bool,
    ckpt: dict[str, Any] | None = None,
    slot_weights: torch.Tensor | None = None,
) -> dict[str, Any]:
    """5CAT of one checkpoint beside the oracle and baselines; writes the outputs, returns the report.
    `ckpt`: the checkpoint already read from `path`, and `slot_weights` the slot-linear baseline's
    fitted on splits["train"], if the caller has them."""
    ckpt = ckpt or read_checkpoint(path)
    module = load_model(ckpt, path, splits["val"].store.dim, eval_cfg.get("compile", False))
    if slot_weights is None:
        slot_weights = fit_slot_linear(splits["train"], batch_size)
    precision, measured = eval_precision(module, splits["val"], eval_cfg, batch_size)
    predictors = {"model": model_predictor(module, batch_size, precision), **reference_predictors(slot_weights)}
    evaluation = evaluate(splits, predictors, eval_cfg, sample, seed, batch_size, progress)
    info = {"path": str(path), "epoch": int(ckpt["epoch"]), "global_step": int(ckpt["global_step"])}
    report = build_report("model", evaluation, splits, data_cfg, spec, info, sample, seed)
    report["precision"] = {"model": precision, "measured": measured}
    out_dir = out_dir or find_run_dir(path) / "eval" / Path(path).stem
    report["outputs"] = write_outputs(report, out_dir)
    return report


def evaluate_after_fit(
    cfg: DictConfig, splits: Mapping[str, Windows], checkpoints: Mapping[str, str], run_dir: Path, slot_weights: torch.Tensor
) -> dict[str, Any]:
    """`eval.after_fit`: 5CAT of the given checkpoints ({label: path}) into <run dir>/eval/<name>/,
    beside the baselines of the run (`slot_weights`: its slot-linear fit)."""
    plain = to_plain(cfg)
    out = {}
    for label, path in checkpoints.items():
        if not path:
            continue
        report = evaluate_checkpoint(
            path,
            splits,
            plain["data"],
            WindowSpec(**plain["window"]),
            plain["eval"],
            run_dir / "eval" / Path(path).stem,
            sample=None,
            seed=cfg.seed,
            batch_size=cfg.data.eval_batch_size,  # every window: the run's own verdict
            progress=bool(cfg.trainer.get("enable_progress_bar", True)),
            slot_weights=slot_weights,
        )
        v = report["verdict"]
        out[label] = {
            **report["checkpoint"],
            "passed": v["passed"],
            "gates_passed": v["gates_passed"],
            "gates_total": v["gates_total"],
            "report": report["outputs"]["md"],
        }
        log.info(
            "5CAT of %s checkpoint (epoch %d): %s, %d/%d gates; %s",
            label,
            out[label]["epoch"],
            "PASS" if v["passed"] else "FAIL",
            v["gates_passed"],
            v["gates_total"],
            report["outputs"]["md"],
        )
    return out
