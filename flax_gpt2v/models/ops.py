"""Pure functions for the math the models share: masks, positions, rotary, losses.

Masks are boolean, True where a query may attend to a key, shaped [Tq, Tk].
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

IGNORE = -100


def gelu_new(x):
    """GPT-2's tanh approximation of GELU."""
    return 0.5 * x * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def causal_mask(q_positions, k_positions):
    """Each query sees keys at its own position or earlier (absolute positions, so a
    KV cache of any length works: unwritten slots lie in the future)."""
    return k_positions[None, :] <= q_positions[:, None]


# The interleaved layout's length is padded to a multiple of this (2L - 1 = 1023 rows per sequence do not
# compile for the H100 with Triton gemms, and cuDNN trains masked attention on even lengths only); the
# padding slots are seen by no other position and their outputs are dropped.
DUO_LENGTH_MULTIPLE = 8


def duo_padded_length(length: int) -> int:
    return -(-length // DUO_LENGTH_MULTIPLE) * DUO_LENGTH_MULTIPLE


def duo_positions(length: int, seen: int | None = None):
    """Interleaved layout x0, M, x1, M, ...: index 2m and 2m+1 both use position m; padding slots
    (from index `seen` on) use position 0, so that they never index past the position table."""
    index = jnp.arange(length)
    return jnp.where(index < (length if seen is None else seen), index // 2, 0)


def duo_allowed(q_index, k_index):
    """docs/variants/duo-predict-gpt2.md attention pattern over the interleaved layout, between
    query indices [Tq] and key indices [Tk].

    A real token (index 2m) sees real tokens x_0..x_m. The mask after x_m (index
    2m+1) sees x_0..x_{m-1}, itself and the next real token x_{m+1}, never x_m.
    """
    q, k = q_index[:, None], k_index[None, :]
    q_real, k_real = q % 2 == 0, k % 2 == 0
    qm, km = q // 2, k // 2
    real_query = q_real & k_real & (km <= qm)
    mask_query = ~q_real & ((k_real & (km <= qm - 1)) | (k == q) | (k_real & (km == qm + 1)))
    return real_query | mask_query


@dataclasses.dataclass(frozen=True)
class MaskPattern:
    """A self-attention mask as a function of indices, so that a blockwise kernel computes each tile
    of it where it needs it (models/flash_attention.py) instead of reading a [T, T] array.

    `allowed(q_index [Tq], k_index [Tk]) -> bool [Tq, Tk]`; `reach`: no query q sees a key beyond
    index q + reach (the tiles a kernel may skip); `seen`: keys from this index on are padding that no
    query sees (None: no padding).
    """
    allowed: Callable
    reach: int
    seen: int | None = None

    def visible(self, q_index, k_index):
        """`allowed`, less the padding keys: bool [Tq, Tk]."""
        mask = self.allowed(q_index, k_index)
        return mask if self.seen is None else mask & (k_index < self.seen)[None, :]

    def matrix(self, length: int):
        """The mask [length, length] of a whole sequence."""
        return self.visible(jnp.arange(length), jnp.arange(length))


CAUSAL = MaskPattern(causal_mask, reach=0)
# The mask after x_m sees x_{m+1}, one index past itself.
DUO = MaskPattern(duo_allowed, reach=1)


def duo_mask(length: int, seen: int | None = None):
    """`duo_allowed` over a whole interleaved sequence: [length, length]; keys from index `seen` on
    (padding) are seen by no query."""
    return dataclasses.replace(DUO, seen=seen).matrix(length)


def fused_attention(q, k, v, mask, implementation: str):
    """softmax(q k^T / sqrt(Dh)) v with `jax.nn.dot_product_attention`; q [B, T, H, Dh],
    k, v [B, S, H, Dh], mask [T, S] or None for causal (T == S)."""
    if mask is None:
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=implementation)
    return jax.nn.dot_product_attention(q, k, v, mask=mask[None, None], implementation=implementation)


# ---------------------------------------------------------------- dropout, a pure function
# Which elements dropout drops is a hash of (seed, the element's indices): for attention
# (seed, batch, head, query, key), so a blockwise kernel (models/flash_attention.py) regenerates any
# tile of the mask in its backward pass, and the explicit formula draws the very same mask. On a
# CPU it is also far cheaper than drawing threefry bits (README's Speed).

# A finite "minus infinity" for masked scores: exp of it minus any real score is exactly 0, and a
# tile with every score masked still has a finite maximum (so no inf - inf).
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


def _rotl(x, r: int):
    return (x << np.uint32(r)) | (x >> np.uint32(32 - r))


def _absorb(h, word):
    """MurmurHash3 (x86, 32-bit): mix one 32-bit word into the state h."""
    word = _rotl(word * np.uint32(0xCC9E2D51), 15) * np.uint32(0x1B873593)
    return _rotl(h ^ word, 13) * np.uint32(5) + np.uint32(0xE6546B64)


def _finish(h, n_words: int):
    """MurmurHash3's finaliser: every input bit flips each output bit with probability about 1/2."""
    h = h ^ np.uint32(4 * n_words)
    h = (h ^ (h >> np.uint32(16))) * np.uint32(0x85EBCA6B)
    h = (h ^ (h >> np.uint32(13))) * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


def dropout_bits(seed, *words):
    """MurmurHash3_32 of the 32-bit words under `seed`: uint32, broadcast over the words (integer
    arrays or scalars). Attention's words are (batch, head, query, key): inside the kernel, query is
    a column of indices and key a row, so a tile's bits come out [block_q, block_k]."""
    h = jnp.asarray(seed).astype(jnp.uint32)
    for word in words:
        h = _absorb(h, jnp.asarray(word).astype(jnp.uint32))
    return _finish(h, len(words))


def drop_threshold(rate: float):
    """Bits below this are dropped: P(drop) = threshold / 2**32, rate rounded to 2**-32."""
    return np.uint32(min(round(rate * 2.0 ** 32), 2 ** 32 - 1))


def dropout_keep(seed, rate: float, *words):
    """True where dropout keeps the element indexed by `words` (attention: batch, head, query, key)."""
    return dropout_bits(seed, *words) >= drop_threshold(rate)


def dropout(x, rate: float, seed):
    """x with each element dropped at `rate` and the kept ones scaled by 1 / (1 - rate), as nn.Dropout;
    the mask is `dropout_keep` of the element's indices, one word per axis."""
    indices = [jax.lax.broadcasted_iota(jnp.uint32, x.shape, axis) for axis in range(x.ndim)]
    return jnp.where(dropout_keep(seed, rate, *indices), x / (1.0 - rate), 0.0).astype(x.dtype)


def seed_from_key(key):
    """A dropout seed (uint32 scalar) drawn from a JAX random key."""
    return jax.random.bits(key, (), jnp.uint32)


def explicit_attention(q, k, v, pattern: MaskPattern = CAUSAL, dropout_rate: float = 0.0, seed=None):
    """dropout(softmax(q k^T / sqrt(Dh) masked by `pattern`)) v for q, k, v [B, T, H, Dh], written out
    with the [B, H, T, T] scores; fp32 scores and softmax, the probabilities cast to v's dtype for the
    product. Dropout as torch's SDPA applies it (on the probabilities, the kept ones scaled by
    1 / (1 - rate)), its mask `dropout_keep` under `seed`: the one the flash kernel draws tile by tile."""
    b, t, h, d = q.shape
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) / math.sqrt(d)
    probs = jax.nn.softmax(jnp.where(pattern.matrix(t), scores, MASK_VALUE), axis=-1)
    if dropout_rate:
        index = jnp.arange(t)
        keep = dropout_keep(seed, dropout_rate, jnp.arange(b)[:, None, None, None], jnp.arange(h)[None, :, None, None],
                            index[:, None], index[None, :])
        probs = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0)
    return jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32).astype(q.dtype)


def interleave(tokens, mask_token_id: int):
    """Plain token blocks [B, L] -> interleaved inputs [B, 2L-1] with mask ids at odd indices."""
    tokens = jnp.asarray(tokens)
    b, n = tokens.shape
    out = jnp.full((b, 2 * n - 1), mask_token_id, dtype=tokens.dtype)
    return out.at[:, ::2].set(tokens)


def duo_targets(tokens, loss: str = "dual"):
    """Targets [B, 2L-1] for the interleaved layout of `tokens` [B, L]; IGNORE where none.

    "dual" (this project's default, docs/variants/duo-predict-gpt2.md): index 2m predicts x_{m+1}, index 2m+1
    predicts x_m (the token hidden between its context and right neighbour).
    "original": what the original actually trained after HF's extra causal shift:
    index 2m -> x_m (a copy of itself) and index 2m+1 -> x_{m+2}.
    """
    tokens = jnp.asarray(tokens)
    b, n = tokens.shape
    t = jnp.full((b, 2 * n - 1), IGNORE, dtype=jnp.int32)
    x = tokens.astype(jnp.int32)
    if loss == "dual":
        return t.at[:, 0:-1:2].set(x[:, 1:]).at[:, 1::2].set(x[:, :-1])
    if loss == "original":
        return t.at[:, 0:-1:2].set(x[:, :-1]).at[:, 1:-2:2].set(x[:, 2:])
    raise ValueError(f"duo loss must be 'dual' or 'original', got {loss!r}")


def next_token_targets(tokens):
    """Causal-LM targets [B, T]: position t predicts token t+1; the last has none."""
    tokens = jnp.asarray(tokens).astype(jnp.int32)
    return jnp.concatenate([tokens[:, 1:], jnp.full_like(tokens[:, :1], IGNORE)], axis=1)


def scored(logits, targets):
    """`cross_entropy`'s sums, and the softmax [..., V] they came from."""
    logits = logits.astype(jnp.float32)
    valid = targets != IGNORE
    safe = jnp.where(valid, targets, 0)
    top = jax.lax.stop_gradient(logits.max(axis=-1, keepdims=True))
    exp = jnp.exp(logits - top)
    total = exp.sum(axis=-1, keepdims=True)
    gold = jnp.take_along_axis(logits, safe[..., None], axis=-1)
    nll = jnp.where(valid, (top + jnp.log(total) - gold)[..., 0], 0.0)
    # The target scoring the max is argmax's answer except on exact ties, without a second pass over V.
    correct = valid & (gold >= top)[..., 0]
    return (nll.sum(), valid.sum(), correct.sum()), exp / total


def cross_entropy(logits, targets):
    """Summed token cross-entropy (fp32), number of scored tokens, and how many targets score
    the max logit (argmax accuracy; an exact tie counts as correct).

    Returned as sums so that callers can average over any grouping (batches,
    accumulation steps, devices) exactly.
    """
    return scored(logits, targets)[0]


def tied_logits(hidden, embedding, vocab_size: int):
    """fp32 logits [..., vocab_size] of the head tied to `embedding` [V_padded, d].

    The matmul runs in the hidden states' dtype with fp32 accumulation and output, so
    losses and sampling never see bf16-rounded logits.
    """
    logits = jnp.einsum("...d,vd->...v", hidden, embedding.astype(hidden.dtype), preferred_element_type=jnp.float32)
    return logits[..., :vocab_size]


def chunked_cross_entropy(hidden, embedding, targets, vocab_size: int, chunk_len: int):
    """`cross_entropy(tied_logits(hidden, embedding, vocab_size), targets)` without ever
    holding the fp32 logits [B, T, V] at once.

    The sequence axis is cut into chunks of `chunk_len` positions (the batch axis stays
    whole, so its sharding is untouched) and a scan scores one chunk at a time. Under
    differentiation the same pass also computes the gradients of the nll sum (the loss is
    linear in it), so the backward pass only scales them: the logits are computed once per
    step, not again for the backward, and the embedding's gradient is summed over chunks
    in fp32.
    """
    return _chunked_scores(hidden, embedding, targets, vocab_size, chunk_len, with_grads=False)[0]


def _chunked_scores(hidden, embedding, targets, vocab_size: int, chunk_len: int, with_grads: bool):
    """(sums, (d nll / d hidden, d nll / d embedding) or None) over chunks of the sequence."""
    b, t, d = hidden.shape
    n = -(-t // chunk_len)
    pad = n * chunk_len - t
    chunks = (jnp.pad(hidden, ((0, 0), (0, pad), (0, 0))).reshape(b, n, chunk_len, d).swapaxes(0, 1),
              jnp.pad(targets, ((0, 0), (0, pad)), constant_values=IGNORE).reshape(b, n, chunk_len).swapaxes(0, 1))
    weights = embedding.astype(hidden.dtype)
    # Padding rows of the vocabulary are pushed out of the softmax, not sliced off (slices of V
    # break the tiling); a bias, unlike a select, adds no work to the gradient.
    bias = jnp.where(jnp.arange(embedding.shape[0]) < vocab_size, 0.0, jnp.finfo(jnp.float32).min)

    def step(carry, chunk):
        sums, d_embedding = carry
        h, tgt = chunk
        logits = jnp.einsum("btd,vd->btv", h, weights, preferred_element_type=jnp.float32) + bias
        chunk_sums, probs = scored(logits, tgt)
        sums = jax.tree.map(jnp.add, sums, chunk_sums)
        if not with_grads:
            return (sums, d_embedding), None
        d_logits = (probs - jax.nn.one_hot(tgt, embedding.shape[0], dtype=probs.dtype)) * (tgt != IGNORE)[..., None]
        d_logits = d_logits.astype(weights.dtype)
        d_h = jnp.einsum("btv,vd->btd", d_logits, weights, preferred_element_type=jnp.float32).astype(hidden.dtype)
        d_embedding += jnp.einsum("btv,btd->vd", d_logits, h, preferred_element_type=jnp.float32)
        return (sums, d_embedding), d_h

    zeros = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))
    d_embedding = jnp.zeros(embedding.shape, jnp.float32) if with_grads else None
    (sums, d_embedding), d_hidden = jax.lax.scan(step, (zeros, d_embedding), chunks)
    if not with_grads:
        return sums, None
    d_hidden = d_hidden.swapaxes(0, 1).reshape(b, n * chunk_len, d)[:, :t]
    return sums, (d_hidden, d_embedding.astype(embedding.dtype))


def _chunked_forward(hidden, embedding, targets, vocab_size, chunk_len):
    return _chunked_scores(hidden, embedding, targets, vocab_size, chunk_len, with_grads=True)


def _chunked_backward(vocab_size, chunk_len, grads, cotangents):
    d_hidden, d_embedding = grads
    g = cotangents[0]  # the counts are integers: only the nll sum carries a gradient
    return (g * d_hidden).astype(d_hidden.dtype), (g * d_embedding).astype(d_embedding.dtype), None


chunked_cross_entropy = jax.custom_vjp(chunked_cross_entropy, nondiff_argnums=(3, 4))
chunked_cross_entropy.defvjp(_chunked_forward, _chunked_backward)


def gp_frequencies(n_head: int, head_dim: int, base_frequency: float, scales: str = "code"):
    """Fixed GP rotary frequencies [H, Dh/2] (docs/variants/rotating-head-gpt2.md).

    "code": scale_h = 10 ** (-h / (H - 1)), as the original code and its Hub
    checkpoints; "seed": exp(linspace(0, 1, H)), as the seed page wrote it.
    """
    if scales == "code":
        h = np.arange(n_head, dtype=np.float64)
        scale = 10.0 ** (-h / (n_head - 1)) if n_head > 1 else np.ones(1)
    elif scales == "seed":
        scale = np.exp(np.linspace(0.0, 1.0, n_head))
    else:
        raise ValueError(f"gp scales must be 'code' or 'seed', got {scales!r}")
    base = base_frequency ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    return jnp.asarray(scale[:, None] * base[None, :], dtype=jnp.float32)


def rotate_interleaved(x, positions, frequencies):
    """Rotate pairs (x[2i], x[2i+1]) of x [B, T, H, Dh] by angle position * f[h, i].

    positions: [T] absolute positions (cache offset included); frequencies [H, Dh/2].
    Computed in fp32 and cast back, since bf16 angles lose whole turns at long range.
    """
    angle = positions.astype(jnp.float32)[:, None, None] * frequencies.astype(jnp.float32)[None]
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    xf = x.astype(jnp.float32)
    even, odd = xf[..., 0::2], xf[..., 1::2]
    rot_even = even * cos - odd * sin
    rot_odd = even * sin + odd * cos
    return jnp.stack([rot_even, rot_odd], axis=-1).reshape(x.shape).astype(x.dtype)
