"""The original's experiment files (docs/experiments.md): what their keys mean here, and the settings
their code version decided that the files do not carry.

`complete(raw)` fills in those settings for a file recognised as one of the original's
published experiments (by `hub_model_id`, else `run_name`); keys the config gives
explicitly always win. `no_effect_line(keys)` is the one log line naming the keys that
are accepted but change nothing here, grouped by why.
"""
from __future__ import annotations

import json
from typing import Any

from flax_gpt2v.config import BASE_DEFAULTS, block_length
from flax_gpt2v.models import VARIANTS, variant_of

# The original's published experiments (seed README's Hub ids, docs/training.md and docs/experiments.md), each
# variant's own (its spec's `experiments`), with the settings its code version decided where they differ
# from our defaults.
EXPERIMENTS: dict[str, dict[str, Any]] = {name: dict(settings) for v in VARIANTS.values()
                                          for name, settings in v.experiments.items()}

# Keys accepted from the original's files (and HF TrainingArguments) that change nothing
# here, by reason. Every other key is honoured (README: "Running the original's experiment files").
NO_EFFECT: dict[str, tuple[str, ...]] = {
    "PyTorch/HF Trainer plumbing": (
        "device_map", "use_cpu", "should_log", "torch_empty_cache_steps", "do_train", "do_eval",
        "include_for_metrics", "fp16", "tf32", "torch_compile", "dataloader_num_workers",
        "remove_unused_columns", "ddp_find_unused_parameters", "logging_dir", "optim",
        "preprocessing_num_workers"),
    "loading options: the tokenizer is tokenizer_name's (default GPT-2's own, built offline) plus "
    "<|MASK|>, token blocks are memory-mapped from the cache": (
        "use_fast_tokenizer", "tokenizer_file", "model_revision", "keep_in_memory"),
    "done otherwise here: best/ holds the best model by eval_loss and output_dir the last, "
    "a rerun resumes output_dir": (
        "load_best_model_at_end", "overwrite_output_dir"),
}
NO_EFFECT_KEYS = {k for keys in NO_EFFECT.values() for k in keys}

# HF Trainer keys whose only value that matches this trainer is checked, not ignored.
ONLY_VALUES: dict[str, tuple] = {
    "eval_strategy": ("steps",), "evaluation_strategy": ("steps",), "save_strategy": ("steps",),
    "logging_strategy": ("steps",), "metric_for_best_model": ("eval_loss", "loss"),
    "greater_is_better": (False,),
}



def recognise(raw: dict) -> tuple[str, str] | None:
    """(experiment name, key it was recognised by) for a file of the original's, else None."""
    for key in ("hub_model_id", "run_name"):
        value = raw.get(key)
        if isinstance(value, str) and value.rsplit("/", 1)[-1] in EXPERIMENTS:
            return value.rsplit("/", 1)[-1], key
    return None


def complete(raw: dict) -> tuple[dict, str | None]:
    """(raw with the recognised experiment's settings added, one log line or None)."""
    found = recognise(raw)
    if found is None:
        return raw, None
    name, by = found
    settings = {k: (v, "as the original's code version ran it") for k, v in EXPERIMENTS[name].items()}
    block = block_length(raw)
    variant = variant_of(raw)
    positions = variant.defaults.get("n_positions", BASE_DEFAULTS["n_positions"])
    if block is not None and variant.positions_follow_block and block != positions:
        settings["n_positions"] = (block, f"as the original's {variant.model_type} code set it (= block_size)")
    elif block is not None and block > positions:
        settings["n_positions"] = (block, f"so that its {block}-token blocks fit (the original could not run "
                                          f"them on {positions} positions)")
    # An experiment's settings that are not this variant's keys (a file run with another model_type).
    settings = {k: v for k, v in settings.items() if k == "n_positions" or k in variant.defaults}
    added = {k: v for k, v in settings.items() if k not in raw}
    if not added:
        return raw, None
    text = ", ".join(f"{k}={json.dumps(v)} {why}" for k, (v, why) in added.items())
    return ({**raw, **{k: v for k, (v, _) in added.items()}},
            f"original experiment {name} (recognised by {by}), settings its file does not carry: {text}; "
            "a key given in the config or on the command line wins")


def check_values(train: dict) -> str | None:
    """The first key whose value this trainer cannot honour, as an error message, or None."""
    for key, allowed in ONLY_VALUES.items():
        if key in train and train[key] is not None and train[key] not in allowed:
            return (f"config key '{key}': only {' or '.join(json.dumps(a) for a in allowed)} is supported here, "
                    f"got {json.dumps(train[key])}")
    return None


def no_effect_line(keys) -> str | None:
    """One line naming the given keys that have no effect here, grouped by reason."""
    keys = set(keys)
    groups = [f"{', '.join(sorted(keys & set(group)))} ({why})" for why, group in NO_EFFECT.items()
              if keys & set(group)]
    return f"config keys with no effect here: {'; '.join(groups)}" if groups else None
