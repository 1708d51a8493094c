"""`python -m lvm.evaluate` end to end: reference predictors, a trained checkpoint, an article-store
NPZ, eval.after_fit, outputs and exit codes."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from lvm import evaluate as E
from lvm.data.loaders import load_splits
from lvm.data.store import WindowSpec
from lvm.data.synthetic import synthetic_corpus
from lvm.evaluation import suite as S
from lvm.evaluation.fivecat_report import write_outputs
from lvm.runtime.checkpoints import FORMAT
from lvm.runtime.errors import ConfigError, LvmError
from lvm.runtime.objects import to_plain
from lvm.training.run import run as train_run
from tests.helpers import (
    CONSTANT,
    DEGENERATE,
    TINY,
    cfg_for,
    compose_cfg,
    numpy_r1_of_constant,
    run_module,
)

# Articles long enough for a P6 rollout (target + 4 * 2 must exist: 15 chunks from the context start).
TINY_DATA = [o for o in TINY if o.startswith("data.")] + ["data.synthetic.max_chunks=20"]


def eval_cfg(*overrides: str):
    return compose_cfg("evaluate", *overrides, "progress=false")


def cli(*args: str) -> subprocess.CompletedProcess:
    return run_module("lvm.evaluate", *args, "progress=false", "threads=1", timeout=300)


def strict_load(path: Path) -> dict:
    return json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"{path}: non-JSON constant {c}"))


def test_cli_oracle_outputs_and_exit_codes(tmp_path):
    proc = cli("predictor=oracle", *TINY_DATA, f"out_dir={tmp_path / 'o'}")
    # The oracle ignores its context, so the ablation gate C fails and "all gates" fails: exit 1.
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "torch threads: 1 (threads=1" in proc.stdout + proc.stderr  # lvm.evaluate sets its threads (it did not)
    report = strict_load(tmp_path / "o" / "5cat.json")
    assert report["subject"] == "oracle" and report["checkpoint"] is None
    assert set(report["results"]) == {"oracle", "copy_last", "mean_context", "slot_linear"}
    gates = report["verdicts"]["oracle"]["gates"]
    assert all(gates[g]["passed"] for g in "ABD") and not gates["C"]["passed"]
    val = report["results"]["oracle"]["val"]
    assert val["offset"]["peak_k"] == 0 and val["retrieval"]["r1"] == 1.0 and val["rollout"]["mean"] == pytest.approx(1.0)
    assert report["results"]["copy_last"]["ood"]["offset"]["peak_k"] == -2
    assert report["splits"]["val"]["evaluated"] == report["splits"]["val"]["windows"] > 0
    assert "k=0 is the target" in report["offset_convention"] and report["seconds"] > 0
    assert "| A offset sweep |" in (tmp_path / "o" / "5cat.md").read_text()
    assert (tmp_path / "o" / "5cat_offsets.png").read_bytes()[:4] == b"\x89PNG"
    # 3 of 5 with a non-negative margin: the oracle passes, exit 0.
    assert cli("predictor=oracle", "eval=three_of_five", *TINY_DATA, f"out_dir={tmp_path / 'p'}").returncode == 0


@pytest.mark.slow  # fast: tests/runtime/test_cli.py (bad input) and test_checkpoints.py (unreadable checkpoints)
def test_cli_without_a_verdict_is_one_line_and_exit_2(tmp_path):
    for args in (["predictor=model"], ["predictor=oracle", "no_such_key=1"]):
        proc = cli(*args, *TINY_DATA, f"out_dir={tmp_path / 'x'}")
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "needs ckpt=PATH" in cli("predictor=model").stderr
    # A checkpoint holding a few bytes of text (a bare KeyError traceback before): one line naming it.
    (tmp_path / "hello.ckpt").write_text("hello")
    proc = cli(f"ckpt={tmp_path / 'hello.ckpt'}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"checkpoint {tmp_path / 'hello.ckpt'}: cannot be loaded" in proc.stderr


def test_checkpoint_after_fit_and_cli(tmp_path):
    results = train_run(cfg_for("+experiment=p6b_v2", "eval.after_fit=true"), tmp_path)
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["5cat"] == results["5cat"]
    best, last = results["5cat"]["best"], results["5cat"]["last"]
    assert best["path"] == results["best_checkpoint"] and last["path"] == results["last_checkpoint"]
    assert last["epoch"] == 1 and best["epoch"] == torch.load(best["path"], weights_only=True)["epoch"]
    for entry in (best, last):
        report = strict_load(Path(entry["report"]).with_suffix(".json"))
        assert report["checkpoint"]["epoch"] == entry["epoch"] and report["checkpoint"]["global_step"] > 0
        assert report["verdict"]["passed"] == entry["passed"]
        assert set(report["results"]) == {"model", "oracle", "copy_last", "mean_context", "slot_linear"}
    # The CLI reads the checkpoint's own data settings (D=16 tiny data, not the default D=64),
    # writes into <run dir>/eval/<name>/ and exits with the verdict.
    proc = cli(f"ckpt={last['path']}", "sample=30")
    assert proc.returncode in (0, 1), proc.stderr[-2000:]
    report = strict_load(tmp_path / "eval" / "last" / "5cat.json")
    assert report["data"]["dim"] == 16 and report["splits"]["val"]["evaluated"] == 30
    assert proc.returncode == (0 if report["verdict"]["passed"] else 1)
    assert report["checkpoint"] == {"path": last["path"], "epoch": 1, "global_step": last["global_step"]}
    # A data override on top of the checkpoint's settings; a mismatched D is named.
    cfg = eval_cfg(f"ckpt={last['path']}", "data.synthetic.dim=24", f"out_dir={tmp_path / 'bad'}")
    with pytest.raises(LvmError, match="D=16 vectors, the data has D=24"):
        E.run(cfg, ["data.synthetic.dim=24"])
    # A checkpoint of an earlier format (no lvm_format stamp) is refused in one line, not guessed at.
    old = torch.load(last["path"], weights_only=True)
    del old["lvm_format"]
    torch.save(old, tmp_path / "old.ckpt")
    with pytest.raises(
        LvmError, match=rf"old\.ckpt: written by an lvm of another checkpoint format \(lvm_format=None, this lvm reads {FORMAT}\)"
    ):
        E.run(eval_cfg(f"ckpt={tmp_path / 'old.ckpt'}", "sample=10", f"out_dir={tmp_path / 'old'}"), [])


@pytest.mark.parametrize("window,last_k", [("p6", -2), ("next", -1)])
def test_store_npz_and_window_formats(tmp_path, window, last_k):
    vectors, articles, chunks = synthetic_corpus(
        dim=12, articles=40, min_chunks=9, max_chunks=16, topic_weight=1.0, drift_weight=1.0, drift_step=0.5, noise=1.2, seed=3
    )
    path = tmp_path / "store.npz"
    np.savez(path, vectors=vectors, article_indices=articles + 100, chunk_indices=chunks)
    overrides = [
        "predictor=copy_last",
        "data=store_npz",
        f"data.path={path}",
        f"window={window}",
        "data.split.val=0.2",
        "data.split.ood=0.2",
        "sample=20",
        f"out_dir={tmp_path / 'out'}",
    ]
    report = E.run(eval_cfg(*overrides), overrides)
    assert report["data"]["source"] == "store_npz" and report["data"]["dim"] == 12
    assert report["window"]["target_offset"] == -last_k
    for split in ("val", "ood"):
        assert report["splits"][split]["evaluated"] == 20
        assert report["results"]["copy_last"][split]["offset"]["peak_k"] == last_k
        assert report["results"]["oracle"][split]["offset"]["peak_k"] == 0
    assert strict_load(tmp_path / "out" / "5cat.json")["results"]["oracle"]["val"]["retrieval"]["mrr"] == 1.0


def test_sample_is_seeded_across_articles(tmp_path):
    cfg = eval_cfg("predictor=oracle", *TINY_DATA)
    splits = load_splits(to_plain(cfg.data), WindowSpec(**cfg.window))
    idx = S.sample_index(splits["val"], 12, seed=0)
    arts = splits["val"].article_ids()
    assert len(idx) == 12 and len(np.unique(arts[idx.numpy()])) == min(12, len(np.unique(arts)))
    assert torch.equal(idx, S.sample_index(splits["val"], 12, seed=0))
    assert not torch.equal(idx, S.sample_index(splits["val"], 12, seed=1))
    assert len(S.sample_index(splits["val"], None, 0)) == len(splits["val"])


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["predictor=oracle", "ckpt=x.ckpt"], "ckpt is given but predictor=oracle"),
        (["predictor=guess"], "predictor must be one of"),
        (["predictor=oracle", "sample=0"], "sample must be"),
        (["predictor=oracle", "eval.pass_rule.mode=most"], "eval.pass_rule.mode"),
        (["predictor=oracle", "threads=0"], "threads must be auto or an integer"),
        (["predictor=oracle", "eval.compile=yes"], "eval.compile must be true or false"),
    ],
)
def test_bad_settings_named(overrides, message):
    with pytest.raises(ConfigError, match=message):
        E.run(eval_cfg(*overrides), overrides)


def test_group_config_prefers_checkpoint_settings():
    cfg = eval_cfg("window.target_offset=3")
    stored = {"window": {"context": 5, "target_offset": 1, "prev_slot": -1}, "data": {"source": "store_npz", "path": "a.npz"}}
    assert E.group_config("window", cfg, stored, ["window.target_offset=3"]) == {"context": 5, "target_offset": 3, "prev_slot": -1}
    assert E.group_config("data", cfg, stored, []) == stored["data"]
    assert E.group_config("window", eval_cfg("window=next"), stored, ["window=next"])["target_offset"] == 1
    assert E.group_config("window", cfg, None, [])["target_offset"] == 3


def test_nan_zero_and_constant_models_fail_and_are_reported(tmp_path):
    """Predictors as functions through the whole 5CAT: NaN, zero and constant models get no perfect
    retrieval and FAIL; the report shows the non-finite share and writes NaN as null."""
    cfg = eval_cfg("predictor=oracle", *TINY_DATA)
    data_cfg, spec = to_plain(cfg.data), WindowSpec(**cfg.window)
    splits = load_splits(data_cfg, spec)
    predictors = {
        "model": DEGENERATE["nan"],
        "zero": DEGENERATE["zero"],
        "constant": DEGENERATE["constant"],
        **S.references(splits["train"], 64),
    }
    evaluation = S.evaluate(splits, predictors, to_plain(cfg.eval), cfg.sample, cfg.seed, cfg.batch_size, progress=False)
    res, verdicts = evaluation["results"], evaluation["verdicts"]
    for split in ("val", "ood"):
        assert res["oracle"][split]["retrieval"]["r1"] == 1.0 and res["oracle"][split]["nonfinite"] == 0.0
        for name in ("model", "zero"):  # worst rank; every article has >= 8 chunks
            assert res[name][split]["retrieval"]["r1"] == res[name][split]["retrieval"]["r5"] == 0.0
        # Chance level (numpy), far below the oracle's 1.0.
        chance = numpy_r1_of_constant(splits[split].store, splits[split], CONSTANT.numpy())
        assert res["constant"][split]["retrieval"]["r1"] == pytest.approx(chance) and chance < 0.2
        assert res["model"][split]["nonfinite"] == 1.0 and res["constant"][split]["nonfinite"] == 0.0
    for name in ("model", "zero", "constant"):
        assert not verdicts[name]["passed"] and not verdicts[name]["gates"]["B"]["passed"]
    report = S.build_report("model", evaluation, splits, data_cfg, spec, None, None, 0)
    outputs = write_outputs(report, tmp_path)
    saved = strict_load(Path(outputs["json"]))
    assert saved["results"]["model"]["val"]["cos"] is None and saved["results"]["model"]["val"]["nonfinite"] == 1.0
    md = Path(outputs["md"]).read_text()
    assert md.startswith("# 5CAT: FAIL (model)")
    assert "| non-finite predictions | 1.000 | 0.000 | 0.000 | 0.000 | 0.000 | 0.000 |" in md


@pytest.mark.slow
def test_a_compiled_model_scores_as_the_eager_one(tmp_path):
    """eval.compile compiles the checkpoint's model in place (its keys load unchanged) and predicts
    as the eager model does, to float rounding."""
    from lvm.model.module import predict_units
    from lvm.runtime.checkpoints import read_checkpoint
    from lvm.training.build import build_data

    cfg = cfg_for("+experiment=p6b_v2", "trainer.max_epochs=1")
    results = train_run(cfg, tmp_path)
    ckpt = read_checkpoint(results["last_checkpoint"])
    val = build_data(cfg)["val"]
    context = val.gather(torch.arange(min(64, len(val))))["context"]
    eager = S.load_model(ckpt, results["last_checkpoint"], val.store.dim)
    compiled = S.load_model(ckpt, results["last_checkpoint"], val.store.dim, compile=True)
    assert eager.model._compiled_call_impl is None and compiled.model._compiled_call_impl is not None
    a, b = (predict_units(m, context, 32, "32") for m in (eager, compiled))
    assert torch.allclose(a, b, atol=1e-5)
