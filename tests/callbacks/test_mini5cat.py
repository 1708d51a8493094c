"""Mini-5CAT sampling and health figures, including a collapsed predictor."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from callbacks.mini5cat import Mini5CAT, health_metrics
from lvm.data.store import ArticleStore
from lvm.data.synthetic import synthetic_corpus
from tests.helpers import P6


class Oracle(torch.nn.Module):
    """Stands in for the LightningModule: returns a fixed prediction per context row."""

    def __init__(self, batch, fn):
        super().__init__()
        self.batch, self.fn = batch, fn
        self.device = torch.device("cpu")

    def forward(self, ctx):
        idx = [int(torch.nonzero((self.batch["context"] == c).all(-1).all(-1))[0]) for c in ctx]
        pred = self.fn(self.batch)[idx]
        return pred, pred


COPY_LAST_WEIGHTS = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0], dtype=torch.float64)


def test_collapse_is_visible_while_six_bank_is_perfect():
    corpus = synthetic_corpus(
        dim=32, articles=12, min_chunks=10, max_chunks=20, topic_weight=1.0, drift_weight=1.0, drift_step=0.5, noise=1.2, seed=0
    )
    store = ArticleStore(*corpus, source="synthetic")
    windows = store.windows(P6)
    cat = Mini5CAT(windows, n_windows=40, seed=0, prev_slot=-2, batch_size=16, slot_weights=COPY_LAST_WEIGHTS, precision="32")
    prev = cat.batch["context"][:, -2]
    collapsed = cat.predict(Oracle(cat.batch, lambda b: -b["context"][:, -2]))
    assert torch.allclose(collapsed, -prev)
    m = health_metrics(collapsed, cat.batch, windows, -2)
    oracle = health_metrics(cat.predict(Oracle(cat.batch, lambda b: b["target"])), cat.batch, windows, -2)
    assert oracle["cos"] > 0.999 and oracle["r1"] == 1.0 and oracle["mrr"] == 1.0
    assert m["r5_bank6"] == 1.0  # the original's in-training R@5 says "perfect"
    assert m["cos"] < cat.baselines["copy_last"]["cos"] - 0.1
    assert cat.baselines["slot_linear"] == pytest.approx(cat.baselines["copy_last"])  # one-hot weights on ctx[-1]
    assert m["margin_prev"] > 0.5  # the "good" gap of two negatives
    assert m["r1"] < oracle["r1"]


class Recorder(Oracle):
    """An `Oracle` that also records what the callback logs, as a LightningModule would."""

    def log_dict(self, metrics, **kwargs):
        self.logged = metrics


@pytest.mark.parametrize("fill", [float("nan"), 0.0], ids=["nan", "zero"])
def test_nan_and_zero_predictions_score_worst_not_perfect(fill):
    """A NaN (or zero: every score ties at 0) prediction ranks its target last in its article."""
    corpus = synthetic_corpus(
        dim=16, articles=10, min_chunks=10, max_chunks=16, topic_weight=1.0, drift_weight=1.0, drift_step=0.5, noise=1.2, seed=1
    )
    store = ArticleStore(*corpus, source="synthetic")
    windows = store.windows(P6)
    weights = torch.tensor([0.1, 0.1, 0.2, 0.2, 0.4], dtype=torch.float64)
    cat = Mini5CAT(windows, n_windows=30, seed=0, prev_slot=-2, batch_size=8, slot_weights=weights, precision="32")
    module = Recorder(cat.batch, lambda b: torch.full_like(b["target"], fill))
    trainer = SimpleNamespace(sanity_checking=False, is_global_zero=True, current_epoch=0)
    cat.on_validation_epoch_end(trainer, module)
    m = cat.last
    # Worst rank = the length of the target's article (all > 5 chunks here), by numpy.
    worst = store.article_lengths[store.row_article[cat.batch["target_row"].numpy()]]
    assert m["r1"] == 0.0 and m["r5"] == 0.0 and m["r5_bank6"] == 0.0
    assert m["mrr"] == pytest.approx(np.mean(1.0 / worst))
    assert module.logged["mini5cat/nonfinite"] == m["nonfinite"] == (1.0 if np.isnan(fill) else 0.0)
    # The slot-linear baseline on the same sample, by numpy: normalise(sum_k w_k ctx_k) . target.
    c, t = cat.batch["context"].double().numpy(), cat.batch["target"].double().numpy()
    p = np.einsum("nkd,k->nd", c, weights.numpy())
    expected = np.mean(np.sum(p * t, 1) / np.linalg.norm(p, axis=1))
    assert module.logged["mini5cat/slot_linear_cos"] == pytest.approx(expected, abs=1e-6)
    if np.isnan(fill):
        assert np.isnan(m["cos"]) and np.isnan(m["margin_last"])
    else:
        assert m["cos"] == 0.0
