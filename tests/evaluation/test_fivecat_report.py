"""The 5CAT report (lvm/evaluation/fivecat_report.py): the header, gate, verdict, per-split and VAL vs
OOD tables of 5cat.md for a hand-made report, and 5cat.json (strict JSON) beside the PNG."""

from __future__ import annotations

import json
import math

import pytest

from lvm.evaluation.fivecat import ABLATIONS
from lvm.evaluation.fivecat_report import markdown, write_outputs

LABELS = ["non-finite predictions", "cos to target", "margin vs ctx[-1]", "A peak k"]
LABELS += ["A cos at k=-3", "A cos at k=-2", "A cos at k=-1", "A cos at k=0 (target)", "A cos at k=+1", "A cos at k=+2", "A cos at k=+3"]
LABELS += ["A margin", "B R@1", "B R@5", "B MRR", *(f"C {a}" for a in ("shuffle", "reverse", "drop_slot", "repeat_last", "cross_article"))]
LABELS += ["D rollout mean", "E low bin cos (windows)", "E normal bin cos (windows)", "E high bin cos (windows)", "D rollout per step"]


def split_result(b: float, peak: int) -> dict:
    """One predictor's figures on one split, all derived from `b`."""
    return {
        "nonfinite": 0.0,
        "cos": b,
        "margin_last": b - 0.5,
        "offset": {"peak_k": peak, "cos": [b - 0.3, b - 0.2, b - 0.1, b, b - 0.05, b - 0.15, b - 0.25], "margin": b - 0.4, "windows": 8},
        "retrieval": {"r1": b / 2, "r5": b, "mrr": 0.75 * b, "windows": 6},
        "ablation": {a: -0.1 * (i + 1) for i, a in enumerate(ABLATIONS)},
        "rollout": {"mean": b - 0.1, "cos": [b, b - 0.1, None], "windows": 7},
        "coherence": {"low": {"cos": None, "windows": 0}, "normal": {"cos": b, "windows": 5}, "high": {"cos": b + 0.1, "windows": 2}},
    }


def check(split, metric, value, passed, lo=None, hi=None):
    return {"split": split, "metric": metric, "min": lo, "max": hi, "value": value, "passed": passed}


def verdict(values: tuple, passed: tuple) -> dict:
    gates = {
        "A": {"title": "offset sweep", "passed": passed[0], "checks": [check("val", "offset.peak_k", values[0], True, lo=0)]},
        "B": {
            "title": "retrieval",
            "passed": passed[1],
            "checks": [check("val", "retrieval.r5", values[1], passed[1], lo=0.5), check("ood", "cos", values[2], passed[1], hi=0.9)],
        },
    }
    n = sum(passed)
    return {"gates": gates, "gates_passed": n, "gates_total": 2, "gates_needed": 2, "nonnegative_margin": True, "passed": n == 2}


def report() -> dict:
    model = {"val": split_result(0.8, 0), "ood": split_result(0.7, 0), "val_vs_ood": {"coherence_normal_gap": 0.1}}
    copy = {"val": split_result(0.6, -2), "ood": split_result(0.5, -2), "val_vs_ood": {"coherence_normal_gap": math.nan}}
    copy["ood"]["cos"] = math.nan
    return {
        "subject": "model",
        "verdict": {**verdict((0.0, 0.8, 0.7), (True, True)), "rule": "all gates"},
        "checkpoint": {"path": "/runs/a/checkpoints/last.ckpt", "epoch": 3, "global_step": 40},
        "precision": {"model": "bf16-mixed", "measured": {"reason": "1.3x faster"}},
        "data": {"source": "synthetic", "chunks": 100, "articles": 10, "dim": 16},
        "window": {"context": 5, "target_offset": 2, "prev_slot": -2},
        "splits": {"val": {"windows": 10, "evaluated": 8, "articles": 3}, "ood": {"windows": 5, "evaluated": 5, "articles": 2}},
        "offset_convention": "k from the target",
        "rollout_convention": "step h",
        "seconds": 3.21,
        "seconds_by_predictor": {"model": 1.26, "copy_last": 0.5},
        "results": {"model": model, "copy_last": copy},
        "verdicts": {"model": verdict((0.0, 0.8, 0.7), (True, True)), "copy_last": verdict((-2.0, 0.6, None), (False, False))},
    }


def section(md: str, heading: str) -> list[str]:
    """The lines of the section `## heading` (up to the next one)."""
    return md.split(f"## {heading}\n")[1].split("\n## ")[0].splitlines()


def cells(lines: list[str]) -> dict[str, list[str]]:
    """First cell -> the other cells, of every table row below the header."""
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines if line.startswith("| ") and not line.startswith("| ---")][1:]
    return {r[0]: r[1:] for r in rows}


def test_header():
    head = markdown(report()).split("## ")[0].splitlines()
    assert head[:2] == ["# 5CAT: PASS (model)", ""]
    assert head[2:9] == [
        "- checkpoint: `/runs/a/checkpoints/last.ckpt` (epoch 3, 0-based; global step 40)",
        "- model forwards: precision bf16-mixed (eval.precision=auto: 1.3x faster)",
        "- data: synthetic (100 chunks, 10 articles, D=16); window: context 5, target_offset 2, prev_slot -2",
        "- splits: val 8 of 10 windows (3 articles), ood 5 of 5 windows (2 articles)",
        "- offsets: k from the target",
        "- rollout: step h",
        "- pass rule: all gates; gates passed 2/2 (needed 2), non-negative margin: yes",
    ]
    assert head[9] == "- time: 3.2 s (model 1.3 s, copy-last 0.5 s)"


def test_header_without_checkpoint_or_measured_precision():
    r = report() | {"checkpoint": None, "precision": {"model": "32", "measured": None}}
    r["verdict"] = {**r["verdict"], "passed": False}
    head = markdown(r).splitlines()
    assert head[0] == "# 5CAT: FAIL (model)" and head[2] == "- model forwards: precision 32"
    assert not any(line.startswith("- checkpoint") for line in head)


def test_gate_and_verdict_tables():
    lines = section(markdown(report()), "Gates")
    assert lines[1:3] == ["| gate | split | metric | threshold | model | copy-last | pass |", "|" + " --- |" * 7]
    assert lines[3:6] == [
        "| A offset sweep | val | offset.peak_k | >= 0 | 0.000 | -2.000 | yes |",
        "| B retrieval | val | retrieval.r5 | >= 0.5 | 0.800 | 0.600 | yes |",
        "|  | ood | cos | <= 0.9 | 0.700 | n/a | yes |",
    ]
    assert cells(lines[7:]) == {"gates passed": ["2/2", "0/2"], "pass": ["yes", "no"]}


@pytest.mark.parametrize(("split", "b", "c"), [("VAL", 0.8, 0.6), ("OOD", 0.7, 0.5)])
def test_split_tables(split, b, c):
    lines = section(markdown(report()), split)
    table = cells(lines)
    assert list(table) == LABELS and all(len(v) == 2 for v in table.values())
    assert table["cos to target"] == (["0.800", "0.600"] if split == "VAL" else ["0.700", "n/a"])  # NaN is n/a
    assert table["A peak k"] == ["0", "-2"]
    assert table["A cos at k=0 (target)"] == [f"{b:.3f}", f"{c:.3f}"] and table["A cos at k=-3"] == [f"{b - 0.3:.3f}", f"{c - 0.3:.3f}"]
    assert table["A cos at k=+1"] == [f"{b - 0.05:.3f}", f"{c - 0.05:.3f}"]
    assert table["B MRR"] == [f"{0.75 * b:.3f}", f"{0.75 * c:.3f}"] and table["C cross_article"] == ["-0.500", "-0.500"]
    assert table["E low bin cos (windows)"] == ["n/a (0)", "n/a (0)"]
    assert table["E high bin cos (windows)"] == [f"{b + 0.1:.3f} (2)", f"{c + 0.1:.3f} (2)"]
    assert table["D rollout per step"] == [f"{b:.2f} {b - 0.1:.2f} n/a", f"{c:.2f} {c - 0.1:.2f} n/a"]
    assert lines[-2:] == ["", "Test windows: A 8, B 6, D 7."]


def test_val_vs_ood_table_ends_the_report():
    md = markdown(report())
    assert md.endswith(
        "## VAL vs OOD\n\n| metric | model | copy-last |\n| --- | --- | --- |\n| E normal-bin cos, abs(VAL - OOD) | 0.100 | n/a |\n"
    )


def test_write_outputs(tmp_path):
    r = report()
    paths = write_outputs(r, tmp_path / "out")
    assert paths == {k: str(tmp_path / "out" / n) for k, n in (("json", "5cat.json"), ("md", "5cat.md"), ("png", "5cat_offsets.png"))}
    loaded = json.loads((tmp_path / "out" / "5cat.json").read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON {c}"))
    assert loaded["results"]["copy_last"]["ood"]["cos"] is None and loaded["results"]["model"]["ood"]["cos"] == 0.7
    assert loaded["results"]["copy_last"]["val_vs_ood"]["coherence_normal_gap"] is None
    assert loaded["verdicts"]["copy_last"]["gates"]["B"]["checks"][1]["value"] is None
    assert (tmp_path / "out" / "5cat.md").read_text() == markdown(r)
    assert (tmp_path / "out" / "5cat_offsets.png").read_bytes()[:4] == b"\x89PNG"
