"""Shared test helpers. No test module imports another: what several need lives here, and the scripts
that tests run in subprocesses import this module (with tests/ on sys.path), never a test module.

Sections: paths; the variants tables; JAX models; torch twins; GPT-2 as published (layouts); tiny
training runs; a local HTTP server."""
import contextlib
import glob
import json
import os
import socket
import threading
import types
from http.server import ThreadingHTTPServer

import jax
import numpy as np

import flax_gpt2v as fg
from flax_gpt2v.models import init_params

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
FIXTURES = os.path.join(TESTS, "fixtures", "original")
FIXTURE_CASES = sorted(os.listdir(FIXTURES))
# Chosen once for every fp32 comparison of logits across implementations.
FP32_TOL = dict(atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- the variants tables
# One place for every variant and option the tests cover. Each table keeps the sizes its tests were
# written for (their shapes are what the tests' compiled functions and tolerances were chosen on).

# JAX models (docs/variants): forward, generation, export.
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


# The key table: every model type and every option that changes the parameter set (tests/hf/test_convert.py).
KEY_TINY = dict(n_layer=2, n_embd=16, n_head=4, n_positions=8, vocab_size=32)
KEY_VARIANTS = {
    "gpt2": dict(model_type="gpt2"),
    "dd-drift": dict(model_type="dd-gpt2", apply_drift=True, apply_diffusion=False, baseline_each_head=True),
    "dd-drift-nobaseline": dict(model_type="dd-gpt2", apply_drift=True, apply_diffusion=False,
                                baseline_each_head=False),
    "dd-diffusion": dict(model_type="dd-gpt2", apply_drift=False, apply_diffusion=True),
    "dd-both": dict(model_type="dd-gpt2", apply_drift=True, apply_diffusion=True),
    "dd-none": dict(model_type="dd-gpt2", apply_drift=False, apply_diffusion=False),
    "parallel-mean": dict(model_type="parallel-gpt2", bottleneck_method="mean"),
    "parallel-add": dict(model_type="parallel-gpt2", bottleneck_method="add"),
    "parallel-concat": dict(model_type="parallel-gpt2", bottleneck_method="concat", n_layer=4),
    "duo": dict(model_type="duo-predict-gpt2"),
    "rh-lr": dict(model_type="rotating-head-gpt2", rotatinghead="lr"),
    "rh-lr-norm": dict(model_type="rotating-head-gpt2", rotatinghead="lr", use_norm=True),
    "rh-gp": dict(model_type="rotating-head-gpt2", rotatinghead="gp"),
    "rh-gp-norm": dict(model_type="rotating-head-gpt2", rotatinghead="gp", use_norm=True),
}


# Torch twins (tests/hf/): the original's classes' switches.
# Chosen once. fp32: reference comparisons. bf16 (8 significant bits, ~0.4% per rounding) compounds to a
# few percent over a whole forward pass, also in transformers' own GPT2LMHeadModel, so bf16 logits are
# compared with fp32 relative to the logits' scale: max |bf16 - fp32| <= 5% of max |fp32|.
BF16_SCALE_TOL = 0.05

# Small random configs covering each variant's switches.
TWIN_SMALL = dict(vocab_size=96, n_positions=64, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=None)
TWIN_VARIANTS = {
    "dd-both": ("dd-gpt2", dict(apply_drift=True, apply_diffusion=True, baseline_each_head=True)),
    "dd-drift-nobaseline": ("dd-gpt2", dict(apply_drift=True, apply_diffusion=False, baseline_each_head=False)),
    "dd-off": ("dd-gpt2", dict(apply_drift=False, apply_diffusion=False)),  # GPT-2 itself
    "parallel-concat": ("parallel-gpt2", dict(n_layer=4, bottleneck_method="concat")),
    "parallel-mean": ("parallel-gpt2", dict(n_layer=4, bottleneck_method="mean")),
    "duo-predict": ("duo-predict-gpt2", {}),
    "rotating-lr-norm": ("rotating-head-gpt2", dict(rotatinghead="lr", use_norm=True)),
    "rotating-gp": ("rotating-head-gpt2", dict(rotatinghead="gp")),
}


# Tiny training runs (tests/training/ and the runs other tests make): one config per model type.
BLOCK = 32
TINY = dict(n_layer=2, n_embd=32, n_head=4, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
TRAIN_VARIANTS = {
    "gpt2": {},
    "dd-gpt2": {},
    "parallel-gpt2": {"bottleneck_method": "concat"},
    "duo-predict-gpt2": {},
    "rotating-head-gpt2": {"rotatinghead": "gp", "use_norm": True},
}


# ---------------------------------------------------------------- JAX models

# Every config field that reaches both the JAX model and the exported torch model is off its
# default here, so a field that one side ignores (as the rope LayerNorm once used
# layer_norm_epsilon on one side only) changes the logits of one side only.
_NON_DEFAULT = dict(layer_norm_epsilon=1e-2, initializer_range=0.05, n_inner=40, resid_pdrop=0.05,
                   embd_pdrop=0.15, attn_pdrop=0.2)
_NON_DEFAULT_BY_TYPE = {
    "duo-predict-gpt2": dict(mask_token_id=5, duo_loss="original"),
    "rotating-head-gpt2": dict(base_frequency=500.0),
}


# For twin-vs-transformers comparisons: the GPT-2 fields both sides read, off their defaults, so a twin
# that ignores one of them (its LayerNorms' epsilon, its MLP width, its init scale) differs from GPT-2.
TWIN_OFF_DEFAULT = {k: _NON_DEFAULT[k] for k in ("layer_norm_epsilon", "n_inner", "initializer_range")}


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


def shaped_random_lm(variant, seed=0, scale=0.3, **overrides):
    """A small model whose parameters are all N(0, scale), made from their shapes alone: no initialisation
    is compiled, for tests that compare two implementations of whatever model they are given."""
    cfg = fg.load_config(small_config(variant, **overrides))
    module = fg.build_model(cfg)
    shapes = jax.eval_shape(lambda: init_params(module, jax.random.PRNGKey(0)))
    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda x: scale * rng.standard_normal(x.shape).astype(np.float32), shapes)
    params["transformer"]["wte"]["embedding"][cfg["vocab_size"]:] = 0  # padding rows, as in every real model
    return fg.LM(cfg, params)


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


# ---------------------------------------------------------------- torch twins

def random_model(variant, seed=1, **overrides):
    """A torch twin with random, perturbed weights (transformers-side tests)."""
    import torch

    from flax_gpt2v.hf.twins import TWINS

    model_type, extra = TWIN_VARIANTS[variant]
    config_class, model_class, _ = TWINS[model_type]
    torch.manual_seed(seed)
    model = model_class(config_class(**{**TWIN_SMALL, **extra, **overrides}))
    # GPT-2 init makes a tiny random model emit one token forever; larger weights make the
    # generated sequences varied enough for cache/no-cache comparisons to mean something.
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.3 * torch.randn_like(param))
    return model.eval()


# ---------------------------------------------------------------- GPT-2 as published: layouts, buffers, old configs

def reference_gpt2(seed, **overrides):
    """transformers' own GPT2LMHeadModel, tiny, every weight perturbed so that no key can go unnoticed."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    fields = dict(vocab_size=61, n_positions=32, n_embd=24, n_layer=2, n_head=3, n_inner=40,
                  layer_norm_epsilon=1e-3, initializer_range=0.05, bos_token_id=1, eos_token_id=None,
                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(**{**fields, **overrides})).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


def openai_config(config):
    """config.json as the OpenAI gpt2 repos have it: old keys, no transformers 5 additions."""
    keys = ("activation_function", "attn_pdrop", "bos_token_id", "embd_pdrop", "eos_token_id",
            "initializer_range", "layer_norm_epsilon", "n_embd", "n_head", "n_inner", "n_layer",
            "n_positions", "resid_pdrop", "vocab_size")
    return {**{k: getattr(config, k) for k in keys}, "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
            "n_ctx": config.n_positions, "n_special": 0, "predict_special_tokens": True,
            "summary_activation": None, "summary_first_dropout": 0.1, "summary_proj_to_labels": True,
            "summary_type": "cls_index", "summary_use_proj": True, "output_past": True,
            "task_specific_params": {"text-generation": {"do_sample": True, "max_length": 50}},
            # generic PretrainedConfig keys that older transformers wrote
            "torchscript": False, "use_bfloat16": False, "chunk_size_feed_forward": 0, "pruned_heads": {},
            "tie_word_embeddings": True, "output_hidden_states": False, "is_decoder": False}


def causal_buffers(n_layer, n_positions, dtype="float32"):
    import torch

    mask = torch.ones(n_positions, n_positions).tril().view(1, 1, n_positions, n_positions)
    out = {}
    for i in range(n_layer):
        out[f"h.{i}.attn.bias"] = mask.to(getattr(torch, dtype)).clone()
        out[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    return out


def write_shards(directory, state, kind, n=3):
    """A sharded checkpoint with its index, as save_pretrained(max_shard_size=...) writes it."""
    import safetensors.torch
    import torch

    keys = sorted(state)
    ext, index = ("safetensors", "model.safetensors.index.json") if kind == "safetensors" else \
        ("bin", "pytorch_model.bin.index.json")
    stem = "model" if kind == "safetensors" else "pytorch_model"
    weight_map = {}
    for s in range(n):
        name = f"{stem}-{s + 1:05d}-of-{n:05d}.{ext}"
        part = {k: state[k].contiguous() for k in keys[s::n]}
        if kind == "safetensors":
            safetensors.torch.save_file(part, os.path.join(directory, name), metadata={"format": "pt"})
        else:
            torch.save(part, os.path.join(directory, name))
        weight_map.update({k: name for k in part})
    with open(os.path.join(directory, index), "w") as f:
        json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f)


def save_layout(directory, state, config: dict, layout):
    """`state`: GPT2LMHeadModel key names (torch tensors). Writes one published layout."""
    import safetensors.torch
    import torch

    os.makedirs(directory, exist_ok=True)
    if layout in ("openai-bin", "openai-safetensors"):
        # GPT2Model naming, with the attention buffers old transformers saved.
        n_positions = config.get("n_positions", 1024)
        state = {k[len("transformer."):]: v for k, v in state.items() if k != "lm_head.weight"}
        state.update(causal_buffers(config["n_layer"], n_positions))
    state = {k: v.clone().contiguous() for k, v in state.items()}  # no shared storage
    if layout in ("safetensors", "openai-safetensors"):
        safetensors.torch.save_file(state, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    elif layout in ("bin", "openai-bin"):
        torch.save(state, os.path.join(directory, "pytorch_model.bin"))
    else:
        write_shards(directory, state, layout.split("-")[1])
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f)


# ---------------------------------------------------------------- tiny training runs

class ByteTokenizer:
    vocab_size, mask_token_id, eos_token_id, source = 257, 256, None, "bytes"

    def save(self, directory, *, model_max_length):
        with open(os.path.join(directory, "tokenizer.json"), "w") as f:
            json.dump({"type": "bytes", "vocab_size": self.vocab_size}, f)


def simulated_devices_env(n: int, **extra) -> dict:
    """The environment for a subprocess that sees `n` CPU devices, keeping the suite's other XLA flags."""
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    return {**os.environ, "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": " ".join(flags + [f"--xla_force_host_platform_device_count={n}"]), **extra}


def corpus(block=BLOCK):
    """The repository's docs/ (English prose) as bytes cut into blocks; the last tenth is the validation split."""
    docs = sorted(glob.glob(os.path.join(ROOT, "docs", "**", "*.md"), recursive=True))
    text = b"\n".join(open(f, "rb").read() for f in docs)
    ids = np.frombuffer(text, np.uint8).astype(np.int32)
    blocks = ids[: len(ids) // block * block].reshape(-1, block)
    n_val = max(8, len(blocks) // 10)
    return types.SimpleNamespace(tokenizer=ByteTokenizer(), train=blocks[:-n_val], validation=blocks[-n_val:],
                                 source="docs/ as bytes")


def tiny_config(model_type="gpt2", out="runs/x", **train):
    cfg = {"model_type": model_type, **TINY, **TRAIN_VARIANTS[model_type], "output_dir": str(out),
           "block_size": BLOCK, "per_device_train_batch_size": 8, "learning_rate": 3e-3, "max_steps": 30,
           "warmup_steps": 3, "logging_steps": 5, "eval_steps": 15, "save_steps": 15, "bf16": False,
           "gradient_checkpointing": False, "seed": 0, "export_hf": False, "report_to": "none"}
    cfg.update(train)
    return cfg



# ---------------------------------------------------------------- multi-host launches (tests/training)
# The variables by which a process knows it was launched as one of several (training/cluster.py).
LAUNCHER_VARS = ("SLURM_", "OMPI_", "PMIX_", "JAX_COORDINATOR", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID",
                 "JAX_LOCAL_DEVICE_IDS")


def without_launcher(env):
    """env without any launcher's variables: a test's processes are launched only as it says."""
    return {k: v for k, v in env.items() if not k.startswith(LAUNCHER_VARS)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


# Run with `python -c` (cwd ROOT): trains until step {kill_at}, then SIGKILLs itself.
KILLED_RUN = """
import os, signal, sys, time
sys.path.insert(0, {tests!r})
import helpers as t
from flax_gpt2v.training import trainer as tr
from flax_gpt2v.data import pipeline as data
indices = data.BatchSchedule.indices
def dying_indices(self, step):
    if step == {kill_at}:
        time.sleep(1.0)  # lets the asynchronous checkpoint of step 8 land, as it would in a long run
        os.kill(os.getpid(), signal.SIGKILL)
    return indices(self, step)
data.BatchSchedule.indices = dying_indices
tr.train(t.tiny_config({model_type!r}, {out!r}, **{extra!r}), prepared=t.corpus(), log=print)
"""


# ---------------------------------------------------------------- a local HTTP server

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
