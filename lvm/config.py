"""Start-up validation of the composed config: every impossible setting, named, in one error."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from callbacks.ramp import parse_stages
from lvm.errors import ConfigError
from lvm.gates import parse_eval
from lvm.threads import thread_count


def to_plain(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as plain python containers (safe inside weights_only checkpoints)."""
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)  # type: ignore[return-value]


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError listing every problem found (setting, value, what was expected)."""
    try:
        problems = _problems(cfg)
    except TypeError as e:  # a string where a number belongs, and the like
        raise ConfigError(f"invalid configuration: a setting has the wrong type ({e})") from None
    if problems:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))


def _problems(cfg: DictConfig) -> list[str]:
    problems: list[str] = []

    def need(ok: bool, msg: str) -> None:
        if not ok:
            problems.append(msg)

    def finite(x: Any) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

    missing = OmegaConf.missing_keys(cfg)
    if missing:
        raise ConfigError(f"missing required setting(s): {', '.join(sorted(missing))}")

    loss = cfg.loss
    need(finite(loss.gamma) and loss.gamma > 0, f"loss.gamma must be > 0 (got {loss.gamma})")
    need(
        finite(loss.lambda_min) and finite(loss.lambda_max) and 0 < loss.lambda_min <= loss.lambda_max,
        f"need 0 < loss.lambda_min <= loss.lambda_max (got {loss.lambda_min}, {loss.lambda_max})",
    )
    need(loss.mse_on in ("raw", "unit"), f"loss.mse_on must be raw or unit (got {loss.mse_on!r})")
    need(finite(loss.margin), f"loss.margin must be a finite number (got {loss.margin})")
    need(finite(loss.target_frac) and loss.target_frac >= 0, f"loss.target_frac must be >= 0 (got {loss.target_frac})")

    try:
        stages = parse_stages(cfg.ramp.stages)
        need(all(s.target_frac >= 0 and math.isfinite(s.margin) for s in stages),
             "ramp.stages: margins must be finite and target_frac >= 0")
    except (ValueError, KeyError, TypeError) as e:
        problems.append(f"{e}")
    need(cfg.ramp.epoch_base in (0, 1), f"ramp.epoch_base must be 0 or 1 (got {cfg.ramp.epoch_base})")

    w = cfg.window
    need(w.context >= 2, f"window.context (K) must be >= 2 (got {w.context})")
    need(w.target_offset >= 1, f"window.target_offset must be >= 1 (got {w.target_offset})")
    need(-w.context <= w.prev_slot < w.context, f"window.prev_slot must index the context [{-w.context}, {w.context - 1}] (got {w.prev_slot})")

    m = cfg.model
    need(m.d_model >= 1 and m.heads >= 1 and m.d_model % m.heads == 0,
         f"model.d_model ({m.d_model}) must be a positive multiple of model.heads ({m.heads})")
    need(m.layers >= 1 and m.ffn >= 1, f"model.layers and model.ffn must be >= 1 (got {m.layers}, {m.ffn})")
    need(0 <= m.dropout < 1, f"model.dropout must be in [0, 1) (got {m.dropout})")
    need(m.block in ("decoder", "encoder"), f"model.block must be decoder or encoder (got {m.block!r})")
    need(finite(m.input_scale) and m.input_scale > 0, f"model.input_scale must be > 0 (got {m.input_scale})")
    need(finite(m.out_init_scale) and m.out_init_scale > 0, f"model.out_init_scale must be > 0 (got {m.out_init_scale})")

    o = cfg.optim
    need(finite(o.lr) and o.lr > 0, f"optim.lr must be > 0 (got {o.lr})")
    need(finite(o.weight_decay) and o.weight_decay >= 0, f"optim.weight_decay must be >= 0 (got {o.weight_decay})")
    need(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), f"optim.betas must be two numbers in [0, 1) (got {list(o.betas)})")
    s = o.scheduler
    need(s.name in ("plateau", "none"), f"optim.scheduler.name must be plateau or none (got {s.name!r})")
    if s.name == "plateau":
        need(0 < s.factor < 1, f"optim.scheduler.factor must be in (0, 1) (got {s.factor})")
        need(s.patience >= 0, f"optim.scheduler.patience must be >= 0 (got {s.patience})")
        need(s.mode in ("min", "max"), f"optim.scheduler.mode must be min or max (got {s.mode!r})")

    d = cfg.data
    need(d.source in ("synthetic", "store_npz", "windows_npz"),
         f"data.source must be synthetic, store_npz or windows_npz (got {d.source!r})")
    if d.source != "synthetic":
        hint = f" ({d.hint})" if d.get("hint") else ""
        need(bool(d.path) and Path(str(d.path)).is_file(), f"data.path must be an existing NPZ file (got {d.path!r}){hint}")
    need(d.normalize in ("renormalize", "error"), f"data.normalize must be renormalize or error (got {d.normalize!r})")
    need(d.batch_size >= 1 and d.eval_batch_size >= 1, "data.batch_size and data.eval_batch_size must be >= 1")
    need(d.num_workers >= 0, f"data.num_workers must be >= 0 (got {d.num_workers})")
    if not d.split.ranges:
        v, ood = d.split.val, d.split.ood
        need(0 < v < 1 and 0 <= ood < 1 and v + ood < 1,
             f"data.split needs 0 < val < 1, 0 <= ood < 1 and val + ood < 1 (got val={v}, ood={ood})")
    if d.source == "synthetic":
        syn = d.synthetic
        need(syn.dim >= 2 and syn.articles >= 1, f"data.synthetic: dim must be >= 2 and articles >= 1 (got {syn.dim}, {syn.articles})")
        need(1 <= syn.min_chunks <= syn.max_chunks,
             f"data.synthetic needs 1 <= min_chunks <= max_chunks (got {syn.min_chunks}, {syn.max_chunks})")
        need(syn.noise >= 0 and syn.drift_step >= 0, "data.synthetic.noise and drift_step must be >= 0")

    t = cfg.trainer
    need(t.get("max_epochs", 1) is not None and t.get("max_epochs", 1) >= 1, f"trainer.max_epochs must be >= 1 (got {t.get('max_epochs')})")
    g = cfg.guard
    need(g.policy in ("none", "skip", "rollback"), f"guard.policy must be none, skip or rollback (got {g.policy!r})")
    if g.policy == "rollback":
        need(g.max_rollbacks >= 0 and g.keep_good >= 1, "guard.max_rollbacks must be >= 0 and guard.keep_good >= 1")
        need(g.backoff.hold_epochs >= 0, f"guard.backoff.hold_epochs must be >= 0 (got {g.backoff.hold_epochs})")
        for k in ("target_frac_scale", "lambda_max_scale"):
            need(finite(g.backoff[k]) and 0 < g.backoff[k] <= 1, f"guard.backoff.{k} must be in (0, 1] (got {g.backoff[k]})")
    if g.policy in ("skip", "rollback"):
        need(finite(g.pos_below) and finite(g.neg_below), "guard.pos_below and guard.neg_below must be finite numbers")
    ck = cfg.callbacks.checkpoint
    n = ck.every_n_steps
    need(n is None or n == "auto" or (isinstance(n, int) and not isinstance(n, bool) and n >= 1),
         f"callbacks.checkpoint.every_n_steps must be auto, null or an integer >= 1 (got {n!r})")
    need(finite(ck.every_minutes) and ck.every_minutes > 0, f"callbacks.checkpoint.every_minutes must be > 0 (got {ck.every_minutes})")
    try:
        thread_count(cfg.threads)  # the rule lives with the setting's one user
    except ConfigError as e:
        problems.append(str(e))
    need(isinstance(cfg.overwrite, bool), f"overwrite must be true or false (got {cfg.overwrite!r})")
    mc = cfg.callbacks.mini5cat
    need(cfg.callbacks.progress_refresh_rate >= 1, f"callbacks.progress_refresh_rate must be >= 1 (got {cfg.callbacks.progress_refresh_rate})")
    need(mc.windows >= 1, f"callbacks.mini5cat.windows must be >= 1 (got {mc.windows})")
    need(cfg.logger.flush_every >= 1, f"logger.flush_every must be >= 1 (got {cfg.logger.flush_every})")
    need(cfg.logger.print_every >= 0, f"logger.print_every must be >= 0 (got {cfg.logger.print_every})")
    if "eval" in cfg:  # the 5CAT gates, checked now so eval.after_fit cannot fail after training
        try:
            parse_eval(to_plain(cfg.eval))
        except ConfigError as e:
            problems.append(str(e))
    return problems
