"""Hugging Face checkpoint directories as they are published, read into one canonical form.

Weights: the first present of model.safetensors, model.safetensors.index.json (+ shards),
pytorch_model.bin, pytorch_model.bin.index.json (+ shards), the order transformers uses.
.bin files go through torch's weights-only loader, which never unpickles arbitrary objects.
Keys: GPT2LMHeadModel naming (`transformer.` prefix, the tied `lm_head` optional) or
GPT2Model naming (no prefix: the OpenAI gpt2 repos), with or without the attention buffers
older transformers saved (`h.{i}.attn.bias`, the causal mask; `h.{i}.attn.masked_bias`,
-1e4): checked to hold exactly that, then dropped. Config: what any transformers version
wrote. The generic keys that do not change the function are dropped, those that do are
refused; every refusal is one line naming its cause.
"""
from __future__ import annotations

import json
import os
import re
from typing import Any

import numpy as np

from flax_gpt2v.hf.files import CONFIG_FILE, CheckpointError, read_safetensors
from flax_gpt2v.config import HF_MUST_BE, ConfigError, read_json
from flax_gpt2v.models import load_config, variant_of
from flax_gpt2v.hf.keymap import check_weights

SAFE_WEIGHTS, SAFE_INDEX = "model.safetensors", "model.safetensors.index.json"
BIN_WEIGHTS, BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
READ_ORDER = (SAFE_WEIGHTS, SAFE_INDEX, BIN_WEIGHTS, BIN_INDEX)  # transformers' order
_SHARD = re.compile(r"^(model|pytorch_model)-\d+-of-\d+\.(safetensors|bin)$")
PREFIX = "transformer."
# Top-level names of GPT2Model's state dict (and the variants'): those the prefix goes on.
_BASE_NAMES = ("wte.", "wpe.", "h.", "ln_f.", "bottleneck.")
_MASK_BUFFER = re.compile(r"^transformer\.h\.\d+\.attn\.bias$")
_MASKED_BIAS_BUFFER = re.compile(r"^transformer\.h\.\d+\.attn\.masked_bias$")
MASKED_BIAS = -1e4

# PretrainedConfig's generic keys (every transformers version) and GPT-2's own old keys:
# none changes the function these models compute, so they are dropped on import.
_IGNORED_KEYS = {
    "return_dict", "output_hidden_states", "output_attentions", "torchscript", "torch_dtype", "dtype",
    "use_bfloat16", "tf_legacy_loss", "chunk_size_feed_forward", "is_decoder", "cross_attention_hidden_size",
    "tie_encoder_decoder", "max_length", "min_length", "do_sample", "early_stopping", "num_beams",
    "num_beam_groups", "diversity_penalty", "temperature", "top_k", "top_p", "typical_p",
    "repetition_penalty", "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size",
    "bad_words_ids", "num_return_sequences", "output_scores", "return_dict_in_generate",
    "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty",
    "suppress_tokens", "begin_suppress_tokens", "architectures", "finetuning_task", "id2label", "label2id",
    "num_labels", "_num_labels", "tokenizer_class", "prefix", "pad_token_id", "sep_token_id",
    "decoder_start_token_id", "task_specific_params", "problem_type", "_name_or_path", "_commit_hash",
    "_attn_implementation_internal", "_attn_implementation_autoset", "attn_implementation",
    "transformers_version", "use_cache", "gradient_checkpointing", "auto_map", "output_past",
    "n_ctx", "n_special", "predict_special_tokens", "summary_activation", "summary_first_dropout",
    "summary_proj_to_labels", "summary_type", "summary_use_proj",
    # An fp32 upcast of the attention scores: the same function as ours.
    "reorder_and_upcast_attn",
}
# Keys that change the function: only these values are accepted.
_REQUIRED = {**HF_MUST_BE, "is_encoder_decoder": False, "pruned_heads": {}}
del _REQUIRED["reorder_and_upcast_attn"]
# The tanh approximation of GELU under both of transformers' names.
_ACTIVATIONS = {"gelu_new": "gelu_new", "gelu_pytorch_tanh": "gelu_new"}
# transformers' GPT2Config defaults: what a config.json that omits a size means.
_GPT2_CONFIG_DEFAULTS = dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12,
                             bos_token_id=50256, eos_token_id=50256)


def read_hf_dir(path: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray]]:
    """(validated config, float32 state dict with GPT2LMHeadModel key names) of an HF directory."""
    if not os.path.isdir(path):
        raise CheckpointError(f"not a Hugging Face checkpoint directory: {path} is not a directory")
    where = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(where):
        raise CheckpointError(f"not a Hugging Face checkpoint directory: {path} has no {CONFIG_FILE}")
    raw = read_json(where)
    model_cfg = normalize_config(raw, where)
    tensors = canonical_keys(read_tensors(path))
    variant_of(model_cfg).complete_from_weights(model_cfg, tensors)
    cfg = load_config(model_cfg)
    tensors = drop_attention_buffers(tensors, cfg["n_positions"], raw.get("n_ctx"))
    return cfg, to_float32(tensors, os.fspath(path))


def weights_file(path: str | os.PathLike) -> str:
    """The weights (or index) file of an HF directory that transformers would read."""
    for name in READ_ORDER:
        if os.path.isfile(os.path.join(path, name)):
            return name
    shards = sorted(f for f in os.listdir(path) if _SHARD.match(f))
    if shards:
        index = SAFE_INDEX if shards[0].endswith(".safetensors") else BIN_INDEX
        raise CheckpointError(f"sharded checkpoint without its index: {path} has {shards[0]} but no {index}")
    raise CheckpointError(f"no weights file ({SAFE_WEIGHTS}, {BIN_WEIGHTS} or a sharded index) in {path}")


def has_weights(path: str | os.PathLike) -> bool:
    return os.path.isdir(path) and (any(os.path.isfile(os.path.join(path, n)) for n in READ_ORDER)
                                    or any(_SHARD.match(f) for f in os.listdir(path)))


def normalize_config(raw: dict, where: str) -> dict:
    """An HF config.json's dict, reduced to the keys `load_config` knows; function changes refused."""
    act = raw.get("activation_function", "gelu_new")
    if act not in _ACTIVATIONS:
        raise ConfigError(f"{where}: activation_function {act} is not supported "
                          f"(only {' and '.join(_ACTIVATIONS)}: the tanh GELU)")
    for key, value in _REQUIRED.items():
        if key in raw and raw[key] != value:
            raise ConfigError(f"{where}: {key} {json.dumps(raw[key])} is not supported "
                              f"(only {json.dumps(value)}: anything else changes the function)")
    cfg = {k: v for k, v in raw.items() if k not in _IGNORED_KEYS and k not in _REQUIRED}
    cfg["activation_function"] = _ACTIVATIONS[act]
    return {**_GPT2_CONFIG_DEFAULTS, **cfg}


def read_tensors(path: str | os.PathLike) -> dict[str, Any]:
    """{key: torch tensor} of the weights of an HF directory, shards joined."""
    name = weights_file(path)
    if name in (SAFE_INDEX, BIN_INDEX):
        return _read_sharded(path, name)
    return _read_file(os.path.join(path, name))


def _read_sharded(path, index_name: str) -> dict[str, Any]:
    index_file = os.path.join(path, index_name)
    try:
        with open(index_file) as f:
            weight_map = json.load(f)["weight_map"]
    except (ValueError, KeyError, TypeError):
        weight_map = None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"corrupt checkpoint: {index_file} is not a shard index (JSON with a "
                              "weight_map of key -> file)")
    tensors = {}
    for shard in sorted(set(weight_map.values())):
        file = os.path.join(path, shard)
        if os.path.basename(shard) != shard or not os.path.isfile(file):
            raise CheckpointError(f"sharded checkpoint incomplete: {index_file} names {shard}, which is not in {path}")
        part = _read_file(file)
        listed = {k for k, v in weight_map.items() if v == shard}
        if set(part) != listed:
            odd = sorted(set(part) ^ listed)
            raise CheckpointError(f"corrupt checkpoint: {file} and {index_name} disagree on {len(odd)} key(s), "
                                  f"e.g. {odd[0]}")
        tensors.update(part)
    return tensors


def _read_file(file: str) -> dict[str, Any]:
    import torch

    if file.endswith(".safetensors"):
        import safetensors.torch  # through torch because numpy has no bfloat16
        return read_safetensors(file, safetensors.torch.load_file)
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds; the first line names the cause
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot read {file} with torch's weights-only loader: {first}") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise CheckpointError(f"{file} does not hold a state dict (a mapping of names to tensors)")
    return state


def canonical_keys(tensors: dict[str, Any]) -> dict[str, Any]:
    """GPT2Model naming -> GPT2LMHeadModel naming (`transformer.` prefix); the prefix must be all or none."""
    head = "lm_head.weight"
    bare = [k for k in tensors if not k.startswith(PREFIX) and k != head]
    if not bare:
        return dict(tensors)
    if any(k.startswith(PREFIX) for k in tensors):
        raise CheckpointError(f"keys lack the `{PREFIX}` prefix that others have: {len(bare)} key(s), e.g. {bare[0]}")
    if not any(k.startswith(_BASE_NAMES) for k in bare):
        raise CheckpointError(f"keys lack the `{PREFIX}` prefix and are not GPT2Model's either, e.g. {sorted(bare)[0]}")
    return {(k if k == head else PREFIX + k): v for k, v in tensors.items()}


def drop_attention_buffers(tensors: dict[str, Any], n_positions: int, n_ctx: int | None = None) -> dict[str, Any]:
    """Remove the causal-mask and masked_bias buffers after checking they hold what GPT-2's do."""
    import torch

    sizes = {n_positions, n_ctx or n_positions}
    out = {}
    for key, t in tensors.items():
        if _MASK_BUFFER.match(key):
            p = t.shape[-1] if t.ndim == 4 else -1
            if t.ndim != 4 or tuple(t.shape[:2]) != (1, 1) or t.shape[2] != p or p not in sizes:
                raise CheckpointError(f"{key} is not GPT-2's causal mask buffer: shape {tuple(t.shape)}, "
                                      f"expected (1, 1, {n_positions}, {n_positions})")
            if not torch.equal(t.bool(), torch.ones(p, p, dtype=torch.bool).tril().view(1, 1, p, p)) \
                    or not torch.equal(t.bool().to(t.dtype), t):
                raise CheckpointError(f"{key} is not GPT-2's causal mask buffer: it does not hold the lower "
                                      "triangle of ones")
        elif _MASKED_BIAS_BUFFER.match(key):
            # Compared in the buffer's own dtype: -1e4 is not a bfloat16 number.
            if t.numel() != 1 or not t.dtype.is_floating_point or \
                    t.reshape(()).item() != torch.tensor(MASKED_BIAS, dtype=t.dtype).item():
                got = f" {t.reshape(-1)[0].item():g}" if t.numel() else ""
                raise CheckpointError(f"{key} is not GPT-2's masked_bias buffer: expected the scalar "
                                      f"{MASKED_BIAS:g}, got {t.dtype} {tuple(t.shape)}{got}")
        else:
            out[key] = t
    return out


def to_float32(tensors: dict[str, Any], where: str) -> dict[str, np.ndarray]:
    """float16/bfloat16/float32/float64 tensors as float32 numpy; non-float or non-finite refused."""
    # Widening from 16 bits is exact; numpy has no bfloat16. Non-float tensors stay as they are
    # for check_weights to name.
    out = {k: (t.float() if t.dtype.is_floating_point else t).numpy() for k, t in tensors.items()}
    check_weights(out, f"{where}: cannot import")
    return out
