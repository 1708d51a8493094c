"""One node's process of tests/test_multinode.py, started by torchrun: a TINY run through
`lvm.training.run.run` with a callback that records, on this rank, what each step trained on
(the target rows, as bytes) and what the guard left in force (the loss knobs, the weights)."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import lightning as L
import torch

from lvm.model.module import KNOBS
from lvm.training.run import run
from tests.helpers import compose_cfg


class RecordSteps(L.Callback):
    def __init__(self, path: Path) -> None:
        self.path = path
        self.steps: list[dict] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        targets = [hashlib.sha1(row.numpy().tobytes()).hexdigest() for row in batch["target"]]
        self.steps.append({"step": trainer.global_step, "targets": targets, "knobs": {n: getattr(pl_module.knobs, n) for n in KNOBS}})

    def on_train_end(self, trainer, pl_module):
        weights = torch.cat([p.detach().flatten() for p in pl_module.parameters()])
        record = {"rank": trainer.global_rank, "world": trainer.world_size, "steps": self.steps, "weights": weights.tolist()}
        self.path.write_text(json.dumps(record))


if __name__ == "__main__":
    run_dir, record_dir, *overrides = sys.argv[1:]
    rank = int(os.environ["RANK"])
    run(compose_cfg("train", *overrides), Path(run_dir), extra_callbacks=[RecordSteps(Path(record_dir) / f"rank{rank}.json")])
