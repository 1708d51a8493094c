"""Exact resume: a run killed at any point and resumed ends exactly where the uninterrupted run ends:
the same metrics, weights, checkpoint files, results.json and TensorBoard scalars.

A kill is simulated by an exception no lvm code handles (like kill -9, nothing is saved on the way
out): mid-epoch, and between an epoch's metrics row and its checkpoint.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import lightning as L
import pytest
import torch
from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader

from callbacks.resume import ExactResume
from lvm.data.convert import write_store
from lvm.data.store import WindowSpec
from lvm.runtime.objects import to_plain
from lvm.training.run import run
from tests.helpers import TINY, cfg_for, compose_cfg, events, history, steps_per_epoch

# Deterministic CPU run with dropout, a plateau scheduler that acts every epoch (patience 0), the
# guard on, and a mid-epoch last.ckpt every 4 steps: anything that a resume could replay
# differently shows up in the metrics or the weights.
EXACT = [
    "+experiment=p6b_v2",
    "trainer.deterministic=true",
    "trainer.max_epochs=3",
    "model.dropout=0.1",
    "optim.scheduler.patience=0",
    "callbacks.resume.every_n_steps=4",
    "logger.flush_every=3",
    "guard.rollback.detectors.val_floor=null",
    "guard.rollback.detectors.val_drop=null",
    "guard.rollback.detectors.below_copy_last=null",
]


class Kill(BaseException):
    """Stands for kill -9: not an Exception, so nothing in lvm or Lightning saves on its way out."""


class KillAtStep(L.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise Kill


def final_state(run_dir: Path) -> dict:
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    return {
        "weights": ckpt["state_dict"],
        "optimizer": ckpt["optimizer_states"][0]["state"],
        "scheduler": ckpt["lr_schedulers"],
        "step": ckpt["global_step"],
    }


def record(run_dir: Path) -> dict:
    """What a run says of its checkpoints: results.json's best, last and final metrics, the
    checkpoint callbacks' state in last.ckpt (what a resume starts from) and the files on disk."""
    r = json.loads((run_dir / "results.json").read_text())
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    trackers = {
        s["monitor"]: (
            Path(s["best_model_path"]).name,
            None if s["best_model_score"] is None else float(s["best_model_score"]),
            {Path(k).name: float(v) for k, v in s["best_k_models"].items()},
        )
        for key, s in ckpt["callbacks"].items()
        if key.startswith("FiniteModelCheckpoint")
    }
    return {
        "best": (Path(r["best_checkpoint"]).name, r["best_val_cos"]),
        "last": Path(r["last_checkpoint"]).name,
        "final": r["final"],
        "trackers": trackers,
        "files": sorted(p.name for p in (run_dir / "checkpoints").iterdir()),
    }


def check_record(run_dir: Path) -> None:
    """The record against metrics.jsonl: the best epoch by val cos is results.json's best, the one
    best-*.ckpt on disk and last.ckpt's tracker; `final` is the last epoch's row."""
    rows = history(run_dir)
    top = max(rows, key=lambda r: r["val/cos"])
    best = (f"best-epoch{top['epoch']:02d}.ckpt", top["val/cos"])
    rec = record(run_dir)
    assert rec["best"] == best and rec["last"] == "last.ckpt"
    assert rec["trackers"]["val/cos"] == (*best, {best[0]: best[1]})
    assert [f for f in rec["files"] if f.startswith("best-")] == [best[0]] and "last.ckpt" in rec["files"]
    assert rec["final"] == {k: v for k, v in rows[-1].items() if k.startswith(("val/", "ood/", "mini5cat/"))}


def event_files(run_dir: Path) -> list[Path]:
    """A run's TensorBoard event files in the order they were created (their name: time, host,
    pid, a per-process count), the order TensorBoard reads them in."""

    def created(p: Path) -> tuple:
        stamp, *_, pid, n = p.name.removeprefix("events.out.tfevents.").split(".")
        return int(stamp), int(pid), int(n)

    return sorted((run_dir / "tb").glob("events.out.tfevents.*"), key=created)


def tensorboard(run_dir: Path) -> dict[str, list[tuple[int, float | str | None]]]:
    """Every (step, scalar value, "nan" or None for a non-scalar) of every tag as TensorBoard shows
    the run's tb/ folder: each file's summaries in turn, a session start at step s (a resumed run's
    purge_step) hiding what earlier files wrote at step s and after. Per file, no tag is written
    twice at a step, and a resumed run writes nothing below its purge_step."""
    shown: dict[str, list[tuple[int, float | str | None]]] = {}
    for i, path in enumerate(event_files(run_dir)):
        here, purge = [], None
        for ev in LegacyEventFileLoader(str(path)).Load():  # the records as written
            if ev.WhichOneof("what") == "session_log" and ev.session_log.status == ev.session_log.START:
                purge = ev.step
                shown = {tag: [(s, v) for s, v in points if s < purge] for tag, points in shown.items()}
            elif ev.WhichOneof("what") == "summary":
                for v in ev.summary.value:
                    here.append((v.tag, ev.step))
                    value = v.simple_value if v.WhichOneof("value") == "simple_value" else None
                    shown.setdefault(v.tag, []).append((ev.step, "nan" if value is not None and math.isnan(value) else value))
        twice = [k for k, n in Counter(here).items() if n > 1]
        assert not twice, f"{path.name} writes {twice} twice"
        if i:
            assert purge is not None, f"{path.name}: a resumed run's file without a purge_step"
            below = [(t, s) for t, s in here if s < purge]
            assert not below, f"{path.name} writes {below} below its purge_step {purge}"
    for tag, points in shown.items():
        assert len({s for s, _ in points}) == len(points), f"{tag}: a step shown twice"
    return shown


def assert_same_run(a: Path, b: Path) -> None:
    assert history(a) == history(b)
    fa, fb = final_state(a), final_state(b)
    assert fa["step"] == fb["step"] and fa["scheduler"] == fb["scheduler"]
    for k, v in fa["weights"].items():
        assert torch.equal(v, fb["weights"][k]), k
    for i, state in fa["optimizer"].items():
        assert all(torch.equal(state[k], fb["optimizer"][i][k]) for k in ("exp_avg", "exp_avg_sq"))
    check_record(b)
    assert record(a) == record(b)
    assert tensorboard(a) == tensorboard(b)


@pytest.fixture(scope="module")
def whole(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("whole")
    run(cfg_for(*EXACT), d)
    return d


def test_mid_epoch_kill_resumes_exactly(whole, tmp_path):
    n = steps_per_epoch(whole)
    assert n == 6  # so epoch 1 runs steps 6..12 and writes a mid-epoch last.ckpt at step 8
    with pytest.raises(Kill):
        run(cfg_for(*EXACT), tmp_path, extra_callbacks=[KillAtStep(n + 4)])  # two steps after it
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == n + 2
    run(cfg_for(*EXACT, "ckpt_path=last"), tmp_path)
    assert_same_run(whole, tmp_path)


def test_mid_epoch_kill_resumes_exactly_from_a_store_directory_with_other_workers(whole, tmp_path):
    """The same data as a memory-mapped store directory, killed mid-epoch with no loader workers and
    resumed with two: the run equals the uninterrupted in-RAM one (the order is drawn in the main
    process and counted in windows, so the workers do not change it)."""
    cfg = cfg_for(*EXACT)
    store = write_store(to_plain(cfg.data), WindowSpec(**cfg.window), tmp_path / "store", "float32", False, cfg.data.synthetic.articles)
    on_store = [*(o for o in TINY if not o.startswith("data.synthetic.")), *EXACT, "data=store", f"data.path={store}"]
    run_dir = tmp_path / "run"
    with pytest.raises(Kill):
        run(compose_cfg("train", *on_store), run_dir, extra_callbacks=[KillAtStep(steps_per_epoch(whole) + 4)])
    run(compose_cfg("train", *on_store, "data.num_workers=2", "ckpt_path=last"), run_dir)
    assert_same_run(whole, run_dir)


def test_mid_epoch_kill_resumes_exactly_with_spike_skip(tmp_path):
    """guard.spike.drop: DroppableAdamW's state and the gradient-norm history ride in last.ckpt, so
    the resumed run takes the same skip decisions (one NaN record skipped after the resume point)."""
    spiky = [*EXACT, "guard.spike.drop=true", "guard.spike.min_history=2", "+fault=inject", "fault.nan_batch_at_steps=[11]"]
    run(cfg_for(*spiky), tmp_path / "whole")
    with pytest.raises(Kill):
        run(cfg_for(*spiky), tmp_path / "killed", extra_callbacks=[KillAtStep(10)])
    run(cfg_for(*spiky, "ckpt_path=last"), tmp_path / "killed")
    assert_same_run(tmp_path / "whole", tmp_path / "killed")
    assert [e["values"]["first_step"] for e in events(tmp_path / "killed")] == [11]


def test_kill_between_metrics_row_and_checkpoint(whole, tmp_path, monkeypatch):
    n = steps_per_epoch(whole)
    save = ExactResume.save

    def killing_save(self, trainer):
        if trainer.global_step == 2 * n:  # epoch 1's end: its row is written, its last.ckpt not yet
            raise Kill
        save(self, trainer)

    with monkeypatch.context() as m:
        m.setattr(ExactResume, "save", killing_save)
        with pytest.raises(Kill):
            run(cfg_for(*EXACT), tmp_path)
    assert [r["epoch"] for r in history(tmp_path)] == [0, 1]  # the row of the epoch whose checkpoint is lost
    run(cfg_for(*EXACT, "ckpt_path=last"), tmp_path)
    assert [r["epoch"] for r in history(tmp_path)] == [0, 1, 2]  # epoch 1 replayed, its row not doubled
    assert_same_run(whole, tmp_path)


def test_resume_at_epoch_end_continues_the_shuffle(whole, tmp_path):
    """Stopping after 2 epochs and extending to 3 equals 3 epochs (the third epoch's order is not
    epoch 0's again, which a sampler re-seeded at start-up would give). Resuming the complete run
    in between (nothing to train) changes nothing it reports."""
    run(cfg_for(*EXACT, "trainer.max_epochs=2"), tmp_path)
    check_record(tmp_path)
    two, shown = record(tmp_path), tensorboard(tmp_path)
    run(cfg_for(*EXACT, "trainer.max_epochs=2", "ckpt_path=last"), tmp_path)
    assert record(tmp_path) == two and tensorboard(tmp_path) == shown
    run(cfg_for(*EXACT, "ckpt_path=last"), tmp_path)
    assert_same_run(whole, tmp_path)


def test_auto_interval_is_timed_on_the_first_steps(tmp_path, caplog):
    """every_n_steps=auto: steps 10..60 are timed and last.ckpt is then written every ~every_minutes."""
    with caplog.at_level("INFO", logger="callbacks.resume"):
        run(
            cfg_for("trainer.max_epochs=12", "callbacks.resume.every_n_steps=auto", "callbacks.resume.every_minutes=0.002"),
            tmp_path,
        )  # 0.12 s: a few steps
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("Mid-epoch last.ckpt every"))
    n, ms = int(line.split()[3]), float(line.split("(")[1].split()[0])
    assert n >= 1 and abs(n * ms - 120) <= ms  # n steps of the timed length span 0.12 s, to within one step
