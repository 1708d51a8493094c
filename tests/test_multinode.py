"""Two nodes on Lightning's own engine: torchrun with --nnodes=2, one process per node, both on this
machine with a localhost rendezvous (the store on a "shared file system": one directory both read).
The run trains on a memory-mapped store with a NaN fault on rank 0 only; both ranks must take the
same guard decisions (one rollback, the same loss knobs every step, the same final weights) and
train on disjoint halves of every global batch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

from lvm.data.convert import write_store
from lvm.data.store import WindowSpec
from lvm.runtime.objects import to_plain
from tests.helpers import ROOT, TINY, compose_cfg, events


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_take_the_same_decisions_on_disjoint_batches(tmp_path):
    cfg = compose_cfg("train", *TINY)
    store = write_store(to_plain(cfg.data), WindowSpec(**cfg.window), tmp_path / "store", "float32", False, 20)
    run_dir, records = tmp_path / "run", tmp_path / "records"
    records.mkdir()
    off = [f"guard.rollback.detectors.{k}=null" for k in ("val_floor", "val_drop", "below_copy_last", "orthogonal_eps")]
    overrides = [
        *(o for o in TINY if not o.startswith("data.synthetic.")),
        "+experiment=p6b_v2",
        "data=store",
        f"data.path={store}",
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=1",
        "trainer.num_nodes=2",
        "trainer.max_epochs=3",
        "trainer.enable_progress_bar=false",
        "threads=1",
        "logger.flush_every=2",
        "guard.rollback.detectors.start_step=0",
        "guard.rollback.detectors.negative_cosines=false",
        *off,
        "+fault=inject",
        "fault.nan_at_steps=[3]",
    ]
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    nodes = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={node}", "--nproc-per-node=1",
             "--master-addr=127.0.0.1", f"--master-port={port}",
             "-m", "tests.multinode_worker", str(run_dir), str(records), *overrides],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for node in (0, 1)
    ]  # fmt: skip
    outputs = [p.communicate(timeout=600)[0] for p in nodes]
    for node, (p, out) in enumerate(zip(nodes, outputs)):
        assert p.returncode == 0, f"node {node}:\n{out[-3000:]}"
    ranks = [json.loads((records / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    a, b = (r["steps"] for r in ranks)
    assert [s["step"] for s in a] == [s["step"] for s in b] and len(a) > 6
    for x, y in zip(a, b):
        assert x["knobs"] == y["knobs"], x["step"]  # the ramp and the guard's back-off, alike
        assert len(x["targets"]) == len(y["targets"]) and not set(x["targets"]) & set(y["targets"]), x["step"]
    assert ranks[0]["weights"] == ranks[1]["weights"]  # one rollback, taken by both
    rollbacks = [e for e in events(run_dir) if e["action"] == "rollback"]
    assert len(rollbacks) == 1 and rollbacks[0]["detector"] == "nonfinite"
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "completed" and results["world_size"] == 2 and results["epochs_completed"] == 3
