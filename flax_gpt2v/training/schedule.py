"""Learning-rate schedules and the AdamW optimizer, as HF Trainer defines them.

HF's schedulers are evaluated at the number of updates already done, so the
first update of a warmed-up run uses lr 0; optax's step count agrees.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

SCHEDULES = ("linear", "cosine", "constant", "constant_with_warmup")


def lr_schedule(kind: str, peak: float, warmup: int, total: int):
    """step -> learning rate: linear warmup over `warmup` steps, then `kind` down to 0 at `total`."""
    if kind not in SCHEDULES:
        raise ValueError(f"unknown schedule {kind!r}")
    if kind == "constant":  # HF ignores warmup for "constant"
        warmup = 0

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        progress = jnp.clip((step - warmup) / max(1, total - warmup), 0.0, 1.0)
        if kind == "linear":
            after = 1.0 - progress
        elif kind == "cosine":
            after = 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        else:
            after = jnp.ones_like(step)
        return peak * jnp.where(step < warmup, step / max(1, warmup), after)

    return schedule


def decay_mask(params):
    """True where weight decay applies. HF Trainer exempts every bias and LayerNorm weight;
    in Flax only LayerNorm has `scale`, so the leaf name decides."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) not in ("bias", "scale"), params)


def adamw(schedule, weight_decay: float, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
          max_grad_norm: float | None = 1.0):
    """Gradient clipping by global norm, then decoupled AdamW (torch.optim.AdamW's update)."""
    parts = [optax.clip_by_global_norm(max_grad_norm)] if max_grad_norm else []
    parts.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask))
    return optax.chain(*parts)


def run_optimizer(opts, warmup: int, total: int):
    """(schedule, AdamW) of a run's options (training.options.TrainOptions) over `total` steps."""
    schedule = lr_schedule(opts.lr_scheduler_type, opts.learning_rate, warmup, total)
    return schedule, adamw(schedule, opts.weight_decay, opts.adam_beta1, opts.adam_beta2, opts.adam_epsilon,
                           opts.max_grad_norm)
