"""LightningModule: the P6 transformer trained with the P6b combined loss.

Thin glue: it computes the loss (the v2 skip rule included) and returns each step's statistics
with it, for the callbacks to read as `outputs` (callbacks/stats.py buffers and logs them). The
ramp schedule writes `knobs`; the module holds no schedule, no policy and no attribute that
exists only for a callback.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric, MetricCollection

from lvm.evaluation import metrics as M
from lvm.evaluation.metrics import cos
from lvm.model.losses import DirectionalKnobs, LossTerms, P6bLoss, SkipRule, directional_grad_share
from lvm.model.optim import DroppableAdamW, keep_implementation
from lvm.model.transformer import P6Transformer
from lvm.runtime.checkpoints import FORMAT, FORMAT_KEY
from lvm.runtime.objects import build
from lvm.runtime.precision import autocast

log = logging.getLogger(__name__)

EVAL_SPLITS = ("val", "ood")
# The statistics of every training step, in the order of `outputs["stats"]` (logged as train/<name>
# through callbacks/stats.py; lvm/guard/steplog.py says why not self.log): what the step measures,
# then the loss knobs it ran with.
MEASURED = (
    "loss",
    "mse",
    "dir",
    "lambda_eff",
    "frac_of_mse",
    "pos",
    "neg",
    "gap",
    "skipped",
    "raw_norm",
    "penalties",
    "dir_grad_share",
    "diversity",
    "ca",
)
KNOBS = ("margin", "target_frac", "lambda_min", "lambda_max")
STEP_STATS = MEASURED + KNOBS


def accelerator_device(accelerator: str = "auto") -> torch.device:
    """The device Lightning's `accelerator` setting trains on here, for the work lvm places itself
    (the device data path, precision measurement, evaluation): the first GPU when there is one and
    the setting allows it, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() and accelerator in ("auto", "gpu", "cuda") else "cpu")


@torch.no_grad()
def predict_units(module: torch.nn.Module, context: torch.Tensor, batch_size: int, precision: str) -> torch.Tensor:
    """Unit predictions [N, D] (fp32) on the CPU for contexts [N, K, D], in forwards of at most
    `batch_size` on the module's device (`module.device`) at `precision` (lvm/runtime/precision.py);
    mini-5CAT and 5CAT use it."""
    with autocast(precision, module.device):
        parts = [module(context[s : s + batch_size].to(module.device))[1].float().cpu() for s in range(0, len(context), batch_size)]
    return torch.cat(parts)


def batch_health(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch's prediction diversity and mean contrastive accuracy (lvm.metrics) of unit
    predictions `pred`, for the guard's collapse detectors. The target is normalised once for both
    (not inside each: it was a third of their cost). A batch of one window (an
    epoch's remainder) has no spread to measure: both read 1, neutral, rather than NaN, which the
    non-finite detector would take for a broken model (a NaN model has a NaN loss in the same row)."""
    if len(pred) < 2:
        one = torch.ones((), dtype=pred.dtype, device=pred.device)
        return one, one
    units = F.normalize(target, dim=-1)
    return M.diversity(pred, units, units=True), M.contrastive_accuracy(pred, units, units=True).mean()


def optimizer_spec(config: dict[str, Any]) -> dict[str, Any]:
    """The optimizer a run builds: `optim.optimizer`, or, where updates may be dropped
    (guard.spike.drop), DroppableAdamW with the same settings (lvm/model/optim.py)."""
    o = config["optim"]["optimizer"]
    drop = bool((config["guard"].get("spike") or {}).get("drop", False))
    return {**o, "_target_": f"{DroppableAdamW.__module__}.DroppableAdamW"} if drop else o


class LVMModule(L.LightningModule):
    """Built from the resolved run config (a plain dict, so checkpoints load with weights_only):
    the model from `model`, the loss from `loss`, the v2 skip rule from `guard.skip_rule`."""

    def __init__(self, config: dict[str, Any], dim: int) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False)
        self.model: P6Transformer = build("model", config["model"], dim=dim)
        if config.get("compile", False):  # in place: the state dict keeps its keys (no `_orig_mod.`)
            self.model.compile()
        self.loss: P6bLoss = build("loss", config["loss"])
        self.skip: SkipRule | None = build("guard.skip_rule", config["guard"].get("skip_rule"))
        self.prev_slot = config["window"]["prev_slot"]
        self.optim_cfg = config["optim"]
        self.optimizer_spec = optimizer_spec(config)
        self.print_every = config["logger"]["print_every"]
        self._knobs_cached: tuple[tuple[float, ...], torch.Tensor] | None = None
        self.eval_metrics = torch.nn.ModuleDict(
            {
                s: MetricCollection({k: MeanMetric(nan_strategy="disable") for k in ("loss", "mse", "cos", "cos_copy_last")})
                for s in EVAL_SPLITS
            }
        )

    @property
    def knobs(self) -> DirectionalKnobs:
        """The directional term's current settings (read-only view; change them with `set_knobs`)."""
        return self.loss.knobs

    def set_knobs(self, margin: float, target_frac: float, lambda_max: float) -> None:
        """The one way a callback changes the loss as training goes (callbacks/ramp.py): the margin,
        target_frac and the clamp lambda_max of the directional term, from the next step on."""
        k = self.loss.knobs
        k.margin, k.target_frac, k.lambda_max = margin, target_frac, lambda_max

    def forward(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model(context)

    def compute_loss(self, batch: dict[str, torch.Tensor], skip: SkipRule | None) -> tuple[LossTerms, torch.Tensor, torch.Tensor]:
        context, target = batch["context"], batch["target"]
        raw, pred = self.model(context)
        terms = self.loss(raw, target, context[:, self.prev_slot], skip, self._mean_over_ranks)
        return terms, raw, pred

    def _mean_over_ranks(self, t: torch.Tensor) -> torch.Tensor:
        return self.trainer.strategy.reduce(t, reduce_op="mean")

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, Any]:
        """The loss, and the step's statistics (STEP_STATS, on device: no host sync) with its step."""
        terms, raw, pred = self.compute_loss(batch, self.skip)
        diversity, ca = batch_health(pred.detach(), batch["target"])
        measured = {
            "loss": terms.loss.detach(),
            "mse": terms.mse.detach(),
            "dir": terms.dir.detach(),
            "lambda_eff": terms.lambda_eff,
            "frac_of_mse": terms.frac_of_mse,
            "pos": terms.pos,
            "neg": terms.neg,
            "gap": terms.gap,
            "skipped": terms.skipped.float(),
            "raw_norm": raw.detach().norm(dim=-1).mean(),
            "penalties": terms.penalties,
            "dir_grad_share": directional_grad_share(terms, raw),
            "diversity": diversity,
            "ca": ca,
        }
        stats = torch.stack([measured[n].float() for n in MEASURED])
        out = {"loss": terms.loss, "stats": torch.cat([stats, self._knob_row(stats.device)]), "step": self.global_step}
        k = self.knobs
        if self.print_every and self.global_step % self.print_every == 0 and self.trainer.is_global_zero:
            log.info(
                "[P6b dir] λ_eff=%.5f pos=%.3f neg=%.3f gap=%.3f frac_of_mse=%.2f margin=%.3f",
                terms.lambda_eff,
                terms.pos,
                terms.neg,
                terms.gap,
                terms.frac_of_mse,
                k.margin,
            )
        return out

    def _knob_row(self, device: torch.device) -> torch.Tensor:
        """The knobs as a device tensor, rebuilt only when a callback changed them (no per-step copy)."""
        values = tuple(getattr(self.knobs, n) for n in KNOBS)
        if self._knobs_cached is None or self._knobs_cached[0] != values or self._knobs_cached[1].device != device:
            self._knobs_cached = (values, torch.tensor(values, dtype=torch.float32, device=device))
        return self._knobs_cached[1]

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        split = EVAL_SPLITS[dataloader_idx]
        terms, _, pred = self.compute_loss(batch, None)
        n = len(pred)
        metrics = self.eval_metrics[split]
        metrics["loss"].update(terms.loss, n)
        metrics["mse"].update(terms.mse, n)
        metrics["cos"].update(cos(pred, batch["target"]).mean(), n)
        metrics["cos_copy_last"].update(cos(M.copy_last(batch["context"]), batch["target"]).mean(), n)
        for name, metric in metrics.items():
            self.log(f"{split}/{name}", metric, on_step=False, on_epoch=True, add_dataloader_idx=False, batch_size=n)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Stamp the checkpoint format, which lvm.runtime.checkpoints.read_checkpoint checks."""
        checkpoint[FORMAT_KEY] = FORMAT

    def configure_optimizers(self) -> dict[str, Any]:
        """The optimizer `optim.optimizer` and scheduler `optim.scheduler` (null: none) from config.
        Where updates may be dropped (guard.spike.drop) the optimizer is DroppableAdamW with the same
        settings: torch's fused AdamW with a 0/1 update factor (lvm/model/optim.py). Either keeps
        its fused / foreach setting when it loads a checkpoint's state."""
        o = self.optim_cfg
        optimizer = keep_implementation(build("optim.optimizer", self.optimizer_spec, params=list(self.parameters())))
        scheduler = build("optim.scheduler", o["scheduler"], optimizer=optimizer)
        if scheduler is None:
            return {"optimizer": optimizer}
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "monitor": o["monitor"], "interval": "epoch"}}
