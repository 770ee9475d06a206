"""What a variant is, in one value: `Variant`, which each variant's own file fills in (its `VARIANT`).

Everything outside a variant's files asks the registry (`flax_gpt2v.models.VARIANTS`) through
these fields and never names a model_type: config keys and their checks, the Flax class, the
torch twin exported beside it, the parameters the key table maps, the input layout and the
targets it trains on, and what the original's experiment files need.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np

from flax_gpt2v.models.ops import next_token_targets

# A parameter the variant adds: (Flax path, Flax shape[, transform]). Inside a layer the path is
# relative to the layer (e.g. "attn/drift_param"); at model level it is absolute. The transform is
# hf.keymap's ("transpose" for what torch keeps as an nn.Linear), "none" when left out.
ParamRow = tuple[str, tuple[int, ...]] | tuple[str, tuple[int, ...], str]


def no_params(cfg: Mapping[str, Any]) -> list[ParamRow]:
    return []


def no_check(cfg: dict) -> None:
    return None


def nothing_to_complete(cfg: dict, weights: Mapping[str, Any]) -> None:
    return None


def next_token_batch(rows: np.ndarray, cfg: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets) of GPT-2's causal LM: each token predicts the next."""
    return rows, np.asarray(next_token_targets(rows))


@dataclass(frozen=True)
class Variant:
    model_type: str
    # The Flax LM class (a GPT2LMHeadModel subclass).
    lm_class: type
    # The class name transformers' config.json lists under "architectures" (the original's own name).
    architecture: str
    # The torch twin exported as remote code: module under flax_gpt2v/hf/twins/ and its config class;
    # None for plain GPT-2, which transformers itself provides.
    twin_module: str | None = None
    twin_config: str | None = None
    # Config keys of the variant with their defaults (they may also override a GPT-2 default, e.g. n_positions).
    defaults: Mapping[str, Any] = field(default_factory=dict)
    # Types and allowed values of the variant's keys, checked when a config is loaded.
    bools: tuple[str, ...] = ()
    floats: tuple[str, ...] = ()
    optional_ints: tuple[str, ...] = ()
    choices: Mapping[str, tuple] = field(default_factory=dict)
    # Checks across keys (and values filled in from others); raises ConfigError naming the key.
    check: Callable[[dict], None] = no_check
    # Keys that say which sub-variant a config is (shown in run summaries and refusals).
    describing_keys: tuple[str, ...] = ()
    # Parameters beyond GPT-2's: per layer (paths relative to the layer), and at model level.
    layer_params: Callable[[Mapping[str, Any]], list[ParamRow]] = no_params
    model_params: Callable[[Mapping[str, Any]], list[ParamRow]] = no_params
    # Keys a published config of the variant may lack, filled in from its weights (torch key -> tensor).
    complete_from_weights: Callable[[dict, Mapping[str, Any]], None] = nothing_to_complete
    # Training input layout: rows of tokens [B, L] -> (input_ids, targets); `interleaved` says the
    # model must be called with interleaved=True on them (duo-predict's training layout).
    batch: Callable[[np.ndarray, Mapping[str, Any]], tuple[np.ndarray, np.ndarray]] = next_token_batch
    interleaved: bool = False
    # Token blocks when the config gives none (the original's), never beyond n_positions.
    default_block_size: int = 1024
    # n_positions is the block length, as the original's code for this variant set it.
    positions_follow_block: bool = False
    # The original's published experiments of this variant (by their Hub name), with the settings its
    # code version decided that the files do not carry.
    experiments: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
