"""The jitted steps and what surrounds them: the train step, the eval step and the one eval loop over it,
eval metrics, the training state (its init, shardings, host copy) and what a step costs (FLOPs).

The trainer, eval_jax.py and benchmark.py all run these, so the numbers they report are the same
computation. May import: config, models, training.sharding. Never the trainer's loop.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from flax_gpt2v.models import build_model, init_params, ops, param_axes, variant_of
from flax_gpt2v.training import sharding

# Tokens per device whose fp32 logits exist at once in the loss. On a GPU the bound is memory
# (8192 x 50k x 4 B = 1.6 GB). On a CPU, chunks of 512 train gpt2's small step about 5% faster than
# one chunk of 2048 (README's Speed): each chunk's logits and gradients are reused buffers, not
# fresh 400 MB ones.
LOGIT_CHUNK_TOKENS = {"cpu": 512}
LOGIT_CHUNK_TOKENS_DEFAULT = 8192
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # bf16 dense, per device


def split_micro(x, accum: int):
    """[G, ...] -> [accum, G/accum, ...] taking every accum-th row, so that each device's
    contiguous slice of the batch holds rows of every micro-batch (no data movement)."""
    return jnp.swapaxes(x.reshape(x.shape[0] // accum, accum, *x.shape[1:]), 0, 1)


def lm_loss_sums(module, params, hidden, targets, batch_devices: int, platform: str):
    """(nll sum, token count, correct count) of the tied head on hidden states [B, T, d],
    in chunks of about LOGIT_CHUNK_TOKENS tokens per device of `platform`."""
    rows = max(1, hidden.shape[0] // batch_devices)
    chunk_tokens = LOGIT_CHUNK_TOKENS.get(platform, LOGIT_CHUNK_TOKENS_DEFAULT)
    chunk_len = max(1, min(hidden.shape[1], chunk_tokens // rows))
    return ops.chunked_cross_entropy(hidden, params["transformer"]["wte"]["embedding"], targets,
                                     module.cfg["vocab_size"], chunk_len)


def make_train_step(module, tx, schedule, mesh, param_shardings, *, accum: int, seed: int, interleaved: bool):
    """(state, batch) -> (state, metrics). The loss is the token mean over the whole global batch,
    computed from sums so it is exact under accumulation and any sharding."""
    micro_sharding = NamedSharding(mesh, P(None, sharding.BATCH_AXES))
    batch_devices = sharding.batch_size_multiple(mesh)
    platform = mesh.devices.flat[0].platform

    def loss_sums(params, batch, key):
        k_dropout, k_diffusion = jax.random.split(key)
        hidden = module.apply({"params": params}, batch["input_ids"], interleaved=interleaved, deterministic=False,
                              return_hidden=True, rngs={"dropout": k_dropout, "diffusion": k_diffusion})
        nll, count, correct = lm_loss_sums(module, params, hidden, batch["targets"], batch_devices, platform)
        return nll, (count, correct)

    grad_sums = jax.value_and_grad(loss_sums, has_aux=True)

    def step(state, batch):
        params = state["params"]
        # Separate stream from the init key; per step (and micro-batch) so a resume replays it.
        key = jax.random.fold_in(jax.random.split(jax.random.PRNGKey(seed))[1], state["step"])
        micro = jax.lax.with_sharding_constraint(jax.tree.map(lambda x: split_micro(x, accum), batch),
                                                 micro_sharding)

        def accumulate(carry, xs):
            grads, nll, count, correct = carry
            i, mb = xs
            (n, (c, k)), g = grad_sums(params, mb, jax.random.fold_in(key, i))
            grads = jax.lax.with_sharding_constraint(jax.tree.map(jnp.add, grads, g), param_shardings)
            return (grads, nll + n, count + c, correct + k), None

        zeros = jax.lax.with_sharding_constraint(jax.tree.map(jnp.zeros_like, params), param_shardings)
        init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))
        (grads, nll, count, correct), _ = jax.lax.scan(accumulate, init, (jnp.arange(accum), micro))
        denom = jnp.maximum(count, 1).astype(jnp.float32)
        grads = jax.tree.map(lambda g: g / denom, grads)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        loss, grad_norm = nll / denom, optax.global_norm(grads)
        # A non-finite loss or gradient never reaches the parameters: the update is skipped
        # (parameters and moments kept) and counted; the trainer stops after too many in a row.
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        def keep(new, old):
            return jnp.where(finite, new, old)

        bad = jnp.where(finite, 0, state["bad_steps"] + 1)
        new_state = {"step": state["step"] + 1,
                     "params": jax.tree.map(keep, optax.apply_updates(params, updates), params),
                     "opt_state": jax.tree.map(keep, opt_state, state["opt_state"]),
                     "bad_steps": bad, "skipped_steps": state["skipped_steps"] + (~finite).astype(jnp.int32)}
        metrics = {"loss": loss, "accuracy": correct / denom, "grad_norm": grad_norm,
                   "learning_rate": schedule(state["step"]), "tokens": count, "bad_steps": bad,
                   "skipped_steps": new_state["skipped_steps"]}
        return new_state, metrics
    return step


def jit_train_step(module, tx, schedule, mesh, state_shardings, **kw):
    """make_train_step compiled for the mesh; the old state's buffers are donated to the new one."""
    return jax.jit(make_train_step(module, tx, schedule, mesh, state_shardings["params"], **kw),
                   in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
                   out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=0)


def make_eval_step(module, *, interleaved: bool, batch_devices: int = 1, platform: str | None = None):
    """(params, batch) -> {group: (nll sum, token count, correct count)} on `platform`'s devices (None: the
    default backend's); duo-predict adds its next-token (even indices) and fill-in (odd indices) groups."""
    platform = platform or jax.default_backend()

    def step(params, batch):
        hidden = module.apply({"params": params}, batch["input_ids"], interleaved=interleaved, return_hidden=True)
        t = batch["targets"]

        def sums(h, t):
            return lm_loss_sums(module, params, h, t, batch_devices, platform)

        if not interleaved:
            return {"": sums(hidden, t)}
        # The whole sequence's sums are the two groups' sums: the head runs once per position.
        groups = {"next_": sums(hidden[:, 0::2], t[:, 0::2]), "fill_": sums(hidden[:, 1::2], t[:, 1::2])}
        return {"": jax.tree.map(jnp.add, groups["next_"], groups["fill_"]), **groups}
    return step


def jit_eval_step(module, mesh, param_shardings, *, interleaved: bool):
    """make_eval_step compiled for the mesh, its sums replicated (every host reads them)."""
    return jax.jit(make_eval_step(module, interleaved=interleaved, batch_devices=sharding.batch_size_multiple(mesh),
                                  platform=mesh.devices.flat[0].platform),
                   in_shardings=(param_shardings, sharding.batch_sharding(mesh)),
                   out_shardings=sharding.replicated(mesh))


def eval_loop(step: Callable, params, batches: Iterable[Mapping[str, Any]], *, total: int | None = None,
              progress: bool = False, desc: str = "eval") -> dict[str, np.ndarray]:
    """{group: summed (nll, count, correct)} of `step(params, batch)` over the batches, in float64.

    Each step's sums are read after the next step is dispatched, so the device never waits for the host.
    """
    from tqdm.auto import tqdm

    sums: dict[str, np.ndarray] = {}

    def add(out):
        for group, values in jax.device_get(out).items():
            sums[group] = sums.get(group, 0) + np.asarray(values, np.float64)

    pending = None
    for batch in tqdm(batches, total=total, desc=desc, disable=not progress, unit="batch"):
        out = step(params, batch)
        if pending is not None:
            add(pending)
        pending = out
    if pending is not None:
        add(pending)
    return sums


def eval_metrics(sums: Mapping[str, np.ndarray]) -> dict:
    """Loss, perplexity and accuracy of each group (eval_loss, eval_next_loss, ...) from eval_loop's sums."""
    out = {}
    for group, (nll, count, correct) in sums.items():
        loss = float(nll / max(count, 1))
        out[f"eval_{group}loss"] = loss
        out[f"eval_{group}perplexity"] = math.exp(min(loss, 700.0))
        out[f"eval_{group}accuracy"] = float(correct / max(count, 1))
    return out


# ---------------------------------------------------------------- state

def _create_state(module, tx):
    def create(key):
        params = init_params(module, key)
        # bad_steps: non-finite steps in a row up to this one; skipped_steps: all of them.
        return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params),
                "bad_steps": jnp.zeros((), jnp.int32), "skipped_steps": jnp.zeros((), jnp.int32)}
    return create


def state_layout(module, tx, mesh, seed: int):
    """(state shapes, state shardings) of `init_state`'s state, without creating it."""
    shapes = jax.eval_shape(_create_state(module, tx), jax.random.PRNGKey(seed))
    axes = param_axes(module)
    shardings = {"step": sharding.replicated(mesh), "bad_steps": sharding.replicated(mesh),
                 "skipped_steps": sharding.replicated(mesh),
                 "params": sharding.tree_shardings(shapes["params"], axes, mesh),
                 "opt_state": sharding.tree_shardings(shapes["opt_state"], axes, mesh, optimizer=True)}
    return shapes, shardings


def create_state(module, tx, shardings, seed: int):
    """The state of `state_layout`'s shardings: fp32 parameters initialised like
    `flax_gpt2v.init(cfg, seed)`, created directly in their shards."""
    return jax.jit(_create_state(module, tx), out_shardings=shardings)(jax.random.PRNGKey(seed))


def init_state(module, tx, mesh, seed: int):
    """(state, state shardings), the state created as `create_state` does."""
    shardings = state_layout(module, tx, mesh, seed)[1]
    return create_state(module, tx, shardings, seed), shardings


def run_train_step(model_cfg, opts, tx, schedule, mesh, platform: str | None = None):
    """A run's train step as its options (training.options.TrainOptions) make it: (compute module, state
    shapes, state shardings, jitted step). The trainer trains with it; `train_jax.py --check` compiles
    it, `platform` ("gpu") deciding the attention kernel for a GPU that is not here."""
    module = build_model(model_cfg, dtype=jnp.bfloat16 if opts.bf16 else jnp.float32,
                         remat=opts.remat_policy if opts.gradient_checkpointing else "none",
                         scan=opts.scan_layers, attention=opts.attention_implementation, platform=platform)
    shapes, shardings = state_layout(build_model(model_cfg), tx, mesh, opts.seed)
    step = jit_train_step(module, tx, schedule, mesh, shardings, accum=opts.gradient_accumulation_steps,
                          seed=opts.seed, interleaved=variant_of(model_cfg).interleaved)
    return module, shapes, shardings, step


def abstract_state(state, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


def host_params(params):
    """The full parameters as numpy on every host (a collective when several hosts share them)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        return multihost_utils.process_allgather(params, tiled=True)
    return jax.device_get(params)


def global_batch(local: Mapping[str, np.ndarray], batch_sharding) -> dict:
    """This host's rows -> arrays over the whole mesh."""
    n = jax.process_count()
    return {k: jax.make_array_from_process_local_data(batch_sharding, np.asarray(v),
                                                      (v.shape[0] * n, *v.shape[1:]))
            for k, v in local.items()}


def flops_per_token(cfg: Mapping[str, Any], num_params: int, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the matmuls forward and backward, plus attention
    scores and values (12 L T d; PaLM's appendix B)."""
    return 6.0 * num_params + 12.0 * cfg["n_layer"] * seq_len * cfg["n_embd"]


def peak_flops(device) -> float | None:
    kind = getattr(device, "device_kind", "")
    return next((v for k, v in PEAK_FLOPS.items() if k in kind), None)
