"""Self-attention with dropout on the probabilities that never holds the scores [B, H, T, T]
(docs/flash-attention.md): a Pallas flash-attention kernel, forward and backward.

o = dropout(softmax(q k^T / sqrt(Dh) + mask)) v, dropout as torch's SDPA applies it: on the
probabilities, after the softmax (whose normaliser sums the un-dropped probabilities), the kept
ones scaled by 1 / (1 - rate). Each program of the grid holds one block of queries (or keys) and
walks over the blocks of the other side, so memory is linear in T forward and backward: the
forward pass keeps an online softmax and saves the log-sum-exp of each row, which the backward
pass uses to recompute each tile of probabilities.

The dropout mask is never stored: which (query, key) pairs of a head are dropped is a pure
function of (seed, batch, head, query index, key index), `ops.dropout_bits`, so the backward pass
regenerates the forward's mask tile by tile, and the explicit formula (`ops.explicit_attention`,
which trains without the kernel) draws the very same mask. The attention mask is an
`ops.MaskPattern`, computed per tile from indices as well.

On a GPU the kernels lower to Triton; on the CPU they run in Pallas' interpreter (for the tests;
slow). Which one is decided when the computation is lowered for its platform, so a CPU machine can
also compile the GPU program ahead of time.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from flax_gpt2v.models import ops

# ---------------------------------------------------------------- the kernels

@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes (queries, keys), powers of two >= 16 (Triton's smallest matmul). `forward` for the
    forward pass, `backward` for both backward kernels (dk, dv over key blocks; dq over query blocks)."""
    # Untuned (no GPU has run them yet): FlashAttention-2's Triton tiles for Dh = 64.
    forward: tuple[int, int] = (128, 64)
    backward: tuple[int, int] = (64, 64)

    def padded_length(self, length: int) -> int:
        """The sequence padded to a whole number of every block (all powers of two: the largest)."""
        block = max(*self.forward, *self.backward)
        return -(-length // block) * block


@dataclasses.dataclass(frozen=True)
class _Static:
    """What the kernels are compiled for (hashable: the custom_vjp's non-differentiable argument)."""
    pattern: ops.MaskPattern
    length: int  # the real sequence length; indices from it on are padding, never attended
    rate: float
    scale: float
    blocks: BlockSizes


def _tile(st: _Static, seed, batch, head, rows, cols, q, k):
    """Scores of one tile, masked [len(rows), len(cols)] fp32; and the dropout factor of each
    probability (0 or 1 / (1 - rate)), or None without dropout."""
    s = pl.dot(q, k, trans_b=True) * st.scale
    allowed = st.pattern.visible(rows, cols) & (cols < st.length)[None, :]
    s = jnp.where(allowed, s, ops.MASK_VALUE)
    if not st.rate:
        return s, None
    keep = ops.dropout_keep(seed, st.rate, batch, head, rows[:, None], cols[None, :])
    return s, jnp.where(keep, 1.0 / (1.0 - st.rate), 0.0)


def _last_key_block(st: _Static, first_row, block_q: int, block_k: int, n_blocks: int):
    """How many key blocks the queries [first_row, first_row + block_q) may see under the pattern."""
    last_key = first_row + block_q - 1 + st.pattern.reach
    return jnp.minimum(jax.lax.div(last_key, block_k) + 1, n_blocks)


def _forward_kernel(seed_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, st: _Static):
    block_q, block_k = st.blocks.forward
    i, batch, head = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    seed = seed_ref[()]
    q = q_ref[...]
    rows = i * block_q + jnp.arange(block_q)

    def body(j, carry):
        acc, m, l = carry
        cols = j * block_k + jnp.arange(block_k)
        k, v = k_ref[pl.ds(j * block_k, block_k), :], v_ref[pl.ds(j * block_k, block_k), :]
        s, factor = _tile(st, seed, batch, head, rows, cols, q, k)
        m_new = jnp.maximum(m, s.max(axis=1))
        correction = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new[:, None])
        # The normaliser sums the probabilities before dropout.
        l = l * correction + p.sum(axis=1)
        if factor is not None:
            p = p * factor
        acc = acc * correction[:, None] + pl.dot(p.astype(v.dtype), v)
        return acc, m_new, l

    n_blocks = k_ref.shape[0] // block_k
    init = (jnp.zeros(q.shape, jnp.float32), jnp.full((block_q,), -jnp.inf, jnp.float32),
            jnp.zeros((block_q,), jnp.float32))
    acc, m, l = jax.lax.fori_loop(0, _last_key_block(st, i * block_q, block_q, block_k, n_blocks), body, init)
    o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
    lse_ref[...] = m + jnp.log(l)


def _dkv_kernel(seed_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *, st: _Static):
    """dk, dv of one block of keys, over the query blocks that may see it."""
    block_q, block_k = st.blocks.backward
    j, batch, head = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    seed = seed_ref[()]
    k, v = k_ref[...], v_ref[...]
    cols = j * block_k + jnp.arange(block_k)

    def body(i, carry):
        dk, dv = carry
        rows = i * block_q + jnp.arange(block_q)
        here = pl.ds(i * block_q, block_q)
        q, do = q_ref[here, :], do_ref[here, :]
        s, factor = _tile(st, seed, batch, head, rows, cols, q, k)
        p = jnp.exp(s - lse_ref[here][:, None])
        dp = pl.dot(do, v, trans_b=True)
        if factor is not None:
            p_kept, dp = p * factor, dp * factor
        else:
            p_kept = p
        dv = dv + pl.dot(p_kept.astype(do.dtype), do, trans_a=True)
        ds = p * (dp - delta_ref[here][:, None])
        dk = dk + pl.dot(ds.astype(q.dtype), q, trans_a=True)
        return dk, dv

    # Queries that may see key index c: c - reach and later.
    first = jax.lax.div(jnp.maximum(j * block_k - st.pattern.reach, 0), block_q)
    init = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    dk, dv = jax.lax.fori_loop(first, q_ref.shape[0] // block_q, body, init)
    dk_ref[...] = (dk * st.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(seed_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, *, st: _Static):
    """dq of one block of queries, over the key blocks it may see."""
    block_q, block_k = st.blocks.backward
    i, batch, head = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    seed = seed_ref[()]
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]
    rows = i * block_q + jnp.arange(block_q)

    def body(j, dq):
        cols = j * block_k + jnp.arange(block_k)
        k, v = k_ref[pl.ds(j * block_k, block_k), :], v_ref[pl.ds(j * block_k, block_k), :]
        s, factor = _tile(st, seed, batch, head, rows, cols, q, k)
        p = jnp.exp(s - lse[:, None])
        dp = pl.dot(do, v, trans_b=True)
        if factor is not None:
            dp = dp * factor
        ds = p * (dp - delta[:, None])
        return dq + pl.dot(ds.astype(k.dtype), k)

    n_blocks = k_ref.shape[0] // block_k
    dq = jax.lax.fori_loop(0, _last_key_block(st, i * block_q, block_q, block_k, n_blocks), body,
                           jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * st.scale).astype(dq_ref.dtype)


def _pallas(kernel, st: _Static, grid, in_specs, out_specs, out_shape, name: str, num_warps: int):
    """`pl.pallas_call` lowered to Triton on a GPU, to Pallas' interpreter on the CPU."""
    def call(*args, interpret: bool):
        return pl.pallas_call(functools.partial(kernel, st=st), grid=grid, in_specs=in_specs, out_specs=out_specs,
                              out_shape=out_shape, interpret=interpret, name=name,
                              compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=2))(*args)

    return lambda *args: jax.lax.platform_dependent(*args, cpu=functools.partial(call, interpret=True),
                                                    default=functools.partial(call, interpret=False))


def _specs(block: int, length: int, d: int):
    """BlockSpecs over [B, T, H, D] and [B, H, T] for a grid (block index, batch, head): one block of
    the sequence, and the whole sequence (walked over inside the kernel)."""
    return (pl.BlockSpec((None, block, None, d), lambda n, b, h: (b, n, h, 0)),
            pl.BlockSpec((None, length, None, d), lambda n, b, h: (b, 0, h, 0)),
            pl.BlockSpec((None, None, block), lambda n, b, h: (b, h, n)),
            pl.BlockSpec((None, None, length), lambda n, b, h: (b, h, 0)))


SEED_SPEC = pl.BlockSpec((), lambda n, b, h: ())


def _num_warps(block_q: int, block_k: int, d: int) -> int:
    return 4 if block_q * block_k <= 128 * 64 and d <= 64 else 8


def _forward(q, k, v, seed, st: _Static):
    b, t, h, d = q.shape
    block_q, block_k = st.blocks.forward
    block, whole, rows, _ = _specs(block_q, t, d)
    call = _pallas(_forward_kernel, st, (t // block_q, b, h), [SEED_SPEC, block, whole, whole], [block, rows],
                   [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, h, t), jnp.float32)],
                   "flash_attention_forward", _num_warps(block_q, block_k, d))
    return call(seed, q, k, v)


def _backward(q, k, v, seed, o, lse, do, st: _Static):
    b, t, h, d = q.shape
    block_q, block_k = st.blocks.backward
    # D_i = sum_j dP_ij P_ij = do_i . o_i, with o the dropped output (docs/flash-attention.md).
    delta = jnp.einsum("bthd,bthd->bht", o.astype(jnp.float32), do.astype(jnp.float32))
    warps = _num_warps(block_q, block_k, d)
    key_block, whole, _, whole_rows = _specs(block_k, t, d)
    dk, dv = _pallas(_dkv_kernel, st, (t // block_k, b, h),
                     [SEED_SPEC, whole, key_block, key_block, whole, whole_rows, whole_rows], [key_block, key_block],
                     [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
                     "flash_attention_dkv", warps)(seed, q, k, v, do, lse, delta)
    query_block, whole, rows, _ = _specs(block_q, t, d)
    dq = _pallas(_dq_kernel, st, (t // block_q, b, h),
                 [SEED_SPEC, query_block, whole, whole, query_block, rows, rows], query_block,
                 jax.ShapeDtypeStruct(q.shape, q.dtype), "flash_attention_dq", warps)(seed, q, k, v, do, lse, delta)
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q, k, v, seed, st: _Static):
    return _forward(q, k, v, seed, st)[0]


def _attention_forward(q, k, v, seed, st: _Static):
    o, lse = _forward(q, k, v, seed, st)
    return o, (q, k, v, seed, o, lse)


def _attention_backward(st: _Static, residuals, do):
    q, k, v, seed, o, lse = residuals
    return (*_backward(q, k, v, seed, o, lse, do, st), None)


_attention.defvjp(_attention_forward, _attention_backward)


def attention(q, k, v, pattern: ops.MaskPattern = ops.CAUSAL, dropout_rate: float = 0.0, seed=None,
              blocks: BlockSizes = BlockSizes()):
    """dropout(softmax(q k^T / sqrt(Dh) masked by `pattern`)) v, for q, k, v [B, T, H, Dh] (bf16 or
    fp32; scores, softmax and accumulators fp32), differentiable in q, k, v.

    `seed` (a uint32 scalar, `seed_from_key`) picks the dropout mask; it is needed only when
    `dropout_rate` > 0. The sequence is padded to whole blocks and Dh to a power of two >= 16 (zeros:
    no score or output changes); padded keys are never attended.
    """
    b, t, h, d = q.shape
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"flash attention is self-attention: q, k, v must have one shape, got "
                         f"{q.shape}, {k.shape}, {v.shape}")
    if not 0.0 <= dropout_rate < 1.0:
        raise ValueError(f"dropout rate must be in [0, 1), got {dropout_rate}")
    if dropout_rate and seed is None:
        raise ValueError("dropout needs a seed")
    st = _Static(pattern, t, float(dropout_rate), 1.0 / math.sqrt(d), blocks)
    t_pad, d_pad = blocks.padded_length(t), max(16, pl.next_power_of_2(d))
    pad = ((0, 0), (0, t_pad - t), (0, 0), (0, d_pad - d))
    seed = jnp.zeros((), jnp.uint32) if seed is None else jnp.asarray(seed, jnp.uint32)
    o = _attention(*(jnp.pad(a, pad) for a in (q, k, v)), seed, st)
    return o[:, :t, :, :d]
