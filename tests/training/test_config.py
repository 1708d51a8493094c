"""Start-up validation (lvm/training/config.py): every impossible setting is named before anything
is built from data, and every shipped experiment passes."""

from __future__ import annotations

import pytest

from lvm.runtime.errors import ConfigError
from lvm.training.config import validate
from tests.helpers import ROOT, cfg_for

# The experiments on the built-in data (p6b_v2_wiki reads data/wiki_minilm, built by make data-wiki).
EXPERIMENTS = sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml") if p.stem != "p6b_v2_wiki")


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_shipped_experiment_is_valid(experiment):
    validate(cfg_for(f"+experiment={experiment}", "ckpt=outputs/some.ckpt" if experiment == "p6b_v2_recovery" else "+unused=0"))


def test_the_recovery_without_its_checkpoint_names_the_setting():
    """It was a bare omegaconf traceback (InterpolationToMissingValueError from ckpt_path: ${ckpt})."""
    with pytest.raises(ConfigError, match=r"^missing required setting: ckpt_path needs ckpt=\.\.\.$"):
        validate(cfg_for("+experiment=p6b_v2_recovery"))


@pytest.mark.parametrize(
    "override,setting",
    [
        ("loss.gamma=0", "loss.gamma"),
        ("loss.lambda_min=0.1", "loss.lambda_min"),
        ("window.context=1", "window.context"),
        ("model.heads=3", "model.d_model"),
        ("optim.optimizer.lr=-1", "optim.optimizer: Invalid learning rate"),
        ("optim.optimizer.betas=[0.9,1.5]", "optim.optimizer: Invalid beta"),
        ("+optim.optimizer.momentum=0.9", "optim.optimizer: .*unexpected keyword argument 'momentum'"),
        ("optim.scheduler.factor=2", "optim.scheduler: Factor should be < 1.0"),
        ("optim.scheduler.patience=-1", "optim.scheduler.patience"),
        ("data.split.val=0", "data.split"),
        ("data.synthetic.min_chunks=20", "min_chunks <= max_chunks"),
        ("data.num_workers=-1", "data.num_workers"),
        ("data.shuffle=local", "data.shuffle must be one of"),
        ("data.shuffle_block=0", "data.shuffle_block must be an integer >= 1"),
        ("trainer.use_distributed_sampler=true", "trainer.use_distributed_sampler must be false"),
        (
            "ramp.stages=[{until:3,margin:0.1,target_frac:0.1},{until:2,margin:0.1,target_frac:0.1},{until:null,margin:0.1,target_frac:0.1}]",
            "increase",
        ),
        ("guard.skip_rule.both_pos_below=0.05", "both_neg_below"),
        ("callbacks.resume.every_n_steps=0", "callbacks.resume.every_n_steps"),
        ("callbacks.resume.every_minutes=0", "callbacks.resume.every_minutes"),
        ("callbacks.resume=null", "callbacks.resume cannot be null"),
        ("callbacks.best_checkpoint=null", "callbacks.best_checkpoint cannot be null"),
        ("callbacks.progress_bar.refresh_rate=0", "callbacks.progress_bar.refresh_rate"),
        ("+callbacks.best_checkpoint.every_step=1", "callbacks.best_checkpoint: .*unexpected keyword argument 'every_step'"),
        ("threads=0", "threads"),
        ("overwrite=maybe", "overwrite"),
        ("compile=yes", "compile must be true or false"),
        ("model.dropout=1.0", "model.dropout"),
        ("loss.mse_on=cosine", "loss.mse_on"),
        ("data.normalize=clip", "data.normalize"),
        ("logger.flush_every=0", "logger.flush_every"),
        ("ramp.epoch_base=2", "ramp.epoch_base"),
        ("ramp.stages=[{until:null,margin:0.1,target_frac:-0.5}]", "target_frac"),
        ("guard.skip_rule.pos_below=.nan", "guard.skip_rule.pos_below"),
        ("+model.dropuot=0.1", "model: .*unexpected keyword argument 'dropuot'"),
        ("+loss.variant.ratio=0.1", "loss: .*unexpected keyword argument 'ratio'"),
        ("guard.spike.min_ratio=0.5", "guard.spike"),
        ("guard.spike.min_history=500", "guard.spike"),
    ],
)
def test_an_impossible_setting_is_named(override, setting):
    with pytest.raises(ConfigError, match=setting.replace(".", r"\.").replace(r"\.*", ".*")):
        validate(cfg_for(override))


def test_every_broken_object_is_named_at_once():
    """Validation builds each object from its config node: one error lists the model's, the loss's
    and the window's problems together."""
    with pytest.raises(ConfigError) as e:
        validate(cfg_for("model.heads=3", "loss.gamma=0", "window.context=1"))
    for setting in ("model.d_model", "loss.gamma", "window.context"):
        assert setting in str(e.value)


def test_dropped_updates_need_the_fused_optimizer():
    with pytest.raises(ConfigError, match=r"guard\.spike\.drop needs optim\.optimizer\.fused=true"):
        validate(cfg_for("guard.spike.drop=true", "optim.optimizer.fused=false"))
    validate(cfg_for("guard.spike.drop=true"))
