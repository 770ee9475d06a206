"""Autoregressive decoding with a KV cache: one jitted prefill + a `lax.scan` over new tokens.

Every variant decodes in its plain layout; positions (and so rotary angles) are
absolute, offset by the cache length.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def sample_next(logits, key, temperature: float, top_k: int | None):
    """Next ids [B] from last-position logits [B, V]: greedy when temperature is 0."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1)
    logits = logits / temperature
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1)


def continuation(module, params, input_ids, length, key, max_new_tokens: int, temperature: float,
                 top_k: int | None):
    """New ids [B, max_new_tokens] after the first `length` tokens of input_ids [B, P] (P >= length).

    `length` may be traced: prompts padded on the right to one of a few lengths P compile once per P.
    The padding is prefilled too, but every decoding step writes its position before reading it and
    the cache's causal mask hides the positions past it, so the padding is never seen.
    """
    b, p = input_ids.shape
    cache = module.init_cache(b, p + max_new_tokens, module.dtype)
    logits, cache = module.apply({"params": params}, input_ids, cache=cache, cache_index=0)
    last = jax.lax.dynamic_index_in_dim(logits, length - 1, axis=1, keepdims=False)
    key, sub = jax.random.split(key)
    first = sample_next(last, sub, temperature, top_k).astype(input_ids.dtype)

    def step(carry, index):
        cache, token, key = carry
        key, sub = jax.random.split(key)
        logits, cache = module.apply({"params": params}, token[:, None], cache=cache, cache_index=index)
        nxt = sample_next(logits[:, -1], sub, temperature, top_k).astype(token.dtype)
        return (cache, nxt, key), token

    (_, last_token, _), tokens = jax.lax.scan(step, (cache, first, key), length + jnp.arange(max_new_tokens - 1))
    return jnp.concatenate([tokens.T, last_token[:, None]], axis=1)


def make_decoder(module, prompt_len: int, max_new_tokens: int, temperature: float, top_k: int | None):
    """A jitted fn(params, input_ids [B, T], key) -> ids [B, T + max_new_tokens]."""
    def decode(params, input_ids, key):
        new = continuation(module, params, input_ids, prompt_len, key, max_new_tokens, temperature, top_k)
        return jnp.concatenate([input_ids, new], axis=1)

    return jax.jit(decode)
