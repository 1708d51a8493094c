"""Mini5CAT: a cheap per-epoch health check on a fixed, seeded sample of val windows.

Reports val cosine, margins against ctx[-1] and against the loss's prev slot, within-article
retrieval (R@1, R@5, MRR of the target among all chunks of its article), the original's 6-vector
bank R@5 under its own name (it reads 1.0 for a collapsed model), and the copy-last,
mean-of-context and slot-linear baselines on the same sample. `nonfinite` is the share of predictions holding a
NaN/inf component: their cos and margins are NaN and retrieval ranks them last, never first.
`diversity` (the spread of the unit predictions over the targets', ~0 for a constant output) and
`ca` (in-batch contrastive accuracy over the sample, 0.5 is chance) feed the guard's collapse
detectors.
"""

from __future__ import annotations

import logging

import lightning as L
import numpy as np
import torch

from lvm.data.store import Windows
from lvm.evaluation import metrics as M
from lvm.evaluation.baselines import BASELINES, reference_predictors
from lvm.model.module import predict_units

log = logging.getLogger(__name__)


def health_metrics(pred: torch.Tensor, batch: dict[str, torch.Tensor], windows: Windows, prev_slot: int) -> dict[str, float]:
    """Mini-5CAT figures of predictions `pred` for the windows in `batch`."""
    context, target, rows = batch["context"], batch["target"], batch["target_row"]
    start, length = windows.store.article_span(rows.numpy())
    ranks = M.within_article_ranks(pred, windows.store.vectors, rows, torch.from_numpy(start), torch.from_numpy(length))
    return {
        "nonfinite": M.nonfinite(pred).float().mean().item(),
        "cos": M.cos(pred, target).mean().item(),
        "margin_last": M.margin(pred, target, context[:, -1]).mean().item(),
        "margin_prev": M.margin(pred, target, context[:, prev_slot]).mean().item(),
        "r1": M.recall_at(ranks, 1).item(),
        "r5": M.recall_at(ranks, 5).item(),
        "mrr": M.mrr(ranks).item(),
        "r5_bank6": M.recall_at(M.six_bank_ranks(pred, context, target), 5).item(),
        "diversity": M.diversity(pred, target).item(),
        "ca": M.contrastive_accuracy(pred, target).mean().item(),
    }


class Mini5CAT(L.Callback):
    """Runs at the end of every validation epoch (not during the sanity check)."""

    def __init__(
        self, windows: Windows, n_windows: int, seed: int, prev_slot: int, batch_size: int, slot_weights: torch.Tensor, precision: str
    ) -> None:
        self.windows = windows
        self.precision = precision  # resolved (not auto): eval.precision
        self.prev_slot = prev_slot
        self.batch_size = batch_size
        self.index = torch.from_numpy(windows.sample(n_windows, seed))
        self.batch = windows.gather(self.index)
        predictors = reference_predictors(slot_weights)
        self.baselines = {name: health_metrics(predictors[name](self.batch), self.batch, windows, prev_slot) for name in BASELINES}
        self.last: dict[str, float] = {}
        log.info(
            "Mini-5CAT: %d windows from %d val articles; baselines cos copy-last %.3f, mean-of-context %.3f, slot-linear %.3f",
            len(self.index),
            len(np.unique(windows.article_ids(self.index))),
            *(self.baselines[name]["cos"] for name in BASELINES),
        )

    def predict(self, pl_module: L.LightningModule) -> torch.Tensor:
        return predict_units(pl_module, self.batch["context"], self.batch_size, self.precision)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self.last = health_metrics(self.predict(pl_module), self.batch, self.windows, self.prev_slot)
        logged = {f"mini5cat/{k}": v for k, v in self.last.items()}
        for base, vals in self.baselines.items():
            logged[f"mini5cat/{base}_cos"] = vals["cos"]
            logged[f"mini5cat/{base}_r5"] = vals["r5"]
            logged[f"mini5cat/{base}_ca"] = vals["ca"]
        pl_module.log_dict(logged, on_step=False, on_epoch=True)
        if trainer.is_global_zero:
            m, b = self.last, self.baselines
            if m["nonfinite"]:
                log.warning(
                    "[Mini-5CAT] %.1f%% of predictions hold NaN/inf: cos and margins are NaN, retrieval ranks them last | epoch %d",
                    100 * m["nonfinite"],
                    trainer.current_epoch,
                )
            log.info(
                "[Mini-5CAT] Margin: %.3f | R@5: %.3f | cos %.3f (copy-last %.3f, mean-ctx %.3f, slot-linear %.3f) | "
                "margin_prev %.3f | R@1 %.3f | R@5_bank6 %.3f | diversity %.2f | CA %.3f | epoch %d",
                m["margin_last"],
                m["r5"],
                m["cos"],
                *(b[name]["cos"] for name in BASELINES),
                m["margin_prev"],
                m["r1"],
                m["r5_bank6"],
                m["diversity"],
                m["ca"],
                trainer.current_epoch,
            )
