"""Start-up validation of the composed config: every impossible setting, named, in one error."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationToMissingValueError

from lvm.data.loaders import check_data
from lvm.data.store import WindowSpec
from lvm.evaluation.gates import parse_eval
from lvm.guard.steplog import StepLog
from lvm.model.module import optimizer_spec
from lvm.runtime.errors import ConfigError, LvmError
from lvm.runtime.launchers import is_ddp
from lvm.runtime.objects import build, to_plain
from lvm.runtime.precision import check_precision
from lvm.runtime.threads import thread_count
from lvm.training.data import keeps_data_on_device


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError listing every problem found (setting, value, what was expected)."""
    try:
        problems = _problems(cfg)
    except TypeError as e:  # a string where a number belongs, and the like
        raise ConfigError(f"invalid configuration: a setting has the wrong type ({e})") from None
    except InterpolationToMissingValueError as e:  # `ckpt_path: ${ckpt}` with `ckpt: ???` unset
        needed = re.search(r"Missing mandatory value: ([\w.]+)", str(e))
        raise ConfigError(f"missing required setting: {e.full_key} needs {needed.group(1) if needed else 'a value'}=...") from None
    if problems:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))


def _problems(cfg: DictConfig) -> list[str]:
    problems: list[str] = []

    def need(ok: bool, msg: str) -> None:
        if not ok:
            problems.append(msg)

    def built(make: Callable[[], Any]) -> Any:
        try:
            return make()
        except (ValueError, LvmError) as e:
            problems.append(str(e))
            return None

    missing = OmegaConf.missing_keys(cfg)
    if missing:
        raise ConfigError(f"missing required setting(s): {', '.join(sorted(missing))}")

    # Rules that belong to an object are checked by building it (one place per rule).
    plain = to_plain(cfg)
    built(lambda: WindowSpec(**plain["window"]))
    with torch.device("meta"):  # the model's shape rules, without allocating its weights
        built(lambda: build("model", plain["model"], dim=2))
    built(lambda: build("loss", plain["loss"]))
    built(lambda: build("guard.skip_rule", plain["guard"].get("skip_rule")))
    built(lambda: build("guard.spike", plain["guard"].get("spike")))
    schedule = built(lambda: build("ramp", plain["ramp"]))
    mini5cat = plain["callbacks"]["mini5cat"] is not None
    built(lambda: build("guard.rollback", plain["guard"]["rollback"], run_dir=".", schedule=schedule, mini5cat=mini5cat))
    if plain.get("fault") is not None:
        built(lambda: build("fault", plain["fault"], constant=torch.zeros(2), ckpt_dir="."))
    built(lambda: StepLog([], plain["logger"]["flush_every"]))
    built(lambda: check_data(plain["data"]))
    built(lambda: keeps_data_on_device(plain["data"]["on_device"], plain["data"]["device_share"], 0, torch.device("cpu")))
    built(lambda: thread_count(plain["threads"]))
    built(lambda: check_precision("trainer.precision", plain["trainer"]["precision"]))
    built(lambda: check_precision("eval.precision", plain["eval"]["precision"]))
    # auto measures in each process before the ranks meet: ranks could choose apart.
    need(
        not (is_ddp(cfg) and "auto" in (str(cfg.trainer.precision), str(cfg.eval.precision))),
        "trainer.precision=auto and eval.precision=auto measure on one process: under DDP choose 32 or bf16-mixed",
    )

    o = plain["optim"]
    param = torch.nn.Parameter(torch.zeros(1))
    built(lambda: build("optim.scheduler", o["scheduler"], optimizer=build("optim.optimizer", optimizer_spec(plain), params=[param])))
    if o["scheduler"] is not None and "patience" in o["scheduler"]:  # torch accepts a negative patience
        need(o["scheduler"]["patience"] >= 0, f"optim.scheduler.patience must be >= 0 (got {o['scheduler']['patience']})")

    t = cfg.trainer
    need(t.get("max_epochs", 1) is not None and t.get("max_epochs", 1) >= 1, f"trainer.max_epochs must be >= 1 (got {t.get('max_epochs')})")
    need(
        t.get("use_distributed_sampler") is False,
        "trainer.use_distributed_sampler must be false: lvm's samplers share out each global batch across ranks themselves "
        f"(Lightning's DistributedSampler pads with repeated windows and loses the resume position; got {t.get('use_distributed_sampler')!r})",
    )
    for key in ("best_checkpoint", "resume"):  # what ends a run says rests on them (best and last.ckpt)
        need(cfg.callbacks[key] is not None, f"callbacks.{key} cannot be null: every run keeps its best and last checkpoints")
    for key in ("best_checkpoint", "epoch_checkpoints", "progress_bar"):
        built(lambda key=key: build(f"callbacks.{key}", plain["callbacks"][key]))
    if cfg.callbacks.resume is not None:
        resume = plain["callbacks"]["resume"]
        built(lambda: build("callbacks.resume", resume, sampler=None, batch_size=1, last_path=".", signals=None, signal_check_every=1))
    need(isinstance(cfg.overwrite, bool), f"overwrite must be true or false (got {cfg.overwrite!r})")
    need(isinstance(cfg.ckpt_model, bool), f"ckpt_model must be true or false (got {cfg.ckpt_model!r})")
    need(isinstance(cfg.compile, bool), f"compile must be true or false (got {cfg.compile!r})")
    mc = cfg.callbacks.mini5cat
    bar = cfg.callbacks.progress_bar
    need(bar is None or bar.refresh_rate >= 1, f"callbacks.progress_bar.refresh_rate must be >= 1 (got {bar and bar.refresh_rate})")
    if mc is not None:
        need(mc.n_windows >= 1, f"callbacks.mini5cat.n_windows must be >= 1 (got {mc.n_windows})")
    need(cfg.logger.print_every >= 0, f"logger.print_every must be >= 0 (got {cfg.logger.print_every})")
    if "eval" in cfg:  # the 5CAT gates, checked now so eval.after_fit cannot fail after training
        built(lambda: parse_eval(plain["eval"]))
    return problems
