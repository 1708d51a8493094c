"""5CAT gates and the pass rule (lvm/evaluation/gates.py): thresholds, k of 5, the margin rule, config errors."""

from __future__ import annotations

import math

import pytest
from omegaconf import OmegaConf

from lvm.evaluation import gates as G
from lvm.runtime.errors import ConfigError
from tests.helpers import compose_cfg, original_eval


def fake_metrics(cos_at_target=0.6, margin=0.2, r1=0.7, shuffle=-0.2, rollout=0.5, gap=0.01):
    split = {
        "offset": {"cos_at_target": cos_at_target, "margin": margin},
        "retrieval": {"r1": r1, "r5": 0.99, "mrr": 0.9},
        "ablation": {"shuffle": shuffle, "reverse": -0.2, "drop_slot": -0.1, "repeat_last": 0.0, "cross_article": 0.0},
        "rollout": {"mean": rollout},
    }
    return {"val": split, "ood": split, "val_vs_ood": {"coherence_normal_gap": gap}}


def test_gates_and_pass_rules():
    gates, rule = G.parse_eval(original_eval())
    assert [g.name for g in gates] == ["A", "B", "C", "D", "E"] and rule.mode == "all"
    v = G.judge(fake_metrics(), gates, rule)
    assert v["passed"] and v["gates_passed"] == 5
    v = G.judge(fake_metrics(r1=0.1), gates, rule)
    assert not v["passed"] and v["gates_passed"] == 4 and not v["gates"]["B"]["passed"]
    check = v["gates"]["B"]["checks"][0]
    assert check == {"split": "val", "metric": "retrieval.r1", "min": 0.6, "max": None, "value": 0.1, "passed": False}
    k3 = G.PassRule("k_of_5", 3, require_nonnegative_margin=True)
    assert G.judge(fake_metrics(r1=0.1, shuffle=0.0), gates, k3)["passed"]  # 3 of 5
    assert not G.judge(fake_metrics(r1=0.1, shuffle=0.0, rollout=0.1), gates, k3)["passed"]  # 2 of 5
    # A negative margin fails a k-of-5 verdict even with enough gates, unless allowed.
    neg = fake_metrics(margin=-0.01)
    assert G.judge(neg, gates, G.PassRule("k_of_5", 3, False))["passed"]
    assert not G.judge(neg, gates, k3)["passed"]
    # A missing split or NaN value fails its check (None in the report).
    v = G.judge({**fake_metrics(), "val": {**fake_metrics()["val"], "rollout": {"mean": math.nan}}}, gates, rule)
    assert v["gates"]["D"]["checks"][0]["value"] is None and not v["gates"]["D"]["passed"]


def test_three_of_five_preset():
    """The preset composes onto the original gates and parses to a 3-of-5 rule."""
    cfg = compose_cfg("evaluate", "eval=three_of_five")
    gates, rule = G.parse_eval(OmegaConf.to_container(cfg.eval, resolve=True))
    assert rule == G.PassRule("k_of_5", 3, True)
    assert gates == G.parse_eval(original_eval())[0]


@pytest.mark.parametrize(
    "change,setting",
    [
        ({"pass_rule": {"mode": "most"}}, "eval.pass_rule.mode"),
        ({"pass_rule": {"mode": "k_of_5", "k": 9}}, "eval.pass_rule.k"),
        ({"gates": {"A": {"checks": [{"split": "val", "metric": "offset.nope", "min": 0.5}]}}}, r"eval.gates.A.checks\[0\].metric"),
        ({"gates": {"A": {"checks": [{"split": "test", "metric": "cos", "min": 0.5}]}}}, r"eval.gates.A.checks\[0\].split"),
        ({"gates": {"A": {"checks": [{"split": "val", "metric": "cos", "min": 0.5, "max": 0.9}]}}}, "exactly one numeric threshold"),
        ({"horizon": 0}, "eval.horizon"),
        ({"coherence_bins": {"low": 0.6, "high": 0.5}}, "eval.coherence_bins"),
    ],
)
def test_bad_eval_config_named(change, setting):
    cfg = {**original_eval(), **change}
    with pytest.raises(ConfigError, match=setting):
        G.parse_eval(cfg)
