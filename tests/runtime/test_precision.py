"""Precision by measurement (lvm/runtime/precision.py): the choice, its record, and bf16 runs against fp32."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from lvm.data.store import WindowSpec
from lvm.evaluation.suite import evaluate_checkpoint
from lvm.model.module import LVMModule, predict_units
from lvm.runtime.errors import ConfigError
from lvm.runtime.objects import build, to_plain
from lvm.runtime.precision import agreement, check_precision, measure
from lvm.training.build import build_data
from lvm.training.run import run
from tests.helpers import cfg_for, compose_cfg, history

QUARTER = ["+experiment=p6b_v2", "data.synthetic.articles=240", "trainer.max_epochs=2", "trainer.enable_progress_bar=false"]


def test_precision_settings_are_checked(tmp_path):
    assert [check_precision("x", v) for v in ("32", "32-true", 32, "bf16-mixed", "auto")] == ["32", "32", "32", "bf16-mixed", "auto"]
    with pytest.raises(ConfigError, match="trainer.precision must be 32, bf16-mixed or auto"):
        run(cfg_for("trainer.precision=16-mixed"), tmp_path / "a")
    with pytest.raises(ConfigError, match="eval.precision must be 32, bf16-mixed or auto"):
        run(cfg_for("eval.precision=fast"), tmp_path / "b")
    with pytest.raises(ConfigError, match="under DDP choose 32 or bf16-mixed"):  # ranks could choose apart
        run(cfg_for("trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=auto"), tmp_path / "c")


def test_auto_keeps_bf16_only_when_faster_and_in_agreement():
    cfg = compose_cfg("train")
    torch.manual_seed(0)
    model = build("model", to_plain(cfg)["model"], dim=64)
    context, target = F.normalize(torch.randn(32, 5, 64), dim=-1), F.normalize(torch.randn(32, 64), dim=-1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    never = measure(model, context, target, {"batches": 1, "min_speedup": 1e6, "min_cos": 0.0})
    assert never.chosen == "32" and "speed" in never.reason and never.fp32_ms > 0 and never.bf16_ms > 0
    always = measure(model, context, None, {"batches": 1, "min_speedup": 0.0, "min_cos": 0.0})
    assert always.chosen == "bf16-mixed"
    strict = measure(model, context, target, {"batches": 1, "min_speedup": 0.0, "min_cos": 1.5})
    assert strict.chosen == "32" and "agree" in strict.reason
    # The model itself is untouched: measured on a copy, no gradients left behind.
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    # Agreement: the lowest cosine between bf16 and fp32 unit predictions, computed independently.
    model.eval()
    with torch.no_grad():
        ref = model(context)[1]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(context)[1].float()
    expected = float(F.cosine_similarity(low, ref, dim=-1).min())
    assert agreement(model, context) == pytest.approx(expected, abs=1e-6)
    assert 0.99 < expected < 1.0  # bf16 is close, and not bit-identical
    assert strict.min_cos == pytest.approx(expected, abs=1e-5)


@pytest.mark.slow
def test_a_bf16_run_matches_fp32_within_tolerance(tmp_path):
    """On the built-in data (a quarter of it), every epoch's val cos and mini-5CAT figures of a
    bf16-mixed run lie within 0.01 of the fp32 run's, and its losses are fp32 numbers."""
    fp32 = run(compose_cfg("train", *QUARTER), tmp_path / "fp32")
    bf16 = run(compose_cfg("train", *QUARTER, "trainer.precision=bf16-mixed", "eval.precision=bf16-mixed"), tmp_path / "bf16")
    assert bf16["precision"] == {"trainer": "bf16-mixed", "eval": "bf16-mixed"} and fp32["precision"] == {"trainer": "32", "eval": "32"}
    a, b = history(tmp_path / "fp32"), history(tmp_path / "bf16")
    for key in ("val/cos", "ood/cos", "mini5cat/cos", "mini5cat/r5", "mini5cat/margin_last"):
        assert [r[key] for r in b] == pytest.approx([r[key] for r in a], abs=0.01), key
    assert a[-1]["val/cos"] != b[-1]["val/cos"]  # it really ran in bf16


def test_auto_leaves_the_run_as_it_was_and_a_resume_keeps_its_precision(tmp_path):
    plain = run(cfg_for(), tmp_path / "plain")
    auto32 = run(cfg_for("trainer.precision=auto", "eval.precision=auto", "eval.precision_auto.min_speedup=1e6"), tmp_path / "auto")
    assert auto32["precision"]["trainer"] == "32" and auto32["precision"]["trainer_measured"]["chosen"] == "32"
    assert auto32["precision"]["eval"] == "32" and auto32["precision"]["eval_measured"]["bf16_ms"] > 0
    # Measuring drew no random numbers from the run's stream: the same weights, the same figures.
    assert history(tmp_path / "auto") == history(tmp_path / "plain") and auto32["final"] == plain["final"]
    eager = ["trainer.precision=auto", "eval.precision_auto.min_speedup=0", "eval.precision_auto.min_cos=0"]
    first = run(cfg_for(*eager, "trainer.max_epochs=1"), tmp_path / "resumed")
    assert first["precision"]["trainer"] == "bf16-mixed"
    # Resumed where fp32 would be chosen now: the run keeps the precision it was trained at.
    again = run(cfg_for("trainer.precision=auto", "eval.precision_auto.min_speedup=1e6", "ckpt_path=last"), tmp_path / "resumed")
    assert again["precision"]["trainer"] == "bf16-mixed" and "trainer_measured" not in again["precision"]
    saved = json.loads((tmp_path / "resumed" / "results.json").read_text())
    assert saved["precision"]["trainer"] == "bf16-mixed"


def test_5cat_in_bf16_agrees_with_fp32(tmp_path):
    cfg = compose_cfg("train", *QUARTER, "trainer.max_epochs=1")
    results = run(cfg, tmp_path / "run")
    splits = build_data(cfg)
    plain = to_plain(cfg)
    reports = {}
    for precision in ("32", "bf16-mixed"):
        eval_cfg = {**plain["eval"], "precision": precision}
        reports[precision] = evaluate_checkpoint(
            results["last_checkpoint"],
            splits,
            plain["data"],
            WindowSpec(**plain["window"]),
            eval_cfg,
            tmp_path / precision,
            sample=300,
            seed=0,
            batch_size=256,
            progress=False,
        )
    assert reports["bf16-mixed"]["precision"] == {"model": "bf16-mixed", "measured": None}
    for split in ("val", "ood"):
        a, b = reports["32"]["results"]["model"][split], reports["bf16-mixed"]["results"]["model"][split]
        for key in ("cos", "margin_last"):
            assert b[key] == pytest.approx(a[key], abs=0.005), (split, key)
        assert b["retrieval"]["r5"] == pytest.approx(a["retrieval"]["r5"], abs=0.02)


@pytest.mark.parametrize("precision", ["32", "bf16-mixed"])
def test_predict_units_builds_no_graph_and_returns_unit_fp32(precision):
    # Called with autograd on (a caller outside inference mode), it must not record a graph.
    torch.manual_seed(0)
    module = LVMModule(to_plain(cfg_for()), dim=16).train()
    context = F.normalize(torch.randn(10, 5, 16), dim=-1)
    pred = predict_units(module, context, 4, precision)
    assert not pred.requires_grad and pred.dtype == torch.float32 and pred.shape == (10, 16)
    torch.testing.assert_close(pred.norm(dim=-1), torch.ones(10))
