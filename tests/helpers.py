"""Shared test helpers: small configs for every variant and option, perturbed random models."""
import contextlib
import os
import threading
from http.server import ThreadingHTTPServer

import jax
import numpy as np

import flax_gpt2v as fg

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "original")
FIXTURE_CASES = sorted(os.listdir(FIXTURES))
# Chosen once for every fp32 comparison of logits across implementations.
FP32_TOL = dict(atol=1e-4, rtol=1e-4)

SMALL = dict(vocab_size=96, n_positions=48, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=None)
# Every variant and option (docs/variants).
VARIANTS = {
    "gpt2": dict(model_type="gpt2"),
    "dd-drift": dict(model_type="dd-gpt2", apply_drift=True, apply_diffusion=False),
    "dd-drift-nobaseline": dict(model_type="dd-gpt2", apply_drift=True, apply_diffusion=False,
                                baseline_each_head=False),
    "dd-diffusion": dict(model_type="dd-gpt2", apply_drift=False, apply_diffusion=True),
    "dd-both": dict(model_type="dd-gpt2", apply_drift=True, apply_diffusion=True),
    "parallel-mean": dict(model_type="parallel-gpt2", n_layer=4, bottleneck_method="mean"),
    "parallel-add": dict(model_type="parallel-gpt2", n_layer=4, bottleneck_method="add"),
    "parallel-concat": dict(model_type="parallel-gpt2", n_layer=4, bottleneck_method="concat"),
    "duo-predict": dict(model_type="duo-predict-gpt2", n_positions=48),
    "rotating-lr": dict(model_type="rotating-head-gpt2", rotatinghead="lr"),
    "rotating-lr-norm": dict(model_type="rotating-head-gpt2", rotatinghead="lr", use_norm=True),
    "rotating-gp": dict(model_type="rotating-head-gpt2", rotatinghead="gp"),
    "rotating-gp-norm": dict(model_type="rotating-head-gpt2", rotatinghead="gp", use_norm=True),
    "rotating-gp-seed-scales": dict(model_type="rotating-head-gpt2", rotatinghead="gp", gp_scales="seed",
                                    base_frequency=500.0),
}

# Every config field that reaches both the JAX model and the exported torch model is off its
# default here, so a field that one side ignores (as the rope LayerNorm once used
# layer_norm_epsilon on one side only) changes the logits of one side only.
_NON_DEFAULT = dict(layer_norm_epsilon=1e-2, initializer_range=0.05, n_inner=40, resid_pdrop=0.05,
                   embd_pdrop=0.15, attn_pdrop=0.2)
_NON_DEFAULT_BY_TYPE = {
    "duo-predict-gpt2": dict(mask_token_id=5, duo_loss="original"),
    "rotating-head-gpt2": dict(base_frequency=500.0),
}


def off_default(variant):
    """Overrides for cross-framework tests: with SMALL, every field reaching both sides is off its default."""
    return {**_NON_DEFAULT, **_NON_DEFAULT_BY_TYPE.get(VARIANTS[variant]["model_type"], {})}


def small_config(variant, **overrides):
    return {**SMALL, **VARIANTS[variant], **overrides}


def perturbed_lm(variant, seed=0, scale=0.3, **overrides):
    """A small random model whose every parameter matters (GPT-2 init makes a tiny model emit
    one token forever, which would let wrong caches and masks pass unnoticed)."""
    lm = fg.init(small_config(variant, **overrides), seed=seed)
    leaves, treedef = jax.tree.flatten(lm.params)
    rng = np.random.default_rng(seed)
    lm.params = jax.tree.unflatten(treedef, [np.asarray(x) + scale * rng.standard_normal(x.shape).astype(np.float32)
                                             for x in leaves])
    # The embedding's padding rows (config.padded_vocab) are zero in every real model.
    lm.params["transformer"]["wte"]["embedding"][lm.config["vocab_size"]:] = 0
    return lm


def random_ids(shape, vocab=SMALL["vocab_size"], seed=0):
    return np.random.default_rng(seed).integers(0, vocab, shape).astype(np.int32)


def write_small_tokenizer(directory, texts, vocab_size=300):
    """A byte-level BPE of `vocab_size` tokens trained on `texts`, saved as Hugging Face tokenizer
    files without <|MASK|> (loading adds it), for tests whose tiny models need a small vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                                       special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|endoftext|>").save_pretrained(str(directory))
    return raw


@contextlib.contextmanager
def serving(handler):
    """A ThreadingHTTPServer for `handler` on a free port of 127.0.0.1, serving until the block ends;
    yields its base URL (for HF_ENDPOINT)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
