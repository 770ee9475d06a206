"""Unit and property tests of the pure math in flax_gpt2v.models.ops."""
import struct

import jax
import jax.numpy as jnp
import mmh3
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flax_gpt2v.models import ops


def test_gelu_new_is_tanh_gelu():
    x = jnp.linspace(-6, 6, 101)
    np.testing.assert_allclose(ops.gelu_new(x), jax.nn.gelu(x, approximate=True), atol=1e-6)


@given(st.integers(1, 40), st.integers(0, 30))
@settings(max_examples=15, deadline=None)
def test_causal_mask_with_offset(t, offset):
    q = jnp.arange(t) + offset
    mask = np.asarray(jax.jit(ops.causal_mask)(q, jnp.arange(t + offset)))
    for i in range(t):
        assert mask[i].tolist() == [k <= i + offset for k in range(t + offset)]


@given(st.integers(1, 40))
@settings(max_examples=20, deadline=None)
def test_duo_mask_follows_spec(n_real):
    length = 2 * n_real - 1
    # Jitted as the model calls it; eagerly each length would compile every op on its own.
    mask = np.asarray(jax.jit(ops.duo_mask, static_argnums=0)(length))
    for q in range(length):
        m = q // 2
        if q % 2 == 0:
            allowed = {2 * n for n in range(m + 1)}
        else:
            allowed = {2 * n for n in range(m)} | {q} | ({2 * (m + 1)} if 2 * (m + 1) < length else set())
        assert set(np.flatnonzero(mask[q]).tolist()) == allowed, q
    # Real tokens never see masks; a mask never sees the token it stands after.
    assert not mask[0::2, 1::2].any()
    assert not any(mask[2 * m + 1, 2 * m] for m in range(n_real - 1))


@given(st.integers(2, 40))
@settings(max_examples=5, deadline=None)
def test_mask_patterns_reach(n_real):
    """A pattern's matrix is its mask; no query sees past its own index + reach (the tiles a blockwise
    kernel skips), and duo's mask after x_m does reach x_{m+1}."""
    length = 2 * n_real - 1
    duo, causal = (jax.jit(p.matrix, static_argnums=0)(length) for p in (ops.DUO, ops.CAUSAL))
    np.testing.assert_array_equal(duo, jax.jit(ops.duo_mask, static_argnums=0)(length))
    np.testing.assert_array_equal(causal, np.tril(np.ones((length, length), bool)))
    for matrix, pattern in ((causal, ops.CAUSAL), (duo, ops.DUO)):
        q, k = np.nonzero(np.asarray(matrix))
        assert (k - q).max() == pattern.reach


def test_duo_positions():
    assert ops.duo_positions(7).tolist() == [0, 0, 1, 1, 2, 2, 3]
    assert ops.duo_positions(8, seen=7).tolist() == [0, 0, 1, 1, 2, 2, 3, 0]


@pytest.mark.parametrize("n_real", [1, 4, 5, 512])
def test_duo_padding_slots_are_unseen(n_real):
    """The padded layout (a multiple of 8) is the unpadded one plus keys no query sees."""
    length = 2 * n_real - 1
    padded = ops.duo_padded_length(length)
    assert padded % ops.DUO_LENGTH_MULTIPLE == 0 and 0 < padded - length <= ops.DUO_LENGTH_MULTIPLE
    mask = np.asarray(ops.duo_mask(padded, seen=length))
    np.testing.assert_array_equal(mask[:length, :length], ops.duo_mask(length))
    assert not mask[:, length:].any()


def test_interleave_and_duo_targets():
    x = jnp.array([[10, 11, 12, 13]])
    assert ops.interleave(x, 99).tolist() == [[10, 99, 11, 99, 12, 99, 13]]
    I = ops.IGNORE
    # dual: index 2m -> x_{m+1}; index 2m+1 -> x_m.
    assert ops.duo_targets(x, "dual").tolist() == [[11, 10, 12, 11, 13, 12, I]]
    # original: index 2m -> x_m; index 2m+1 -> x_{m+2}.
    assert ops.duo_targets(x, "original").tolist() == [[10, 12, 11, 13, 12, I, I]]
    with pytest.raises(ValueError, match="duo loss"):
        ops.duo_targets(x, "other")


def test_original_duo_loss_is_hf_shift_of_collator_labels():
    """The 'original' targets are the original collator's labels shifted once more, as HF's loss does."""
    x = np.random.default_rng(0).integers(0, 50, (3, 9))
    collator = np.asarray(ops.duo_targets(x, "dual"))
    shifted = np.concatenate([collator[:, 1:], np.full((3, 1), ops.IGNORE)], axis=1)
    np.testing.assert_array_equal(np.asarray(ops.duo_targets(x, "original")), shifted)


def test_next_token_targets():
    assert ops.next_token_targets(jnp.array([[1, 2, 3]])).tolist() == [[2, 3, ops.IGNORE]]


def test_cross_entropy_sums():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((2, 5, 7)).astype(np.float32)
    targets = rng.integers(0, 7, (2, 5))
    targets[1, 3:] = ops.IGNORE
    nll, count, correct = ops.cross_entropy(jnp.asarray(logits), jnp.asarray(targets))
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    valid = targets != ops.IGNORE
    expected = -sum(logp[b, t, targets[b, t]] for b, t in zip(*np.nonzero(valid)))
    assert int(count) == valid.sum()
    np.testing.assert_allclose(float(nll), expected, rtol=1e-6)
    assert int(correct) == (logits.argmax(-1) == targets)[valid].sum()


@pytest.mark.parametrize("t", [5, 6])
def test_fused_attention_is_explicit_attention(t):
    """Causal and masked (duo) paths equal the textbook formula."""
    rng = np.random.default_rng(t)
    q, k, v = (jnp.asarray(rng.standard_normal((2, t, 3, 8)), jnp.float32) for _ in range(3))

    def explicit(mask):
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(8)
        return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(jnp.where(mask, scores, -1e30), axis=-1), v)

    causal = ops.causal_mask(jnp.arange(t), jnp.arange(t))
    np.testing.assert_allclose(ops.fused_attention(q, k, v, None, "xla"), explicit(causal), rtol=1e-5, atol=1e-6)
    duo = ops.duo_mask(t)
    np.testing.assert_allclose(ops.fused_attention(q, k, v, duo, "xla"), explicit(duo), rtol=1e-5, atol=1e-6)


def test_tied_logits_trims_padding_and_accumulates_in_fp32():
    rng = np.random.default_rng(0)
    h = jnp.asarray(rng.standard_normal((2, 3, 8)), jnp.bfloat16)
    emb = jnp.asarray(rng.standard_normal((16, 8)), jnp.float32)
    logits = ops.tied_logits(h, emb, 13)
    assert logits.shape == (2, 3, 13) and logits.dtype == jnp.float32
    exact = h.astype(jnp.float32) @ emb.astype(jnp.bfloat16).astype(jnp.float32).T
    np.testing.assert_allclose(logits, exact[..., :13], rtol=1e-6, atol=1e-5)


@given(st.integers(1, 9), st.integers(1, 12))
@settings(max_examples=12, deadline=None)
def test_chunked_cross_entropy_is_cross_entropy(t, chunk_len):
    """Any chunking (dividing T or not) gives the sums and gradients of the full logits; the
    embedding's padding rows, even non-zero, never count."""
    rng = np.random.default_rng(t * 13 + chunk_len)
    h = jnp.asarray(rng.standard_normal((3, t, 8)), jnp.float32)
    emb = jnp.asarray(rng.standard_normal((16, 8)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 11, (3, t)), jnp.int32).at[0, 0].set(ops.IGNORE)

    def full(h, emb):
        return ops.cross_entropy(ops.tied_logits(h, emb, 11), targets)

    def chunked(h, emb):
        return ops.chunked_cross_entropy(h, emb, targets, 11, chunk_len)

    @jax.jit  # as the train step calls it, and one compile per shape instead of one per op
    def sums_and_grads(h, emb):
        return [(f(h, emb), jax.grad(lambda h, e: f(h, e)[0], argnums=(0, 1))(h, emb)) for f in (chunked, full)]

    (chunked_sums, chunked_grads), (full_sums, full_grads) = sums_and_grads(h, emb)
    for a, b in zip(chunked_sums, full_sums):
        np.testing.assert_allclose(a, b, rtol=1e-5)
    grads = [chunked_grads, full_grads]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), *grads)
    assert float(jnp.abs(grads[0][1][11:]).max()) == 0.0


def test_gp_frequencies():
    f = np.asarray(ops.gp_frequencies(4, 16, 10000.0, "code"))
    base = 10000.0 ** (-np.arange(0, 16, 2) / 16)
    np.testing.assert_allclose(f, (10.0 ** (-np.arange(4) / 3))[:, None] * base, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(ops.gp_frequencies(4, 16, 10000.0, "seed")),
                               np.exp(np.linspace(0, 1, 4))[:, None] * base, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(ops.gp_frequencies(1, 16, 10000.0)), base[None], rtol=1e-6)


def test_rotate_interleaved_formula_and_relative_property():
    rng = np.random.default_rng(0)
    h, dh = 3, 8
    f = jnp.asarray(rng.standard_normal((h, dh // 2)), jnp.float32)
    x = jnp.asarray(rng.standard_normal((1, 1, h, dh)), jnp.float32)
    t = 5
    out = np.asarray(ops.rotate_interleaved(x, jnp.array([t]), f))[0, 0]
    xv, fv = np.asarray(x)[0, 0], np.asarray(f)
    ang = t * fv
    np.testing.assert_allclose(out[:, 0::2], xv[:, 0::2] * np.cos(ang) - xv[:, 1::2] * np.sin(ang), atol=1e-5)
    np.testing.assert_allclose(out[:, 1::2], xv[:, 0::2] * np.sin(ang) + xv[:, 1::2] * np.cos(ang), atol=1e-5)
    # A rotation: norms kept, and q.k depends only on the position difference.
    np.testing.assert_allclose(np.linalg.norm(out, axis=-1), np.linalg.norm(xv, axis=-1), rtol=1e-5)
    q = jnp.asarray(rng.standard_normal((1, 1, h, dh)), jnp.float32)

    def score(tq, tk):
        return np.einsum("hd,hd->h", np.asarray(ops.rotate_interleaved(q, jnp.array([tq]), f))[0, 0],
                         np.asarray(ops.rotate_interleaved(x, jnp.array([tk]), f))[0, 0])
    np.testing.assert_allclose(score(7, 3), score(14, 10), atol=1e-4)


def test_chunked_cross_entropy_bf16_gradients():
    """bf16 hidden states: the gradients come back in the inputs' dtypes, the embedding's summed
    over chunks in fp32, and both near the fp32 gradients (bf16 rounding of inputs and logit
    gradients only)."""
    rng = np.random.default_rng(1)
    h = jnp.asarray(rng.standard_normal((2, 12, 8)), jnp.float32)
    emb = jnp.asarray(rng.standard_normal((16, 8)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 11, (2, 12)), jnp.int32)

    def grads(h):
        return jax.grad(lambda h, e: ops.chunked_cross_entropy(h, e, targets, 11, 5)[0], argnums=(0, 1))(h, emb)

    (h16, e16), (h32, e32) = grads(h.astype(jnp.bfloat16)), grads(h)
    assert h16.dtype == jnp.bfloat16 and e16.dtype == jnp.float32
    for low, exact in ((h16, h32), (e16, e32)):
        scale = float(jnp.abs(exact).max())
        np.testing.assert_allclose(np.asarray(low, np.float32), exact, rtol=0, atol=2 ** -6 * scale)


# ---------------------------------------------------------------- the dropout hash

def test_dropout_bits_are_murmurhash3_of_the_indices():
    rng = np.random.default_rng(0)
    seed, batch, head, query, key = (rng.integers(0, 2 ** 32 - 1, 50, endpoint=True, dtype=np.uint32) for _ in range(5))
    got = np.asarray(ops.dropout_bits(seed, batch, head, query, key))
    want = [mmh3.hash(struct.pack("<4I", *map(int, words)), int(s), signed=False)
            for s, *words in zip(seed, batch, head, query, key)]
    assert got.tolist() == want


def test_dropout_bits_are_a_pure_function_of_every_argument():
    index = jnp.arange(64)
    bits = jax.jit(ops.dropout_bits)(7, 1, 2, index[:, None], index[None, :])
    np.testing.assert_array_equal(bits, ops.dropout_bits(7, 1, 2, index[:, None], index[None, :]))
    others = [ops.dropout_bits(8, 1, 2, index[:, None], index[None, :]),  # seed
              ops.dropout_bits(7, 2, 1, index[:, None], index[None, :]),  # batch and head swapped
              ops.dropout_bits(7, 1, 2, index[None, :], index[:, None])]  # query and key swapped
    off_diagonal = ~np.eye(64, dtype=bool)  # where swapping query and key changes the words
    for other in others:
        assert np.mean((np.asarray(other) == np.asarray(bits))[off_diagonal]) < 1e-3


@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_drop_rate_is_the_rate_and_seeds_are_independent(rate):
    b, h, t = 2, 3, 128
    index = (jnp.arange(b)[:, None, None, None], jnp.arange(h)[None, :, None, None],
             jnp.arange(t)[:, None], jnp.arange(t)[None, :])
    keep = np.asarray(ops.dropout_keep(1, rate, *index))
    other = np.asarray(ops.dropout_keep(2, rate, *index))
    n = keep.size
    # Five standard deviations of a binomial proportion over n draws.
    assert abs(1.0 - keep.mean() - rate) < 5 * np.sqrt(rate * (1 - rate) / n)
    agree = rate ** 2 + (1 - rate) ** 2  # two independent masks
    assert abs(np.mean(keep == other) - agree) < 5 * np.sqrt(agree * (1 - agree) / n)
    assert ops.drop_threshold(0.0) == 0


def test_dropout_of_activations():
    """ops.dropout (residual and embedding dropout): drops at the rate, scales the kept elements by
    1 / (1 - rate), keeps the dtype; its mask is a pure function of the seed and every index."""
    rate = 0.25
    x = jnp.ones((4, 64, 32), jnp.bfloat16)
    y = np.asarray(jax.jit(ops.dropout, static_argnums=1)(x, rate, 3), np.float32)
    assert ops.dropout(x, rate, 3).dtype == jnp.bfloat16
    kept = y != 0
    np.testing.assert_array_equal(y[kept], np.float32(jnp.bfloat16(1 / (1 - rate))))  # 1 / (1 - rate) in bf16
    assert abs(1.0 - kept.mean() - rate) < 5 * np.sqrt(rate * (1 - rate) / kept.size)
    np.testing.assert_array_equal(kept, np.asarray(ops.dropout(x, rate, 3)) != 0)
    other = np.asarray(ops.dropout(x, rate, 4)) != 0
    agree = rate ** 2 + (1 - rate) ** 2
    assert abs(np.mean(kept == other) - agree) < 5 * np.sqrt(agree * (1 - agree) / kept.size)
    # Rows and positions draw their own elements: no two rows of the batch share a mask.
    assert max(np.mean(kept[0] == kept[i]) for i in (1, 2, 3)) < 0.8
