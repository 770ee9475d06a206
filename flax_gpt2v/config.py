"""Model configuration: HF `GPT2Config` field names, GPT-2's defaults and checks, the size presets.

It knows no variant: `normalize` takes the variant's spec (models.variant.Variant) for its keys
and checks, and `flax_gpt2v.models.load_config` is the entry point that picks it. The config
may come from a dict or a JSON file holding a model config (ours, an HF `config.json`, the
original's Hub config) or one of the original's experiment files, whose training keys are set
aside for the trainer. Every value is checked once, so the models can trust their config.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping

# Sizes of the public GPT-2 checkpoints, embedded so no download is needed. The
# original adds <|MASK|> to the tokenizer for every variant, hence 50258.
PRESETS = {
    "gpt2": dict(n_layer=12, n_embd=768, n_head=12),
    "gpt2-medium": dict(n_layer=24, n_embd=1024, n_head=16),
    "gpt2-large": dict(n_layer=36, n_embd=1280, n_head=20),
    "gpt2-xl": dict(n_layer=48, n_embd=1600, n_head=25),
}
DEFAULT_PRESET = "gpt2-medium"
GPT2_VOCAB = 50257
MASK_TOKEN = "<|MASK|>"

BASE_DEFAULTS: dict[str, Any] = dict(
    model_type="gpt2",
    vocab_size=GPT2_VOCAB + 1,
    n_positions=1024,
    **PRESETS[DEFAULT_PRESET],
    n_inner=None,
    activation_function="gelu_new",
    resid_pdrop=0.1,
    embd_pdrop=0.1,
    attn_pdrop=0.1,
    layer_norm_epsilon=1e-5,
    initializer_range=0.02,
    bos_token_id=50256,
    eos_token_id=50256,
)

# GPT-2's own choices; a variant's are in its Variant.
CHOICES = {"activation_function": ("gelu_new",)}

# Fields HF writes into config.json that change nothing in these models; they are
# accepted and dropped. Those that WOULD change the math are checked instead.
HF_PASSTHROUGH = {
    "architectures", "auto_map", "torch_dtype", "dtype", "transformers_version", "use_cache",
    "summary_activation", "summary_first_dropout", "summary_proj_to_labels", "summary_type",
    "summary_use_proj", "_name_or_path", "pad_token_id", "n_ctx", "tie_word_embeddings",
    "output_attentions", "output_hidden_states", "return_dict", "task_specific_params",
    "id2label", "label2id", "_attn_implementation_autoset", "attn_implementation",
    "flax_gpt2v_format",
}
HF_MUST_BE = {
    "scale_attn_weights": True,
    "scale_attn_by_inverse_layer_idx": False,
    "reorder_and_upcast_attn": False,
    "add_cross_attention": False,
    "tie_word_embeddings": True,
}

# Keys of the original's experiment files (and of our train configs). They do not
# describe the model; `split_config` hands them to the trainer. The trainer describes each one
# (flax_gpt2v/training/options.py); this set must equal its TRAINER_KEYS, which a test checks:
# config sits below training (and below JAX) and cannot import it.
TRAINING_KEYS = {
    "run_name", "dataset", "model_name_or_path", "config_name", "model_name", "tokenizer_name",
    "per_device_train_batch_size", "per_device_eval_batch_size", "batch_size",
    "learning_rate", "num_train_epochs", "warmup_ratio", "warmup_steps", "weight_decay",
    "lr_scheduler_type", "block_size", "max_seq_length", "bf16", "fp16", "eval_steps",
    "save_steps", "logging_steps", "gradient_accumulation_steps", "gradient_checkpointing",
    "save_total_limit", "seed", "data_seed", "output_dir", "max_steps", "eval_strategy",
    "evaluation_strategy", "save_strategy", "logging_strategy", "report_to",
    "load_best_model_at_end", "metric_for_best_model", "greater_is_better",
    "early_stopping_patience", "early_stopping_threshold", "max_nonfinite_steps", "push_to_hub", "hub_model_id",
    "hub_token", "hub_private_repo", "hub_strategy",
    "overwrite_output_dir", "do_train", "do_eval", "train_file", "validation_file",
    "mesh", "remat_policy", "scan_layers", "attention_implementation", "accept_data_change",
    "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm", "optim",
    "device_map", "torch_empty_cache_steps", "dataloader_num_workers", "logging_dir",
    "remove_unused_columns", "ddp_find_unused_parameters", "torch_compile", "tf32",
    "preprocessing_num_workers", "max_eval_samples", "max_train_samples", "streaming",
    "validation_split_percentage", "cache_dir", "export_hf", "distributed", "distributed_timeout",
    "eval_harness_tasks", "eval_harness_limit",
    # the rest of the original's files (docs/experiments.md); original_experiments says what each does here
    "train_files", "include_for_metrics", "model_revision", "use_fast_tokenizer", "tokenizer_file",
    "overwrite_cache", "should_log", "use_cpu", "keep_in_memory",
}

_INT = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head")
_FLOAT = ("resid_pdrop", "embd_pdrop", "attn_pdrop", "layer_norm_epsilon", "initializer_range")
_OPT_INT = ("n_inner", "bos_token_id", "eos_token_id")


class ConfigError(ValueError):
    """A config value is wrong; the message names the key."""


def key_error(key: str, msg: str) -> ConfigError:
    return ConfigError(f"config key '{key}': {msg}")


def read_json(src: str | os.PathLike) -> dict:
    path = os.path.join(src, "config.json") if os.path.isdir(src) else src
    if not os.path.exists(path):
        raise ConfigError(f"config file not found: {path}")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8-sig")  # a byte-order mark, as some editors write, is not an error
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {raw[e.start]:#04x} at offset "
                          f"{e.start})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"config file {path} is not valid JSON: {e}" if raw.strip() else
                          f"config file {path} is empty") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a JSON object")
    return data


def split_raw(src: Mapping[str, Any] | str | os.PathLike) -> tuple[dict, dict, str | None]:
    """(model keys, training keys, size preset) of a dict or JSON file, nothing validated but the preset."""
    raw = dict(src) if isinstance(src, Mapping) else read_json(src)
    train = {k: raw.pop(k) for k in list(raw) if k in TRAINING_KEYS}
    # run_clm's meaning: config_name names the sizes of a model trained from scratch;
    # model_name_or_path (flax_gpt2v.training.pretrained) is a checkpoint to start from.
    preset = train.get("config_name")
    if preset is not None and (not isinstance(preset, str) or preset not in PRESETS):
        raise key_error("config_name", f"unknown preset {preset!r}; expected one of {', '.join(PRESETS)}")
    return raw, train, preset


def normalize(raw: dict, variant, preset: str | None, train: dict) -> dict:
    """The full config of `variant` (a models.variant.Variant) from the keys given, every value checked."""
    model_type = variant.model_type
    cfg = dict(BASE_DEFAULTS)
    if preset is not None:
        cfg.update(PRESETS[preset])
    cfg.update(variant.defaults)
    known = set(cfg) | HF_PASSTHROUGH | set(HF_MUST_BE)
    for key, value in raw.items():
        if key not in known:
            raise key_error(key, f"unknown key for model_type {model_type!r}")
        if key in HF_MUST_BE:
            if value != HF_MUST_BE[key]:
                raise key_error(key, f"only {HF_MUST_BE[key]!r} is supported, got {value!r}")
        elif key not in HF_PASSTHROUGH:
            cfg[key] = value
    cfg["model_type"] = model_type
    _check_types(cfg, variant)
    _check_values(cfg, train)
    variant.check(cfg)
    return cfg


def _check_types(cfg: dict, variant) -> None:
    for key in _INT:
        if key in cfg and (isinstance(cfg[key], bool) or not isinstance(cfg[key], int) or cfg[key] <= 0):
            raise key_error(key, f"must be a positive integer, got {cfg[key]!r}")
    for key in _OPT_INT + variant.optional_ints:
        v = cfg.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
            raise key_error(key, f"must be a non-negative integer or null, got {v!r}")
    for key in _FLOAT + variant.floats:
        if key in cfg:
            v = cfg[key]
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise key_error(key, f"must be a number, got {v!r}")
            if not math.isfinite(v):  # JSON's NaN and Infinity parse as floats
                raise key_error(key, f"must be a finite number, got {v!r}")
            cfg[key] = float(v)
    for key in variant.bools:
        if key in cfg and not isinstance(cfg[key], bool):
            raise key_error(key, f"must be true or false, got {cfg[key]!r}")
    for key, allowed in {**CHOICES, **variant.choices}.items():
        if key in cfg and cfg[key] not in allowed:
            raise key_error(key, f"must be one of {', '.join(allowed)}, got {cfg[key]!r}")


def _check_values(cfg: dict, train: dict) -> None:
    d, h = cfg["n_embd"], cfg["n_head"]
    if d % h:
        raise key_error("n_head", f"n_embd {d} is not divisible by n_head {h}")
    for key in ("resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if not 0.0 <= cfg[key] < 1.0:
            raise key_error(key, f"dropout must be in [0, 1), got {cfg[key]}")
    lengths = {}
    for key in ("block_size", "max_seq_length"):
        n = train.get(key)
        if n is None:
            continue
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise key_error(key, f"must be a positive integer, got {n!r}")
        lengths[key] = n
    if lengths:
        # The block length is the shorter of the two, as in the original's run_clm.
        key = min(lengths, key=lengths.get)
        if lengths[key] > cfg["n_positions"]:
            raise key_error(key, f"sequence length {lengths[key]} is longer than the {cfg['n_positions']} positions "
                            "the model has (n_positions)")


def block_length(raw: dict) -> int | None:
    """min(block_size, max_seq_length) of those given (the original's run_clm rule)."""
    given = [raw[k] for k in ("block_size", "max_seq_length")
             if isinstance(raw.get(k), int) and not isinstance(raw.get(k), bool)]
    return min(given) if given else None


def head_dim(cfg: Mapping[str, Any]) -> int:
    return cfg["n_embd"] // cfg["n_head"]


def inner_dim(cfg: Mapping[str, Any]) -> int:
    return cfg["n_inner"] or 4 * cfg["n_embd"]


def padded_vocab(cfg: Mapping[str, Any]) -> int:
    """Rows of the embedding inside the model: vocab_size rounded up to a multiple of 128,
    so the LM head's matmul tiles evenly. Checkpoints and exports keep vocab_size rows."""
    return -(-cfg["vocab_size"] // 128) * 128
