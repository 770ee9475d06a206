"""The Flax models: parity with the original's tensors, decoding, dependency structure, options."""
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flax_gpt2v as fg
from flax_gpt2v.models import ops
from flax_gpt2v.hf.keymap import flatten_params, unflatten_params
from flax_gpt2v.models import build_model
from helpers import FIXTURE_CASES, FIXTURES, FP32_TOL, VARIANTS, perturbed_lm, random_ids, small_config


@pytest.mark.parametrize("case", FIXTURE_CASES)
def test_original_fixture_parity(case):
    """fg.load reads the original's save_pretrained output and reproduces its fp32 eval logits and loss."""
    lm = fg.load(os.path.join(FIXTURES, case))
    ids = np.load(os.path.join(FIXTURES, case, "input_ids.npy"))
    logits = lm(ids)
    np.testing.assert_allclose(logits, np.load(os.path.join(FIXTURES, case, "logits.npy")), **FP32_TOL)
    loss_file = os.path.join(FIXTURES, case, "loss.npy")
    if os.path.exists(loss_file):
        nll, count, _ = ops.cross_entropy(logits, ops.next_token_targets(ids))
        np.testing.assert_allclose(nll / count, np.load(loss_file), **FP32_TOL)


def test_original_duo_interleaved_parity():
    d = os.path.join(FIXTURES, "duo-predict")
    lm = fg.load(d)
    ids = np.load(os.path.join(d, "interleaved_input_ids.npy"))
    np.testing.assert_allclose(lm(ids, interleaved=True), np.load(os.path.join(d, "interleaved_logits.npy")), **FP32_TOL)
    # The helper builds the same interleaved inputs from the plain tokens.
    np.testing.assert_array_equal(ops.interleave(ids[:, ::2], lm.config["mask_token_id"]), ids)


@pytest.mark.parametrize("variant", VARIANTS)
def test_generate_with_cache_equals_recomputation(variant):
    # A seed whose random models all generate varied text (seed 1's dd-both repeats one token).
    lm = perturbed_lm(variant, seed=2)
    prompt = random_ids((2, 6), seed=2)
    out = np.asarray(lm.generate(prompt, max_new_tokens=20))
    # Causal, so logits at t of a right-padded buffer are those of the prefix: one compile.
    ref = np.zeros((2, 26), np.int32)
    ref[:, :6] = prompt
    for t in range(6, 26):
        ref[:, t] = np.asarray(lm(ref))[:, t - 1].argmax(-1)
    assert len(set(out[:, 6:].ravel().tolist())) > 3, "degenerate generation proves nothing"
    np.testing.assert_array_equal(out, ref)


def test_sampling_is_reproducible_and_respects_top_k():
    lm = perturbed_lm("rotating-lr", seed=3)
    prompt = random_ids((2, 4), seed=4)
    a = lm.generate(prompt, max_new_tokens=12, temperature=1.0, top_k=3, seed=7)
    b = lm.generate(prompt, max_new_tokens=12, temperature=1.0, top_k=3, seed=7)
    c = lm.generate(prompt, max_new_tokens=12, temperature=1.0, top_k=3, seed=8)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    # top_k=1 sampling is greedy decoding.
    np.testing.assert_array_equal(lm.generate(prompt, max_new_tokens=12, temperature=1.0, top_k=1, seed=9),
                                  lm.generate(prompt, max_new_tokens=12))


def input_jacobian_support(lm, ids, interleaved=False):
    """Boolean [T_out, T_in]: does output k depend on the input embedding at j?

    An interceptor adds a zero perturbation to wte's output; the Jacobian of a random
    projection of the logits w.r.t. it is the dependency structure.
    """
    t = ids.shape[1]
    projection = jnp.asarray(np.random.default_rng(0).standard_normal(lm.config["vocab_size"]), jnp.float32)

    def projected_logits(delta):
        def add_delta(next_fn, args, kwargs, context):
            out = next_fn(*args, **kwargs)
            if context.module.name == "wte" and context.method_name == "__call__":
                # The model may pad its input (duo-predict's layout): padding slots get no perturbation.
                out = out + jnp.pad(delta, ((0, out.shape[1] - t), (0, 0)))
            return out
        with nn.intercept_methods(add_delta):
            logits = lm.module.apply({"params": lm.params}, jnp.asarray(ids), interleaved=interleaved)
        return logits[0] @ projection

    jacobian = jax.jit(jax.jacrev(projected_logits))(jnp.zeros((t, lm.config["n_embd"])))  # [T_out, T_in, d]
    return np.abs(np.asarray(jacobian)).sum(-1) > 0


@pytest.mark.parametrize("variant", ["gpt2", "dd-both", "parallel-concat", "duo-predict", "rotating-gp-norm"])
def test_causality(variant):
    lm = perturbed_lm(variant)
    support = input_jacobian_support(lm, random_ids((1, 9)))
    np.testing.assert_array_equal(support, np.tril(np.ones((9, 9), bool)))


def reachability(mask, steps):
    """Which inputs can reach each output through `steps` attention layers (residuals included)."""
    m = np.asarray(mask) | np.eye(len(mask), dtype=bool)
    r = np.eye(len(mask), dtype=bool)
    for _ in range(steps):
        r = (m.astype(int) @ r.astype(int)) > 0
    return r


@pytest.mark.parametrize("n_layer", [1, 2])
def test_duo_dependency_pattern(n_layer):
    """One layer: output k depends on input j exactly where docs/variants/duo-predict-gpt2.md's mask allows. Deeper: the
    mask's transitive closure (so from layer 2 on, the mask after x_m does see x_m through
    x_{m+1}'s hidden state: the original's pattern hides x_m from the first layer only)."""
    lm = perturbed_lm("duo-predict", n_layer=n_layer)
    ids = ops.interleave(random_ids((1, 6)), lm.config["mask_token_id"])
    support = input_jacobian_support(lm, np.asarray(ids), interleaved=True)
    mask = np.asarray(ops.duo_mask(ids.shape[1]))
    np.testing.assert_array_equal(support, reachability(mask, n_layer))
    if n_layer == 1:
        np.testing.assert_array_equal(support, mask)


def test_duo_plain_layout_is_causal_lm_over_real_tokens():
    """Real positions see the same thing in both layouts, so their outputs agree."""
    lm = perturbed_lm("duo-predict")
    x = random_ids((2, 8))
    inter = np.asarray(lm(ops.interleave(x, lm.config["mask_token_id"]), interleaved=True))
    np.testing.assert_allclose(inter[:, ::2], lm(x), **FP32_TOL)


def test_diffusion_noise_only_in_training_and_reproducible():
    cfg = small_config("dd-both", attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
    module = build_model(fg.load_config(cfg))
    ids = jnp.asarray(random_ids((2, 7)))
    params = perturbed_lm("dd-both").params

    def run(deterministic, seed):
        return module.apply({"params": params}, ids, deterministic=deterministic,
                            rngs={"diffusion": jax.random.PRNGKey(seed)})
    np.testing.assert_array_equal(run(True, 0), run(True, 1))
    np.testing.assert_array_equal(run(False, 0), run(False, 0))
    assert not np.allclose(run(False, 0), run(False, 1))
    assert not np.allclose(run(False, 0), run(True, 0))
    # Without diffusion, a training pass with dropout 0 is the eval pass.
    drift = build_model(fg.load_config({**cfg, "apply_diffusion": False}))
    flat = {k: v for k, v in flatten_params(params).items() if not k.endswith("diffusion_param")}
    p = {"params": unflatten_params(flat)}
    np.testing.assert_allclose(drift.apply(p, ids, deterministic=False, rngs={"diffusion": jax.random.PRNGKey(0)}),
                               drift.apply(p, ids), **FP32_TOL)


@pytest.mark.parametrize("variant", ["gpt2", "parallel-mean"])
def test_dropout_only_in_training(variant):
    lm = perturbed_lm(variant)
    ids = jnp.asarray(random_ids((2, 7)))
    train = [lm.module.apply({"params": lm.params}, ids, deterministic=False, rngs={"dropout": jax.random.PRNGKey(s)})
             for s in (0, 0, 1)]
    np.testing.assert_array_equal(train[0], train[1])
    assert not np.allclose(train[0], train[2])


@pytest.mark.parametrize("variant", ["gpt2", "parallel-concat", "dd-both", "rotating-lr-norm", "duo-predict"])
def test_construction_options_keep_the_math(variant):
    """remat policies, the unrolled layer loop and the explicit attention path give the
    gradients of the plain scanned model; bf16 stays close."""
    lm = perturbed_lm(variant)
    interleaved = variant == "duo-predict"
    ids = jnp.asarray(ops.interleave(random_ids((2, 7)), lm.config["mask_token_id"]) if interleaved
                      else random_ids((2, 7)))
    cfg = lm.config
    targets = ops.next_token_targets(ids)

    def grads(module, **kw):
        # Jitted: eager op-by-op dispatch would compile every primitive of the model on its own.
        def loss(params):
            nll, count, _ = ops.cross_entropy(module.apply({"params": params}, ids, interleaved=interleaved, **kw),
                                              targets)
            return nll / count
        return jax.jit(jax.grad(loss))(lm.params)

    def forward(module):
        return jax.jit(lambda p: module.apply({"params": p}, ids, interleaved=interleaved))(lm.params)

    ref_grads = grads(build_model(cfg))
    for module in (build_model(cfg, remat="full"), build_model(cfg, remat="dots"), build_model(cfg, scan=False)):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **FP32_TOL), grads(module), ref_grads)
    # A training pass with dropout 0 takes the explicit attention path (the one dropout needs).
    no_dropout = fg.load_config({**cfg, "attn_pdrop": 0.0, "resid_pdrop": 0.0, "embd_pdrop": 0.0})
    explicit = build_model({**no_dropout, "attn_pdrop": 1e-30})
    rngs = {"dropout": jax.random.PRNGKey(0), "diffusion": jax.random.PRNGKey(0)}
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **FP32_TOL),
                 grads(explicit, deterministic=False, rngs=rngs),
                 grads(build_model(no_dropout), deterministic=False, rngs=rngs))
    ref = forward(build_model(cfg))
    bf16 = forward(build_model(cfg, dtype=jnp.bfloat16))
    assert bf16.dtype == jnp.float32
    # bf16 keeps 8 significant bits; over a forward pass the error is a few percent of the
    # logits' scale (also in transformers' own GPT-2), so compare against that scale.
    assert float(jnp.abs(bf16 - ref).max()) <= 0.05 * float(jnp.abs(ref).max())


def test_padded_vocab_rows_are_zero_and_invisible():
    cfg = small_config("gpt2", vocab_size=100)
    lm = fg.init(cfg, seed=0)
    emb = lm.params["transformer"]["wte"]["embedding"]
    assert emb.shape[0] == fg.config.padded_vocab(lm.config) == 128
    assert float(jnp.abs(emb[100:]).max()) == 0.0 and float(jnp.abs(emb[:100]).min()) > 0.0
    assert lm(random_ids((1, 5), vocab=100)).shape == (1, 5, 100)
    assert lm.num_params == sum(x.size for x in jax.tree.leaves(lm.params)) - 28 * cfg["n_embd"]


def test_native_save_load_round_trip(tmp_path):
    lm = perturbed_lm("rotating-lr-norm")
    lm.save(tmp_path / "ckpt")
    again = fg.load(tmp_path / "ckpt")
    assert again.config == lm.config
    jax.tree.map(np.testing.assert_array_equal, again.params, jax.tree.map(np.asarray, lm.params))


def test_init_is_spec_init():
    cfg = small_config("gpt2", n_layer=8, n_embd=256, n_head=4, vocab_size=512)
    p = fg.init(cfg, seed=0).params["transformer"]
    proj = 0.02 / np.sqrt(2 * 8)
    # Each tensor has >= 65k samples: its std is within 2% of the init's.
    h = p["h"]
    for tensor, std in [(p["wte"]["embedding"], 0.02), (h["attn"]["c_attn"]["kernel"][0], 0.02),
                        (h["attn"]["c_proj"]["kernel"][3], proj), (h["mlp"]["c_proj"]["kernel"][3], proj)]:
        assert abs(float(jnp.std(tensor)) / std - 1) < 0.02
    # Every layer draws its own values.
    assert float(jnp.abs(h["mlp"]["c_fc"]["kernel"][0] - h["mlp"]["c_fc"]["kernel"][1]).min()) > 0.0
    assert float(jnp.abs(h["attn"]["c_attn"]["bias"]).max()) == 0.0
    assert float(jnp.abs(p["ln_f"]["scale"] - 1).max()) == 0.0


def test_lm_input_errors():
    lm = perturbed_lm("gpt2")
    with pytest.raises(ValueError, match="sequence too long"):
        lm(random_ids((1, 49)))
    with pytest.raises(ValueError, match="sequence too long"):
        lm.generate(random_ids((1, 40)), max_new_tokens=9)
    with pytest.raises(ValueError, match="token ids"):
        lm(np.array([[1, 96]]))
    with pytest.raises(ValueError, match="interleaved"):
        lm(random_ids((1, 5)), interleaved=True)
    with pytest.raises(FileNotFoundError, match="neither"):
        fg.load(FIXTURES)
