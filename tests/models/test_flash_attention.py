"""The flash-attention kernel (models/flash_attention.py, docs/flash-attention.md) in Pallas' interpreter:
its dropout hash against MurmurHash3, its output and every gradient against the explicit formula with the
same dropout mask, inside a model against the explicit attention path, and its lowering for a GPU.

Shapes are tiny (the interpreter is slow): T = 37 is not a whole number of any block, Dh = 8 is padded."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flax_gpt2v as fg
from flax_gpt2v.models import build_model, ops
from flax_gpt2v.evaluation import aot
from flax_gpt2v.models import flash_attention as fa
from helpers import BF16_SCALE_TOL, FP32_TOL, perturbed_lm, random_ids

# XLA's H100 target for compiling without one (its README says where it comes from).

# Chosen once for the kernel against the formula in fp32: both sum the same terms in another order.
TOL = dict(atol=1e-5, rtol=1e-5)
B, T, H, D = 2, 37, 2, 8
BLOCKS = fa.BlockSizes(forward=(16, 16), backward=(16, 32))
PATTERNS = {"causal": ops.CAUSAL, "duo": ops.DUO}
SEED = np.uint32(2 ** 32 - 5)


def inputs(dtype=jnp.float32):
    """q, k, v and an output cotangent [B, T, H, D]."""
    return [jax.random.normal(key, (B, T, H, D)).astype(dtype) for key in jax.random.split(jax.random.PRNGKey(0), 4)]


def output_and_grads(f, q, k, v, do):
    o, vjp = jax.vjp(f, q, k, v)
    return (o, *vjp(do))


# ---------------------------------------------------------------- the kernel against the formula

@pytest.mark.parametrize("pattern, rate, blocks", [("causal", 0.0, BLOCKS), ("causal", 0.3, BLOCKS),
                                                   ("duo", 0.3, fa.BlockSizes((32, 16), (16, 16)))])
def test_output_and_gradients_are_the_explicit_formulas(pattern, rate, blocks):
    """fp32; dropout or not; the causal mask and duo-predict's (duo without dropout: the model test below;
    a rotating head's rotated q, k are just other q, k); tiles of other sizes and shapes, and the result
    is the formula's whatever the tiles."""
    q, k, v, do = inputs()
    p = PATTERNS[pattern]
    got = output_and_grads(lambda q, k, v: fa.attention(q, k, v, p, rate, SEED, blocks), q, k, v, do)
    want = output_and_grads(lambda q, k, v: ops.explicit_attention(q, k, v, p, rate, SEED), q, k, v, do)
    for name, g, w in zip(("o", "dq", "dk", "dv"), got, want):
        np.testing.assert_allclose(g, w, **TOL, err_msg=name)
    if rate == 0.0:
        np.testing.assert_allclose(got[0], jax.nn.dot_product_attention(q, k, v, mask=p.matrix(T)[None, None]), **TOL)


def test_vmapped_over_seeds():
    """Parallel-GPT-2 runs the two layers of a pair under vmap, each with its own dropout key."""
    q, k, v, do = inputs()
    seeds = jnp.array([SEED, 3], jnp.uint32)

    def run(attention, seed):
        return output_and_grads(lambda q, k, v: attention(q, k, v, ops.CAUSAL, 0.3, seed), q, k, v, do)

    got = jax.vmap(lambda seed: run(lambda *a: fa.attention(*a, BLOCKS), seed))(seeds)
    for i, seed in enumerate(seeds):
        for name, g, w in zip(("o", "dq", "dk", "dv"), got, run(ops.explicit_attention, seed)):
            np.testing.assert_allclose(g[i], w, **TOL, err_msg=name)


def test_bf16_inputs_accumulate_in_fp32():
    """bf16 q, k, v (the training dtype) against the formula in fp32 on the same values: within the
    project's bf16 tolerance of the result's scale."""
    q, k, v, do = inputs(jnp.bfloat16)
    got = output_and_grads(lambda q, k, v: fa.attention(q, k, v, ops.CAUSAL, 0.1, SEED, BLOCKS), q, k, v, do)
    want = output_and_grads(lambda q, k, v: ops.explicit_attention(q, k, v, ops.CAUSAL, 0.1, SEED),
                            *(a.astype(jnp.float32) for a in (q, k, v, do)))
    for name, g, w in zip(("o", "dq", "dk", "dv"), got, want):
        assert g.dtype == jnp.bfloat16, name
        assert float(jnp.abs(g.astype(jnp.float32) - w).max()) <= BF16_SCALE_TOL * float(jnp.abs(w).max()), name


def test_lowers_to_triton_for_a_gpu_without_the_scores():
    """The training shapes of gpt2-medium's duo-predict (interleaved length 1023, Dh 64, bf16, dropout)
    lower for CUDA on this machine: forward, dk/dv and dq are Triton kernels, and no [T, T] array appears."""
    shape = jax.ShapeDtypeStruct((2, 1023, 4, 64), jnp.bfloat16)

    def loss(q, k, v, seed):
        return fa.attention(q, k, v, ops.DUO, 0.1, seed).astype(jnp.float32).sum()

    exported = jax.export.export(
        jax.jit(jax.grad(loss, argnums=(0, 1, 2))), platforms=("cuda",),
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
    )(shape, shape, shape, jax.ShapeDtypeStruct((), jnp.uint32))
    text = exported.mlir_module()
    assert text.count("stablehlo.custom_call @__gpu$xla.gpu.triton") == 3
    assert sorted(re.findall(r'name = "(flash_attention_\w+)"', text)) == [
        "flash_attention_dkv", "flash_attention_dq", "flash_attention_forward"]
    assert not re.search(r"102[34]x102[34]", text)


@pytest.mark.aot
@pytest.mark.skipif(bool(aot.missing_plugins()), reason="deviceless compilation needs " + ", ".join(aot.missing_plugins()))
def test_compiles_for_an_h100_in_memory_linear_in_t():
    """Deviceless ahead-of-time compilation for an H100 (evaluation/aot.py's target): the Triton kernels
    compile for the target (shared memory included) at gpt2-medium's shapes (batch 16, 16 heads, Dh 64,
    bf16, dropout 0.1), and the gradient's temporaries grow linearly in T."""
    on_h100 = jax.sharding.SingleDeviceSharding(aot.target_devices("h100", 1).devices[0])

    def temporaries(t):
        x = jax.ShapeDtypeStruct((16, t, 16, 64), jnp.bfloat16, sharding=on_h100)
        seed = jax.ShapeDtypeStruct((), jnp.uint32, sharding=on_h100)
        grad = jax.grad(lambda q, k, v, seed: fa.attention(q, k, v, ops.CAUSAL, 0.1, seed).astype(jnp.float32).sum(),
                        argnums=(0, 1, 2))
        return jax.jit(grad).lower(x, x, x, seed).compile().memory_analysis().temp_size_in_bytes

    small, large = temporaries(1024), temporaries(4096)
    # Linear: 4x (quadratic would be 16x); the explicit formula's scores alone are 2 GiB at T = 1024.
    assert 0 < large <= 4.5 * small and small < 2 ** 30


# ---------------------------------------------------------------- inside a model

def test_a_model_with_flash_attention(monkeypatch):
    """Duo-predict's interleaved training pass (its mask pattern, remat, scanned layers): loss and
    gradients with "flash" are those with "xla", at dropout 0 and with attention dropout, since the
    explicit path draws the kernel's mask; each layer draws its own seed from the dropout key."""
    lm = perturbed_lm("duo-predict")
    ids = jnp.asarray(ops.interleave(random_ids((2, 7)), lm.config["mask_token_id"]))
    targets = ops.next_token_targets(ids)
    rngs = {"dropout": jax.random.PRNGKey(1)}

    def value_and_grads(cfg, attention):
        module = build_model(cfg, remat="dots", attention=attention)

        def loss(params):
            logits = module.apply({"params": params}, ids, interleaved=True, deterministic=False, rngs=rngs)
            nll, count, _ = ops.cross_entropy(logits, targets)
            return nll / count
        return jax.jit(jax.value_and_grad(loss))(lm.params)

    def close(a, b):
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, **FP32_TOL), a, b)

    no_dropout = fg.load_config({**lm.config, "attn_pdrop": 0.0, "resid_pdrop": 0.0, "embd_pdrop": 0.0})
    plain = value_and_grads(no_dropout, "xla")
    close(value_and_grads(no_dropout, "flash"), plain)

    dropping = {**no_dropout, "attn_pdrop": 0.3}
    seeds = []

    def explicit(q, k, v, pattern, rate, seed, real=ops.explicit_attention):
        jax.debug.callback(lambda s: seeds.extend(np.ravel(s).tolist()), seed)
        return real(q, k, v, pattern, rate, seed)

    got = value_and_grads(dropping, "flash")
    monkeypatch.setattr(ops, "explicit_attention", explicit)
    want = value_and_grads(dropping, "xla")
    assert abs(float(want[0]) - float(plain[0])) > 1e-3  # the dropout is real
    close(got, want)
    assert len(set(seeds)) == lm.config["n_layer"]
