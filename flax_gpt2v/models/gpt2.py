"""The GPT-2 core in Flax linen (docs/gpt2.md), with the points where variants plug in.

The parameter tree keeps the HF names with the layers stacked: `transformer/h/attn/c_attn/kernel`
is [L, d, 3, H, Dh], and its slice i is `transformer.h.{i}.attn.c_attn.weight` (hf/keymap.py
maps the two). The forward pass applies `Block` as a pure function to slice after slice
(one lax.scan, or a Python loop with `scan=False`), so neither it nor the optimizer ever
restacks. A variant subclasses exactly one thing: `Attention` (its `setup`, `rotate_qk` or
`transform_heads`), `Transformer` (its `run_blocks`) or `GPT2LMHeadModel` (its `layout`).
Nothing here knows about any variant.

Every parameter carries logical axis names where it is made (`logical`): "layers",
"vocab", "embed", "qkv", "heads", "kv", "mlp", ...; training/sharding.py's one rules
table maps them onto the mesh. `module.init` returns them boxed (nn.Partitioned);
`models.init_params` unboxes.

Options that are not variants are fields fixed at construction: `dtype` (compute
dtype of activations and matmuls; parameters are always fp32), `remat` (what a layer
keeps for the backward pass), `scan` (the layers as one lax.scan) and the attention
kernel.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from flax_gpt2v.models import flash_attention, ops
from flax_gpt2v.config import head_dim, inner_dim, padded_vocab
from flax_gpt2v.models.variant import Variant

Dtype = Any
# The KV cache of a whole model: k and v stacked over layers, [L, B, S, H, Dh].
Cache = Optional[dict]


def normal(std: float):
    return nn.initializers.normal(stddev=std)


def logical(init, *names: str | None):
    """`init` whose parameter carries one logical axis name per array axis."""
    return nn.with_logical_partitioning(init, names)


def layer_norm(eps: float, dtype, name: str | None = None) -> nn.LayerNorm:
    return nn.LayerNorm(eps, dtype=dtype, name=name, scale_init=logical(nn.initializers.ones, "norm"),
                        bias_init=logical(nn.initializers.zeros, "norm"))


def dropout(module: nn.Module, x, rate: float, deterministic: bool):
    """`ops.dropout` of x under a seed from the module's "dropout" key (nothing when deterministic)."""
    if deterministic or not rate:
        return x
    return ops.dropout(x, rate, ops.seed_from_key(module.make_rng("dropout")))


def proj_std(cfg) -> float:
    # GPT-2 scales residual-output projections by depth (docs/gpt2.md).
    return cfg["initializer_range"] / math.sqrt(2 * cfg["n_layer"])


class Attention(nn.Module):
    cfg: dict
    dtype: Dtype = jnp.float32
    # jax.nn.dot_product_attention backend: "xla" or "cudnn" (fused, GPU, bf16/fp16 only); or "flash"
    # (models/flash_attention.py: a Pallas kernel with the attention dropout inside it).
    implementation: str = "xla"

    # Random streams this attention draws from in training; variants add theirs.
    rng_streams = ("dropout",)

    def setup(self):
        cfg = self.cfg
        std, zeros = cfg["initializer_range"], nn.initializers.zeros
        # q, k, v come out [B, T, H, Dh] each from one contraction, heads on their own axis: under
        # tensor parallelism no split of a fused [3d] axis has to move data between devices.
        self.c_attn = nn.DenseGeneral((3, cfg["n_head"], head_dim(cfg)), dtype=self.dtype,
                                      kernel_init=logical(normal(std), "embed", "qkv", "heads", "kv"),
                                      bias_init=logical(zeros, "qkv", "heads", "kv"))
        # Row-parallel: contracts the (split) heads, one all-reduce.
        self.c_proj = nn.DenseGeneral(cfg["n_embd"], axis=(-2, -1), dtype=self.dtype,
                                      kernel_init=logical(normal(proj_std(cfg)), "heads", "kv", "embed"),
                                      bias_init=logical(zeros, "embed"))

    def rotate_qk(self, q, k, positions):
        """Hook: position-dependent transform of q, k [B, T, H, Dh] before the scores."""
        return q, k

    def transform_heads(self, o, deterministic: bool):
        """Hook: transform of the per-head output [B, T, H, Dh] before heads merge."""
        return o

    def attend(self, q, k, v, mask, deterministic: bool, implementation: str):
        """softmax(q k^T / sqrt(Dh)) v over q [B, T, H, Dh], k, v [B, S, H, Dh]; mask: None for causal
        with T == S, an ops.MaskPattern (T == S) or a boolean [T, S]. Scores and softmax are fp32 in
        every path. Dropout on the probabilities (training) is `ops.dropout_keep`'s mask under a seed
        from each layer's key, the same in the flash kernel and the explicit formula."""
        rate = 0.0 if deterministic else self.cfg["attn_pdrop"]
        if rate or implementation == "flash":
            pattern = ops.CAUSAL if mask is None else mask
            seed = ops.seed_from_key(self.make_rng("dropout")) if rate else None
            if implementation == "flash":
                return flash_attention.attention(q, k, v, pattern, rate, seed)
            # No fused kernel in JAX takes dropout: the probabilities are materialised.
            return ops.explicit_attention(q, k, v, pattern, rate, seed)
        if isinstance(mask, ops.MaskPattern):
            mask = mask.matrix(q.shape[1])
        return ops.fused_attention(q, k, v, mask, implementation)

    def __call__(self, x, positions, mask, kv, cache_index, deterministic: bool):
        qkv = self.c_attn(x)  # [B, T, 3, H, Dh]
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        q, k = self.rotate_qk(q, k, positions)
        implementation = self.implementation
        if kv is not None:
            k_all = jax.lax.dynamic_update_slice(kv[0], k.astype(kv[0].dtype), (0, cache_index, 0, 0))
            v_all = jax.lax.dynamic_update_slice(kv[1], v.astype(kv[1].dtype), (0, cache_index, 0, 0))
            kv = (k_all, v_all)
            k, v = k_all.astype(q.dtype), v_all.astype(q.dtype)
            if mask is None:
                mask = ops.causal_mask(positions, jnp.arange(k.shape[1]))
            # Decoding reads a few queries against the cache: memory-bound, no fused kernel needed.
            implementation = "xla"
        o = self.attend(q, k, v, mask, deterministic, implementation)
        o = self.transform_heads(o, deterministic)
        y = self.c_proj(o)
        return dropout(self, y, self.cfg["resid_pdrop"], deterministic), kv


class MLP(nn.Module):
    cfg: dict
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, deterministic: bool):
        cfg = self.cfg
        zeros = nn.initializers.zeros
        x = nn.Dense(inner_dim(cfg), dtype=self.dtype, name="c_fc",
                     kernel_init=logical(normal(cfg["initializer_range"]), "embed", "mlp"),
                     bias_init=logical(zeros, "mlp"))(x)
        x = ops.gelu_new(x)
        x = nn.Dense(cfg["n_embd"], dtype=self.dtype, name="c_proj",
                     kernel_init=logical(normal(proj_std(cfg)), "mlp", "embed"),
                     bias_init=logical(zeros, "embed"))(x)
        return dropout(self, x, cfg["resid_pdrop"], deterministic)


class Block(nn.Module):
    cfg: dict
    attention_cls: type = Attention
    dtype: Dtype = jnp.float32
    attention_implementation: str = "xla"

    @nn.compact
    def __call__(self, x, positions, mask, kv, cache_index, deterministic: bool):
        eps = self.cfg["layer_norm_epsilon"]
        attn = self.attention_cls(self.cfg, self.dtype, self.attention_implementation, name="attn")
        a, kv = attn(layer_norm(eps, self.dtype, "ln_1")(x), positions, mask, kv, cache_index, deterministic)
        x = x + a
        x = x + MLP(self.cfg, self.dtype, name="mlp")(layer_norm(eps, self.dtype, "ln_2")(x), deterministic)
        return x, kv


# What a rematerialised layer keeps for the backward pass: "full" keeps only its input (the
# original's gradient checkpointing); "dots" also keeps the outputs of its weight matmuls,
# so the backward pass recomputes only the cheap elementwise work and attention.
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def run_layers(step, x, xs, scan: bool):
    """Fold `step(x, xs_i) -> (x, y_i)` over the leading (layer) axis of the pytree xs; the
    y_i come back stacked. `scan` runs one lax.scan: the layer is compiled once, not once per layer."""
    if scan:
        return jax.lax.scan(step, x, xs)
    ys = []
    for i in range(jax.tree.leaves(xs)[0].shape[0]):
        x, y = step(x, jax.tree.map(lambda a: a[i], xs))
        ys.append(y)
    return x, jax.tree.map(lambda *a: jnp.stack(a), *ys)


class Transformer(nn.Module):
    """`transformer/...`: embeddings, the layer stack `h`, `ln_f`; the LM head is tied to wte.

    wte has `padded_vocab(cfg)` rows so the head's matmul tiles evenly; rows from vocab_size
    on are zero, never looked up, and masked out of every logit.
    """
    cfg: dict
    attention_cls: type
    dtype: Dtype
    remat: str
    scan: bool
    attention_implementation: str

    def setup(self):
        cfg = self.cfg
        init = normal(cfg["initializer_range"])
        vocab = cfg["vocab_size"]

        def wte_init(key, shape, dtype=jnp.float32):
            return init(key, shape, dtype).at[vocab:].set(0)

        self.wte = nn.Embed(padded_vocab(cfg), cfg["n_embd"], embedding_init=logical(wte_init, "vocab", "embed"))
        self.wpe = nn.Embed(cfg["n_positions"], cfg["n_embd"], embedding_init=logical(init, "positions", "embed"))
        # The layers' parameters, stacked: leaf [L, ...] of the block's [...].
        self.h = self.param("h", self.init_layers)
        self.ln_f = layer_norm(cfg["layer_norm_epsilon"], self.dtype)

    def block(self) -> Block:
        return Block(self.cfg, self.attention_cls, self.dtype, self.attention_implementation, parent=None)

    def init_layers(self, key):
        """The parameters of n_layer blocks, each initialised from its own key, stacked on a leading
        "layers" axis (boxed with their logical names)."""
        d = self.cfg["n_embd"]
        x = jnp.zeros((1, 1, d), self.dtype)

        def one(k):
            return self.block().init(k, x, jnp.arange(1), None, None, 0, True)["params"]

        stacked = jax.vmap(one)(jax.random.split(key, self.cfg["n_layer"]))
        return jax.tree.map(lambda box: box.replace(names=("layers", *box.names)), stacked,
                            is_leaf=lambda a: isinstance(a, nn.Partitioned))

    def layer_fn(self, positions, mask, cache_index, deterministic: bool):
        """One layer as a pure function (params, x, kv, rngs) -> (x, kv), rematerialised by `remat`."""
        block = self.block()

        def layer(params, x, kv, rngs):
            return block.apply({"params": params}, x, positions, mask, kv, cache_index, deterministic, rngs=rngs)

        policy = REMAT_POLICIES[self.remat]
        return layer if policy is None else jax.checkpoint(layer, policy=policy)

    def layer_inputs(self, cache, deterministic: bool):
        """(params, kv, rngs) of the layers, each on a leading layer axis; every layer draws
        its own key from each random stream."""
        kv = None if cache is None else (cache["k"], cache["v"])
        streams = () if deterministic else self.attention_cls.rng_streams
        rngs = {s: jax.random.split(self.make_rng(s), self.cfg["n_layer"]) for s in streams if self.has_rng(s)}
        return self.h, kv, rngs

    def run_blocks(self, x, positions, mask, cache: Cache, cache_index, deterministic: bool):
        """Hook: the layer stack. Core: layer after layer, each with its slice of the cache."""
        layer = self.layer_fn(positions, mask, cache_index, deterministic)
        x, kv = run_layers(lambda x, xs: layer(xs[0], x, xs[1], xs[2]), x,
                           self.layer_inputs(cache, deterministic), self.scan)
        return x, (None if cache is None else {"k": kv[0], "v": kv[1]})

    def head(self, hidden):
        """fp32 logits [..., vocab_size] of the tied head."""
        return ops.tied_logits(hidden, self.wte.embedding, self.cfg["vocab_size"])

    def __call__(self, input_ids, positions, mask, cache: Cache, cache_index, deterministic: bool):
        x = self.wte(input_ids) + self.wpe(positions)[None]
        x = dropout(self, x, self.cfg["embd_pdrop"], deterministic).astype(self.dtype)
        x, cache = self.run_blocks(x, positions, mask, cache, cache_index, deterministic)
        return self.ln_f(x), cache


class GPT2LMHeadModel(nn.Module):
    """GPT-2 with tied LM head: fp32 logits [B, T, V], plus the updated cache when one is given.

    Construction options, fixed for the module's life: `dtype` (compute), `remat` (a
    REMAT_POLICIES key), `scan` (layers as one lax.scan) and `attention_implementation`.
    """
    cfg: dict
    dtype: Dtype = jnp.float32
    remat: str = "none"
    scan: bool = True
    attention_implementation: str = "xla"

    # Variants replace these (class attributes, not constructor options).
    attention_cls = Attention
    transformer_cls = Transformer

    def layout(self, length: int, interleaved: bool, cache_index):
        """Hook: (positions [P], mask: None for causal, or an ops.MaskPattern) of an input of `length`
        positions; P > length adds padding slots after the input (for shapes the GPU tiles), which the
        pattern hides from every position (its `seen`)."""
        if interleaved:
            raise ValueError(f"{self.cfg['model_type']} has no interleaved layout")
        return jnp.arange(length) + cache_index, None

    @nn.compact
    def __call__(self, input_ids, *, interleaved: bool = False, deterministic: bool = True,
                 cache: Cache = None, cache_index=0, return_hidden: bool = False):
        """`return_hidden` gives the final hidden states [B, T, d] (compute dtype) instead of
        logits, for losses that apply the head chunk by chunk (`ops.chunked_cross_entropy`)."""
        length = input_ids.shape[1]
        positions, mask = self.layout(length, interleaved, cache_index)
        input_ids = jnp.pad(input_ids, ((0, 0), (0, positions.shape[0] - length)))
        transformer = self.transformer_cls(self.cfg, self.attention_cls, self.dtype, self.remat, self.scan,
                                           self.attention_implementation, name="transformer")
        hidden, cache = transformer(input_ids, positions, mask, cache, cache_index, deterministic)
        hidden = hidden[:, :length]
        out = hidden if return_hidden else transformer.head(hidden)
        return out if cache is None else (out, cache)

    def init_cache(self, batch: int, size: int, dtype=jnp.float32):
        cfg = self.cfg
        shape = (cfg["n_layer"], batch, size, cfg["n_head"], head_dim(cfg))
        return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


VARIANT = Variant(
    model_type="gpt2",
    lm_class=GPT2LMHeadModel,
    architecture="GPT2LMHeadModel",
    experiments={"gpt2-medium-wikitext": {}},  # also the names of the gpt2-small smoke test
)
