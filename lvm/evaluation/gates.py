"""5CAT gates and the pass rule: thresholds from the `eval` config over the figures of lvm/evaluation/fivecat.py.

A gate is a list of checks, each naming a split (or val_vs_ood), a metric key of the 5CAT summary
and a min or a max; the pass rule asks for all gates or k of them, optionally with a
non-negative offset margin on every split. A missing or NaN figure fails its check.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from lvm.evaluation.fivecat import CROSS, CROSS_METRICS, SPLIT_METRICS, SPLIT_NAMES
from lvm.runtime.errors import ConfigError


@dataclass(frozen=True)
class Check:
    split: str
    metric: str
    min: float | None = None
    max: float | None = None


@dataclass(frozen=True)
class Gate:
    name: str
    title: str
    checks: tuple[Check, ...]


@dataclass(frozen=True)
class PassRule:
    mode: str  # all | k_of_5
    k: int
    require_nonnegative_margin: bool


def parse_eval(eval_cfg: Mapping[str, Any]) -> tuple[list[Gate], PassRule]:
    """Gates and pass rule of the `eval` config; ConfigError names every bad setting."""
    problems: list[str] = []
    if not isinstance(eval_cfg.get("compile", False), bool):
        problems.append(f"eval.compile must be true or false (got {eval_cfg['compile']!r})")
    gates: list[Gate] = []
    raw_gates = eval_cfg.get("gates") or {}
    if not raw_gates:
        problems.append("eval.gates is empty: define the gates (see conf/eval/original.yaml)")
    for name, g in raw_gates.items():
        checks = []
        for i, c in enumerate(g.get("checks") or []):
            where = f"eval.gates.{name}.checks[{i}]"
            split, metric = c.get("split"), c.get("metric")
            known = CROSS_METRICS if split == CROSS else SPLIT_METRICS
            if split not in (*SPLIT_NAMES, CROSS):
                problems.append(f"{where}.split must be one of {[*SPLIT_NAMES, CROSS]} (got {split!r})")
            elif metric not in known:
                problems.append(f"{where}.metric {metric!r} is not a 5CAT metric of split {split}; use one of {list(known)}")
            lo, hi = c.get("min"), c.get("max")
            if (lo is None) == (hi is None) or not all(isinstance(v, (int, float)) for v in (lo, hi) if v is not None):
                problems.append(f"{where} needs exactly one numeric threshold, min or max (got min={lo}, max={hi})")
            checks.append(Check(split, metric, lo, hi))
        if not checks:
            problems.append(f"eval.gates.{name}.checks is empty")
        gates.append(Gate(str(name), str(g.get("title", name)), tuple(checks)))
    r = eval_cfg.get("pass_rule") or {}
    mode, k = r.get("mode"), r.get("k", len(gates))
    if mode not in ("all", "k_of_5"):
        problems.append(f"eval.pass_rule.mode must be all or k_of_5 (got {mode!r})")
    if mode == "k_of_5" and not (isinstance(k, int) and 1 <= k <= len(gates)):
        problems.append(f"eval.pass_rule.k must be an integer in [1, {len(gates)}] (got {k!r})")
    bins = eval_cfg.get("coherence_bins") or {}
    if not (isinstance(bins.get("low"), (int, float)) and isinstance(bins.get("high"), (int, float)) and bins["low"] <= bins["high"]):
        problems.append(f"eval.coherence_bins needs numbers low <= high (got {dict(bins)})")
    h = eval_cfg.get("horizon")
    if not (isinstance(h, int) and h >= 1):
        problems.append(f"eval.horizon must be an integer >= 1 (got {h!r})")
    if problems:
        raise ConfigError("invalid 5CAT configuration:\n  - " + "\n  - ".join(problems))
    return gates, PassRule(str(mode), int(k), bool(r.get("require_nonnegative_margin", False)))


def lookup(metrics: Mapping[str, Any], split: str, path: str) -> float | None:
    """Value of dotted `path` in `metrics[split]`, None when missing or NaN."""
    node: Any = metrics.get(split)
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    value = float(node)
    return None if math.isnan(value) else value


def judge(metrics: Mapping[str, Any], gates: Iterable[Gate], rule: PassRule) -> dict[str, Any]:
    """Verdict of one predictor's metrics ({val, ood, val_vs_ood}): every check, gate and the rule."""
    out: dict[str, Any] = {}
    for g in gates:
        checks = []
        for c in g.checks:
            v = lookup(metrics, c.split, c.metric)
            ok = v is not None and (c.min is None or v >= c.min) and (c.max is None or v <= c.max)
            checks.append({"split": c.split, "metric": c.metric, "min": c.min, "max": c.max, "value": v, "passed": ok})
        out[g.name] = {"title": g.title, "passed": all(c["passed"] for c in checks), "checks": checks}
    passed = sum(g["passed"] for g in out.values())
    margins = {s: lookup(metrics, s, "offset.margin") for s in SPLIT_NAMES if s in metrics}
    margin_ok = all(v is not None and v >= 0 for v in margins.values())
    needed = len(out) if rule.mode == "all" else rule.k
    ok = passed >= needed and (margin_ok or not rule.require_nonnegative_margin)
    return {
        "gates": out,
        "gates_passed": passed,
        "gates_total": len(out),
        "gates_needed": needed,
        "nonnegative_margin": margin_ok,
        "passed": ok,
    }
