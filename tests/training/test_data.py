"""A run's batches (lvm/training/data.py), and the device-resident path (data.on_device): on the CPU,
where both paths exist, it gives the host path's batches, runs and resumes exactly."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from lvm.runtime.errors import ConfigError, LvmError
from lvm.training.build import build_data
from lvm.training.data import WindowData, keeps_data_on_device, make_loader
from lvm.training.run import run
from tests.callbacks.test_resume import EXACT, Kill, KillAtStep, assert_same_run
from tests.helpers import cfg_for, history


def test_device_batches_are_the_host_batches():
    cfg = cfg_for()
    splits = build_data(cfg)
    host = make_loader(splits["train"], 8, "global", 0, seed=3)
    data = WindowData(splits["train"], [splits["val"]], 8, 16, "global", None, 0, seed=3, on_device=True)
    device, val = data.train, data.evals[0]
    data.trainer = _Stage(training=True)
    for epoch in (0, 1):
        host.sampler.set_epoch(epoch)
        device.sampler.set_epoch(epoch)
        n = 0
        for a, b in zip(host, device, strict=True):
            assert set(b) == {"index"}  # the loader hands out indices only
            b = data.on_after_batch_transfer(b, 0)
            assert set(b) == set(a) and all(torch.equal(a[k], b[k]) for k in a)
            n += 1
        assert n == len(host)
    data.trainer = _Stage(training=False)
    first = data.on_after_batch_transfer(next(iter(val)), 0)
    assert torch.equal(first["context"], splits["val"].gather(torch.arange(16))["context"])


class _Stage:
    def __init__(self, training: bool) -> None:
        self.training = training


class _SeesBatches(L.Callback):
    """Records the keys of the batches its batch-start hooks see."""

    def __init__(self) -> None:
        self.keys: set[tuple[str, ...]] = set()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.keys.add(tuple(sorted(batch)))

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.keys.add(tuple(sorted(batch)))


def test_every_callback_sees_the_gathered_batch_on_the_device_path(tmp_path):
    """The gather is Lightning's batch-transfer hook, not a callback that must come first: a callback
    anywhere in the list sees windows, never the loader's indices."""
    probe = _SeesBatches()
    run(cfg_for("data.on_device=true", "trainer.max_epochs=1"), tmp_path / "run", extra_callbacks=[probe])
    assert probe.keys == {("context", "target", "target_row")}


def test_a_run_on_the_device_path_is_the_host_run_and_resumes_exactly(tmp_path):
    run(cfg_for(*EXACT), tmp_path / "host")
    run(cfg_for(*EXACT, "data.on_device=true"), tmp_path / "device")
    assert_same_run(tmp_path / "host", tmp_path / "device")
    with pytest.raises(Kill):
        run(cfg_for(*EXACT, "data.on_device=true"), tmp_path / "killed", extra_callbacks=[KillAtStep(10)])
    run(cfg_for(*EXACT, "data.on_device=true", "ckpt_path=last"), tmp_path / "killed")
    assert_same_run(tmp_path / "host", tmp_path / "killed")
    assert len(history(tmp_path / "killed")) == 3


def test_on_device_settings():
    cpu, gb = torch.device("cpu"), 2**30
    assert keeps_data_on_device("auto", 0.5, gb, cpu) is False  # the host path already reads the vectors in place
    assert keeps_data_on_device(True, 0.5, gb, cpu) is True and keeps_data_on_device(False, 0.5, gb, cpu) is False
    with pytest.raises(ConfigError, match="data.on_device must be true, false or auto"):
        keeps_data_on_device("yes", 0.5, gb, cpu)
    with pytest.raises(LvmError, match=r"data\.device_share must be in \(0, 1\]"):
        run(cfg_for("data.device_share=0"), "/nonexistent/never-written")


@pytest.mark.slow
def test_ddp_on_the_device_path_is_the_ddp_host_run(tmp_path):
    """Two gloo processes: each rank gathers its own shard's batches on its device; the run is the
    host path's, epoch for epoch."""
    from tests.helpers import ROOT, TINY, train_cli

    for name, on in (("host", "false"), ("device", "true")):
        proc = train_cli(
            "+experiment=p6b_v2",
            *TINY,
            "trainer=ddp",
            "trainer.accelerator=cpu",
            "trainer.devices=2",
            f"data.on_device={on}",
            f"hydra.run.dir={tmp_path / name}",
            cwd=ROOT,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert history(tmp_path / "device") == history(tmp_path / "host") and len(history(tmp_path / "host")) == 2
