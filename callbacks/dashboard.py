"""TensorBoardDashboard: the custom-scalars layout, the hparams tab and a per-epoch metrics history;
RunTensorBoard: Lightning's TensorBoard logger writing a step's scalars as one event, and Lightning's
`epoch` scalar once per step.

A resumed run writes nothing at a step its tb/ folder already shows: the layout is written once
per folder, the hparams at the fit's last step (a later fit's purge_step hides an earlier one's),
and `epoch` once per step.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from tensorboard.compat.proto.summary_pb2 import Summary
from torch.utils.tensorboard.summary import scalar

from lvm.runtime.files import drop_rows_after, read_jsonl

LAYOUT = {
    "P6b directional": {
        "pos / neg / gap": ["Multiline", ["train/pos", "train/neg", "train/gap"]],
        "lambda_eff and its clamp": ["Multiline", ["train/lambda_eff", "train/lambda_min", "train/lambda_max"]],
        "frac_of_mse vs target_frac": ["Multiline", ["train/frac_of_mse", "train/target_frac"]],
        "directional share of the output gradient": ["Multiline", ["train/dir_grad_share"]],
        "margin": ["Multiline", ["train/margin", "train/gap"]],
        "raw norm and skips": ["Multiline", ["train/raw_norm", "train/skipped"]],
        "collapse: prediction diversity and contrastive accuracy": ["Multiline", ["train/diversity", "train/ca"]],
        "loss terms (variant penalties: v2.1-v2.3)": ["Multiline", ["train/mse", "train/dir", "train/penalties"]],
    },
    "Validation": {
        "cosine vs baselines": [
            "Multiline",
            ["val/cos", "ood/cos", "mini5cat/cos", "mini5cat/copy_last_cos", "mini5cat/mean_context_cos", "mini5cat/slot_linear_cos"],
        ],
        "mini-5CAT margins": ["Multiline", ["mini5cat/margin_last", "mini5cat/margin_prev"]],
        "within-article retrieval": [
            "Multiline",
            ["mini5cat/r1", "mini5cat/r5", "mini5cat/mrr", "mini5cat/copy_last_r5", "mini5cat/r5_bank6"],
        ],
        "loss": ["Multiline", ["val/loss", "val/mse", "ood/loss", "ood/mse"]],
        "non-finite predictions (share)": ["Multiline", ["mini5cat/nonfinite"]],
        "collapse: diversity and contrastive accuracy": ["Multiline", ["mini5cat/diversity", "mini5cat/ca", "mini5cat/mean_context_ca"]],
    },
}

# Final metrics shown in the hparams tab, read from the trainer's last logged values.
HPARAM_METRICS = ("val/cos", "ood/cos", "mini5cat/margin_last", "mini5cat/r5", "mini5cat/cos")


class RunTensorBoard(TensorBoardLogger):
    """Lightning's TensorBoardLogger, writing one event per log call (all its scalars, at their step)
    where Lightning's writes one per scalar: the event writer's cost is per event (measured in
    docs/performance.md). Lightning's `epoch` scalar is written
    once per step: Lightning adds it to each of its log calls, and at an epoch's end makes two at
    one step (the validation's values, then the epoch's training values)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._epoch_step: int | None = None  # the step of the newest `epoch` written

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if "epoch" in metrics and step is not None:
            if step == self._epoch_step:
                metrics = {k: v for k, v in metrics.items() if k != "epoch"}
            self._epoch_step = step
        if step is None or self._prefix or any(isinstance(v, Mapping) for v in metrics.values()):
            return super().log_metrics(metrics, step)
        values = [v for k, x in metrics.items() for v in scalar(k, float(x)).value]
        self.experiment._get_file_writer().add_summary(Summary(value=values), step)


def earlier_events(logger: TensorBoardLogger) -> bool:
    """Whether the logger's folder holds event files besides its own (a resumed run's folder)."""
    logger.experiment  # its writer creates its own file
    return len(list(Path(logger.log_dir).glob("events.out.tfevents.*"))) > 1


class TensorBoardDashboard(L.Callback):
    """Writes the layout at fit start, one JSON line of epoch metrics per epoch (to `history`),
    and the run's hparams with its final metrics at fit end."""

    def __init__(self, hparams: Mapping[str, Any], history: str | Path) -> None:
        self.hparams = dict(hparams)
        self.history = Path(history)
        self._validated: int | None = None  # the epoch of the newest validation

    @staticmethod
    def _tensorboards(trainer: L.Trainer) -> list[TensorBoardLogger]:
        return [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._validated = trainer.current_epoch

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # At the epoch's end, after validation and after the epoch-level values the other callbacks
        # log (ramp stage, skips), and before last.ckpt is written (checkpoints come last), so the
        # checkpoint at this step comes after its row.
        if not trainer.is_global_zero or self._validated != trainer.current_epoch:
            return  # an epoch cut short (the guard stopped the run) has no validation to record
        row = {"epoch": trainer.current_epoch, "step": trainer.global_step}
        row.update({k: float(v) for k, v in trainer.callback_metrics.items() if "/" in k and not k.startswith("train/")})
        with self.history.open("a") as f:
            f.write(json.dumps(row) + "\n")

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            for lg in self._tensorboards(trainer):
                if not earlier_events(lg):  # a resumed run's folder has it (at step 0) already
                    lg.experiment.add_custom_scalars(LAYOUT)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # After a checkpoint is restored: a resumed run drops the rows written after its checkpoint
        # (a kill between a row and the checkpoint), so that every epoch has exactly one row.
        if trainer.is_global_zero:
            drop_rows_after(self.history, trainer.global_step)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        logged = {k: float(v) for k, v in trainer.callback_metrics.items()}
        if not any(k in logged for k in HPARAM_METRICS):  # a resumed run with no epoch left to train
            logged = (read_jsonl(self.history) or [{}])[-1]
        final = {f"hparams/{k}": float(logged[k]) for k in HPARAM_METRICS if k in logged}
        best = trainer.checkpoint_callback.best_model_score if trainer.checkpoint_callback else None
        if best is not None:
            final["hparams/best_val_cos"] = float(best)
        for lg in self._tensorboards(trainer):
            # At the last step, not 0: a resumed run's purge_step hides what an earlier fit wrote there.
            lg.log_hyperparams(self.hparams, final, step=trainer.global_step)
            lg.experiment.flush()
