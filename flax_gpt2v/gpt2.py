"""The GPT-2 core in Flax linen (SPEC 1), with the points where variants plug in.

The parameter tree mirrors the HF state dict: `transformer/h/0/attn/c_attn/kernel`
is `transformer.h.0.attn.c_attn.weight`. A variant subclasses exactly one thing:
`Attention` (its `setup`, `rotate_qk` or `transform_heads`), `Transformer` (its
`run_blocks`) or `GPT2LMHeadModel` (its `layout`). Nothing here knows about any variant.

Options that are not variants are fields fixed at construction: `dtype` (compute
dtype of activations and matmuls; parameters are always fp32) and `remat`.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from . import ops
from .config import head_dim, inner_dim

Dtype = Any
# The KV cache of a whole model: k and v stacked over layers, [L, B, S, H, Dh].
Cache = Optional[dict]


def normal(std: float):
    return nn.initializers.normal(stddev=std)


def proj_std(cfg) -> float:
    # GPT-2 scales residual-output projections by depth (SPEC 1).
    return cfg["initializer_range"] / math.sqrt(2 * cfg["n_layer"])


class Attention(nn.Module):
    cfg: dict
    dtype: Dtype = jnp.float32

    def setup(self):
        d = self.cfg["n_embd"]
        self.c_attn = nn.Dense(3 * d, dtype=self.dtype, kernel_init=normal(self.cfg["initializer_range"]))
        self.c_proj = nn.Dense(d, dtype=self.dtype, kernel_init=normal(proj_std(self.cfg)))
        self.attn_dropout = nn.Dropout(self.cfg["attn_pdrop"])
        self.resid_dropout = nn.Dropout(self.cfg["resid_pdrop"])

    def rotate_qk(self, q, k, positions):
        """Hook: position-dependent transform of q, k [B, T, H, Dh] before the scores."""
        return q, k

    def transform_heads(self, o, deterministic: bool):
        """Hook: transform of the per-head output [B, T, H, Dh] before heads merge."""
        return o

    def __call__(self, x, positions, mask, kv, cache_index, deterministic: bool):
        b, t, d = x.shape
        h = self.cfg["n_head"]
        q, k, v = jnp.split(self.c_attn(x), 3, axis=-1)
        q, k, v = (a.reshape(b, t, h, d // h) for a in (q, k, v))
        q, k = self.rotate_qk(q, k, positions)
        if kv is not None:
            k_all = jax.lax.dynamic_update_slice(kv[0], k.astype(kv[0].dtype), (0, cache_index, 0, 0))
            v_all = jax.lax.dynamic_update_slice(kv[1], v.astype(kv[1].dtype), (0, cache_index, 0, 0))
            kv = (k_all, v_all)
            k, v = k_all.astype(q.dtype), v_all.astype(q.dtype)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / math.sqrt(d // h)
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1)
        probs = self.attn_dropout(probs, deterministic=deterministic).astype(self.dtype)
        o = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
        o = self.transform_heads(o, deterministic)
        y = self.c_proj(o.reshape(b, t, d))
        return self.resid_dropout(y, deterministic=deterministic), kv


class MLP(nn.Module):
    cfg: dict
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, deterministic: bool):
        cfg = self.cfg
        x = nn.Dense(inner_dim(cfg), dtype=self.dtype, kernel_init=normal(cfg["initializer_range"]), name="c_fc")(x)
        x = ops.gelu_new(x)
        x = nn.Dense(cfg["n_embd"], dtype=self.dtype, kernel_init=normal(proj_std(cfg)), name="c_proj")(x)
        return nn.Dropout(cfg["resid_pdrop"])(x, deterministic=deterministic)


class Block(nn.Module):
    cfg: dict
    attention_cls: type = Attention
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, positions, mask, kv, cache_index, deterministic: bool):
        eps = self.cfg["layer_norm_epsilon"]
        a, kv = self.attention_cls(self.cfg, self.dtype, name="attn")(
            nn.LayerNorm(eps, dtype=self.dtype, name="ln_1")(x), positions, mask, kv, cache_index, deterministic)
        x = x + a
        x = x + MLP(self.cfg, self.dtype, name="mlp")(nn.LayerNorm(eps, dtype=self.dtype, name="ln_2")(x), deterministic)
        return x, kv


class Layers(nn.Module):
    """The `h` container: layer i's parameters live under `h/{i}`."""
    cfg: dict
    attention_cls: type
    dtype: Dtype
    remat: bool

    @nn.compact
    def __call__(self, i: int, x, positions, mask, kv, cache_index, deterministic: bool):
        # deterministic (argument 6, counting self) must stay a Python bool under remat.
        block_cls = nn.remat(Block, static_argnums=(6,)) if self.remat else Block
        return block_cls(self.cfg, self.attention_cls, self.dtype, name=str(i))(
            x, positions, mask, kv, cache_index, deterministic)


class Transformer(nn.Module):
    """`transformer/...`: embeddings, the layer stack `h`, `ln_f`; the LM head is tied to wte."""
    cfg: dict
    attention_cls: type
    dtype: Dtype
    remat: bool

    def setup(self):
        init = normal(self.cfg["initializer_range"])
        self.wte = nn.Embed(self.cfg["vocab_size"], self.cfg["n_embd"], embedding_init=init)
        self.wpe = nn.Embed(self.cfg["n_positions"], self.cfg["n_embd"], embedding_init=init)
        self.drop = nn.Dropout(self.cfg["embd_pdrop"])
        self.h = Layers(self.cfg, self.attention_cls, self.dtype, self.remat)
        self.ln_f = nn.LayerNorm(self.cfg["layer_norm_epsilon"], dtype=self.dtype)

    def run_blocks(self, x, positions, mask, cache: Cache, cache_index, deterministic: bool):
        """Hook: the layer stack. Core: layer after layer, each with its slice of the cache."""
        new_k, new_v = [], []
        for i in range(self.cfg["n_layer"]):
            kv = None if cache is None else (cache["k"][i], cache["v"][i])
            x, kv = self.h(i, x, positions, mask, kv, cache_index, deterministic)
            if kv is not None:
                new_k.append(kv[0])
                new_v.append(kv[1])
        return x, (None if cache is None else {"k": jnp.stack(new_k), "v": jnp.stack(new_v)})

    def __call__(self, input_ids, positions, mask, cache: Cache, cache_index, deterministic: bool):
        x = self.wte(input_ids) + self.wpe(positions)[None]
        x = self.drop(x, deterministic=deterministic).astype(self.dtype)
        x, cache = self.run_blocks(x, positions, mask, cache, cache_index, deterministic)
        x = self.ln_f(x)
        # Tied head; fp32 logits so losses and sampling never see bf16 rounding.
        return self.wte.attend(x.astype(self.dtype)).astype(jnp.float32), cache


class GPT2LMHeadModel(nn.Module):
    """GPT-2 with tied LM head: fp32 logits [B, T, V], plus the updated cache when one is given."""
    cfg: dict
    dtype: Dtype = jnp.float32
    remat: bool = False

    # Variants replace these (class attributes, not constructor options).
    attention_cls = Attention
    transformer_cls = Transformer

    def layout(self, length: int, interleaved: bool, cache_index):
        """Hook: (positions [T], mask [T, S] or None for causal) of the input."""
        if interleaved:
            raise ValueError(f"{self.cfg['model_type']} has no interleaved layout; only duo-predict-gpt2 has")
        return jnp.arange(length) + cache_index, None

    @nn.compact
    def __call__(self, input_ids, *, interleaved: bool = False, deterministic: bool = True,
                 cache: Cache = None, cache_index=0):
        t = input_ids.shape[1]
        positions, mask = self.layout(t, interleaved, cache_index)
        if mask is None:
            keys = jnp.arange(t if cache is None else cache["k"].shape[2])
            mask = ops.causal_mask(positions, keys)
        transformer = self.transformer_cls(self.cfg, self.attention_cls, self.dtype, self.remat, name="transformer")
        logits, cache = transformer(input_ids, positions, mask, cache, cache_index, deterministic)
        return logits if cache is None else (logits, cache)

    def init_cache(self, batch: int, size: int, dtype=jnp.float32):
        cfg = self.cfg
        shape = (cfg["n_layer"], batch, size, cfg["n_head"], head_dim(cfg))
        return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
