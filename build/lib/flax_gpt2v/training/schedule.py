"""Learning-rate schedules and the AdamW optimizer, as HF Trainer defines them.

HF's schedulers are evaluated at the number of updates already done, so the
first update of a warmed-up run uses lr 0; optax's step count agrees.
"""
from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import optax

SCHEDULES = ("linear", "cosine", "constant", "constant_with_warmup")
# The key under which the optimizer holds the blocks h/{i} stacked on a leading layer axis.
LAYERS = "layers"


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


def stack_layers(tree):
    """The blocks `h/{i}` (any dict keyed "0".."n-1" of same-shaped subtrees) as one subtree
    `{LAYERS: ...}` whose leaves have a leading layer axis; the rest of the tree as it is."""
    if not isinstance(tree, Mapping):
        return tree
    n = len(tree)
    if n > 1 and set(tree) == {str(i) for i in range(n)}:
        layers = [tree[str(i)] for i in range(n)]
        shapes = [jax.tree.map(lambda a: (a.shape, a.dtype), layer) for layer in layers]
        if all(s == shapes[0] for s in shapes):
            return {LAYERS: jax.tree.map(lambda *a: jnp.stack(a), *layers)}
    return {key: stack_layers(value) for key, value in tree.items()}


def unstack_layers(tree):
    """The inverse of `stack_layers`."""
    if not isinstance(tree, Mapping):
        return tree
    if set(tree) == {LAYERS}:
        stacked = tree[LAYERS]
        return {str(i): jax.tree.map(lambda a: a[i], stacked) for i in range(jax.tree.leaves(stacked)[0].shape[0])}
    return {key: unstack_layers(value) for key, value in tree.items()}


def over_stacked_layers(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """`inner` applied to the parameters with their layers stacked (`stack_layers`), its state
    kept that way. Per-leaf work (moments, clipping norms, decay) then happens once for all
    layers: the step's program, and its compile time, stop growing with depth through the
    optimizer, while the parameter tree keeps mirroring the Hugging Face names."""
    def init(params):
        return inner.init(stack_layers(params))

    def update(updates, state, params=None):
        updates, state = inner.update(stack_layers(updates), state, stack_layers(params))
        return unstack_layers(updates), state

    return optax.GradientTransformation(init, update)


def adamw(schedule, weight_decay: float, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
          max_grad_norm: float | None = 1.0):
    """Gradient clipping by global norm, then decoupled AdamW (torch.optim.AdamW's update)."""
    parts = [optax.clip_by_global_norm(max_grad_norm)] if max_grad_norm else []
    parts.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask))
    return over_stacked_layers(optax.chain(*parts))
