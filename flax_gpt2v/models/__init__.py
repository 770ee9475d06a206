"""The models: the GPT-2 core (gpt2.py), one file per variant, the pure math (ops.py), the Pallas
attention kernel with in-kernel dropout (flash_attention.py), decoding (generate.py), the registry
below, the one place that lists the variants, and the one place that builds a module and makes its
parameters.

A variant is its own file (Flax classes + its `VARIANT` spec, models/variant.py), its torch twin
under hf/twins/, and one line in `VARIANTS`. Everything else asks the registry.

May import: flax_gpt2v.config. Never hf, data, training or evaluation.
"""
from __future__ import annotations

import os
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from flax_gpt2v.config import key_error, normalize, split_raw
from flax_gpt2v.models import dd_gpt2, duo_predict_gpt2, gpt2, parallel_gpt2, rotating_head_gpt2
from flax_gpt2v.models.gpt2 import REMAT_POLICIES
from flax_gpt2v.models.variant import Variant

VARIANTS: dict[str, Variant] = {v.model_type: v for v in (
    gpt2.VARIANT,
    dd_gpt2.VARIANT,
    parallel_gpt2.VARIANT,
    duo_predict_gpt2.VARIANT,
    rotating_head_gpt2.VARIANT,
)}
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn", "flash")


def variant_of(cfg: Mapping[str, Any]) -> Variant:
    """The registered variant of a config (a validated one, or raw keys: model_type defaults to gpt2)."""
    model_type = cfg.get("model_type", "gpt2")
    if model_type not in VARIANTS:
        raise key_error("model_type", f"unknown model type {model_type!r}; expected one of {', '.join(VARIANTS)}")
    return VARIANTS[model_type]


def split_config(src: Mapping[str, Any] | str | os.PathLike) -> tuple[dict, dict]:
    """(model config, training keys) from a dict or JSON file; the model config validated."""
    raw, train, preset = split_raw(src)
    return normalize(raw, variant_of(raw), preset, train), train


def load_config(src: Mapping[str, Any] | str | os.PathLike) -> dict:
    """The full, validated model config as a plain dict with HF field names."""
    return split_config(src)[0]


def attention_implementation(choice: str, dtype, platform: str | None = None) -> str:
    """"auto" -> cuDNN's fused attention on a GPU in bf16/fp16 (the only dtypes it takes), else XLA.
    `platform`: the backend compiled for ("gpu" for a GPU that is not here); None: JAX's default backend."""
    if choice not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"attention implementation must be one of {', '.join(ATTENTION_IMPLEMENTATIONS)}, "
                         f"got {choice!r}")
    if choice != "auto":
        return choice
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    fused = (platform or jax.default_backend()) == "gpu" and half
    return "cudnn" if fused else "xla"


def build_model(cfg: dict, dtype=None, remat: str = "none", scan: bool = True, attention: str = "auto",
                platform: str | None = None):
    """The Flax module for a validated config.

    dtype: compute dtype (params stay fp32); remat: "none", "full" or "dots" (see
    gpt2.REMAT_POLICIES); scan: layers as one lax.scan (the layer compiled once);
    attention: "auto", "xla", "cudnn" or "flash" (models/flash_attention.py; opt-in: "auto" never
    picks it); "auto" is decided for `platform` (attention_implementation).
    """
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat must be one of {', '.join(REMAT_POLICIES)}, got {remat!r}")
    dtype = dtype or jnp.float32
    return variant_of(cfg).lm_class(cfg, dtype=dtype, remat=remat, scan=scan,
                                    attention_implementation=attention_implementation(attention, dtype, platform))


def _boxed_params(module, key):
    return module.init(key, jnp.zeros((1, 1), jnp.int32))["params"]


def init_params(module, key):
    """Fresh fp32 parameters (plain arrays) of `module`: GPT-2's init (docs/gpt2.md)."""
    return nn.unbox(_boxed_params(module, key))


def param_axes(module) -> dict[str, tuple]:
    """'/'-joined parameter path -> its logical axis names (one per array axis), as the modules
    declare them; computed from shapes only."""
    boxed = jax.eval_shape(lambda key: _boxed_params(module, key), jax.random.PRNGKey(0))
    leaves = jax.tree_util.tree_flatten_with_path(boxed, is_leaf=lambda a: isinstance(a, nn.Partitioned))[0]
    return {"/".join(k.key for k in path): tuple(box.names) for path, box in leaves}
