"""TensorBoardDashboard (callbacks/dashboard.py): the custom-scalars layout, one metrics.jsonl row per
validated epoch (no train/ values), rows dropped after a resumed checkpoint, and the hparams tab;
RunTensorBoard's `epoch` once per step, and a resumed fit writing nothing below its purge_step."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader
from tensorboard.plugins.custom_scalar import layout_pb2

from callbacks.dashboard import LAYOUT, RunTensorBoard, TensorBoardDashboard
from tests.helpers import TinyFit, hparams_session

VAL = [0.2, 0.5, 0.4]  # val/cos by epoch: the best is epoch 1, the last epoch 2
OOD = [0.1, 0.3, 0.25]
R5 = [0.6, 0.7, 0.8]


class Toy(TinyFit):
    """Two training batches per epoch; logs VAL/OOD/R5 of the epoch, a train/ value and a key without '/'."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        loss = self.layer(batch[0]).pow(2).mean()
        self.log("train/loss", loss, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        e = self.current_epoch
        self.log_dict({"val/cos": VAL[e], "ood/cos": OOD[e], "mini5cat/r5": R5[e], "plain": 1.0})


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_real_fit_rows_hparams_and_layout(tmp_path):
    hparams = {"loss.gamma": 0.5, "model.layers": 2, "name": "toy"}
    dash = TensorBoardDashboard(hparams, tmp_path / "metrics.jsonl")
    tb = TensorBoardLogger(tmp_path, name="tb", version="", default_hp_metric=False)
    best = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/cos", mode="max")
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=len(VAL),
        logger=tb,
        callbacks=[best, dash],
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=1,
    )
    trainer.fit(Toy())

    got = rows(tmp_path / "metrics.jsonl")  # one row per epoch (the sanity check wrote none)
    assert [(r["epoch"], r["step"]) for r in got] == [(0, 2), (1, 4), (2, 6)]
    for e, r in enumerate(got):
        assert set(r) == {"epoch", "step", "val/cos", "ood/cos", "mini5cat/r5"}  # no train/ value, no key without '/'
        assert (r["val/cos"], r["ood/cos"], r["mini5cat/r5"]) == pytest.approx((VAL[e], OOD[e], R5[e]))  # float32 logged

    values, metrics = hparams_session(tmp_path / "tb")
    assert values == hparams
    assert set(metrics) == {"hparams/val/cos", "hparams/ood/cos", "hparams/mini5cat/r5", "hparams/best_val_cos"}
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    final = {tag: acc.Scalars(tag)[-1].value for tag in metrics}
    expected = {"hparams/val/cos": VAL[-1], "hparams/ood/cos": OOD[-1], "hparams/mini5cat/r5": R5[-1], "hparams/best_val_cos": max(VAL)}
    assert final == pytest.approx(expected)

    layout = layout_pb2.Layout.FromString(acc.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0])
    written = {c.title: {ch.title: list(ch.multiline.tag) for ch in c.chart} for c in layout.category}
    assert written == {cat: {title: tags for title, (_, tags) in charts.items()} for cat, charts in LAYOUT.items()}


def fake_trainer(epoch: int, step: int, metrics: dict, zero: bool = True, sanity: bool = False, **extra) -> SimpleNamespace:
    metrics = {k: torch.tensor(v) for k, v in metrics.items()}
    return SimpleNamespace(
        current_epoch=epoch, global_step=step, callback_metrics=metrics, is_global_zero=zero, sanity_checking=sanity, loggers=[], **extra
    )


def test_an_epoch_without_its_validation_writes_no_row(tmp_path):
    dash = TensorBoardDashboard({}, tmp_path / "m.jsonl")
    dash.on_validation_end(fake_trainer(0, 0, {}, sanity=True), None)  # the sanity check
    dash.on_train_epoch_end(fake_trainer(0, 3, {"val/cos": 0.5}), None)
    assert not (tmp_path / "m.jsonl").exists()
    dash.on_validation_end(fake_trainer(0, 3, {}), None)
    dash.on_train_epoch_end(fake_trainer(0, 3, {"val/cos": 0.5, "train/mse": 2.0}), None)
    dash.on_train_epoch_end(fake_trainer(1, 5, {"val/cos": 0.25}), None)  # cut short: epoch 1 was never validated
    assert rows(tmp_path / "m.jsonl") == [{"epoch": 0, "step": 3, "val/cos": 0.5}]


def test_other_ranks_write_nothing(tmp_path):
    dash = TensorBoardDashboard({}, tmp_path / "m.jsonl")
    dash.on_validation_end(fake_trainer(0, 3, {}, zero=False), None)
    dash.on_train_epoch_end(fake_trainer(0, 3, {"val/cos": 0.5}, zero=False), None)
    dash.on_fit_end(fake_trainer(0, 3, {"val/cos": 0.5}, zero=False), None)
    assert not (tmp_path / "m.jsonl").exists()


def test_resume_drops_the_rows_after_its_checkpoint(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps({"epoch": e, "step": 4 * (e + 1), "val/cos": e / 10}) + "\n" for e in range(4)))
    dash = TensorBoardDashboard({}, path)
    dash.on_train_start(fake_trainer(2, 8, {}), None)  # resumed from the checkpoint at step 8 (after epoch 1)
    assert [r["step"] for r in rows(path)] == [4, 8]
    dash.on_train_start(fake_trainer(2, 8, {}, zero=False), None)
    dash.on_train_start(fake_trainer(0, 0, {}, zero=False), None)  # another rank never rewrites it
    assert [r["step"] for r in rows(path)] == [4, 8]


def test_fit_end_without_tensorboard_or_checkpoint_callback(tmp_path):
    dash = TensorBoardDashboard({"a": 1}, tmp_path / "m.jsonl")
    dash.on_fit_start(fake_trainer(0, 0, {}), None)
    dash.on_fit_end(fake_trainer(0, 3, {"val/cos": 0.5}, checkpoint_callback=None), None)  # nothing to log to: no error
    assert not (tmp_path / "m.jsonl").exists()


def fit_toy(root: Path, logger: TensorBoardLogger, epochs: int, ckpt_path: Path | None = None) -> L.Trainer:
    """Toy's fit (2 steps an epoch) with the dashboard, into `root`; its end saved as root/end.ckpt."""
    best = ModelCheckpoint(dirpath=root / "ckpt", monitor="val/cos", mode="max")
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        logger=logger,
        callbacks=[best, TensorBoardDashboard({"name": "toy"}, root / "metrics.jsonl")],
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(Toy(), ckpt_path=ckpt_path)
    trainer.save_checkpoint(root / "end.ckpt")
    return trainer


def written(tb_dir: Path) -> list[dict[tuple[str, int], float]]:
    """Each event file's summaries, {(tag, step): simple value}, the files oldest first (no tag
    twice at a step in one file)."""
    out = []
    for f in sorted(tb_dir.glob("events.out.tfevents.*"), key=lambda p: int(p.name.split(".")[-1])):  # one process: its count
        values = [((v.tag, ev.step), v.simple_value) for ev in LegacyEventFileLoader(str(f)).Load() for v in ev.summary.value]
        twice = [k for k, n in Counter(k for k, _ in values).items() if n > 1]
        assert not twice, f"{f.name} writes {twice} twice"
        out.append(dict(values))
    return out


def test_lightning_writes_epoch_twice_at_an_epoch_end_run_tensorboard_once(tmp_path):
    """Toy logs a train/ value per epoch: Lightning's epoch-end log call adds `epoch` at the step
    of the validation's call, which added it too."""
    plain = tmp_path / "plain"
    fit_toy(plain, TensorBoardLogger(plain, name="tb", version="", default_hp_metric=False), len(VAL))
    files = sorted((plain / "tb").glob("events.out.tfevents.*"))
    steps = [ev.step for ev in LegacyEventFileLoader(str(files[0])).Load() for v in ev.summary.value if v.tag == "epoch"]
    assert steps == [1, 1, 3, 3, 5, 5]
    ours = tmp_path / "ours"
    fit_toy(ours, RunTensorBoard(ours, name="tb", version="", default_hp_metric=False), len(VAL))
    [tags] = written(ours / "tb")
    assert [(s, v) for (tag, s), v in tags.items() if tag == "epoch"] == [(1, 0.0), (3, 1.0), (5, 2.0)]


def test_resumed_fits_write_nothing_below_their_purge_step(tmp_path):
    """Two epochs, the same two resumed (nothing to train), then a third: the later fits write
    neither the layout again nor anything below their purge_step (the first fit's last step,
    where it wrote the hparams); the fit with nothing to train takes its final values from
    metrics.jsonl's last row; the hparams tab shows the last fit's."""

    def tb(purge: int | None = None) -> RunTensorBoard:
        return RunTensorBoard(tmp_path, name="tb", version="", default_hp_metric=False, purge_step=purge)

    fit_toy(tmp_path, tb(), 2)
    fit_toy(tmp_path, tb(purge=4), 2, ckpt_path=tmp_path / "end.ckpt")
    fit_toy(tmp_path, tb(purge=4), 3, ckpt_path=tmp_path / "end.ckpt")
    first, again, third = written(tmp_path / "tb")
    assert ("custom_scalars__config__", 0) in first and {s for tag, s in first if tag.startswith("hparams/")} == {4}
    assert all(s >= 4 and tag != "custom_scalars__config__" for tags in (again, third) for tag, s in tags)
    final = {"hparams/val/cos": VAL[1], "hparams/ood/cos": OOD[1], "hparams/mini5cat/r5": R5[1], "hparams/best_val_cos": VAL[1]}
    assert {tag: v for (tag, s), v in again.items() if tag.startswith("hparams/")} == pytest.approx(final)
    assert {s for tag, s in third if tag.startswith(("hparams/", "_hparams_/"))} == {6}
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("hparams/val/cos")] == [(6, pytest.approx(VAL[2]))]
    assert len(acc.Tensors("custom_scalars__config__")) == 1 and hparams_session(tmp_path / "tb")[0] == {"name": "toy"}


def test_a_log_call_is_one_event_that_tensorboard_reads_scalar_by_scalar(tmp_path):
    logger = RunTensorBoard(tmp_path, name="tb", version="", default_hp_metric=False)
    logger.log_metrics({"train/a": 1.5, "train/b": torch.tensor(-2.0)}, step=3)
    logger.log_metrics({"train/a": 0.25}, step=4)
    logger.finalize("success")
    [f] = (tmp_path / "tb").glob("events.out.tfevents.*")
    events = [(ev.step, [v.tag for v in ev.summary.value]) for ev in LegacyEventFileLoader(str(f)).Load() if ev.summary.value]
    assert events == [(3, ["train/a", "train/b"]), (4, ["train/a"])]
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("train/a")] == [(3, 1.5), (4, 0.25)]
    assert [(e.step, e.value) for e in acc.Scalars("train/b")] == [(3, -2.0)]
