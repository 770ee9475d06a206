"""The public handle on a model: config + parameters + the Flax module, with I/O and decoding."""
from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from flax_gpt2v.hf import checkpoint, keymap
from flax_gpt2v.models import load_config
from flax_gpt2v.models.generate import make_decoder
from flax_gpt2v.models import build_model, init_params


class LM:
    """A model ready to use: `lm(ids)`, `lm.generate(ids)`, `lm.save(path)`.

    `dtype` is the compute dtype (e.g. jnp.bfloat16); parameters stay fp32. The other
    keywords are `build_model`'s (remat, scan, attention). The embedding inside has
    `padded_vocab` rows; checkpoints and exports hold exactly vocab_size.
    """

    def __init__(self, config: dict, params, *, dtype=None, tokenizer_dir: str | None = None, **build):
        self.config = config
        self.params = params
        self.tokenizer_dir = tokenizer_dir
        self.module = build_model(config, dtype=dtype, **build)
        self._forward = jax.jit(lambda p, ids, interleaved: self.module.apply({"params": p}, ids, interleaved=interleaved),
                                static_argnums=2)
        self._decoders = {}

    @property
    def num_params(self) -> int:
        return keymap.num_params(self.config)

    def _check_ids(self, input_ids, positions_needed: int):
        ids = np.asarray(input_ids)
        if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"input_ids must be an integer array [batch, time], got {ids.dtype} {ids.shape}")
        if ids.shape[1] == 0:
            raise ValueError("input_ids is empty")
        n_pos = self.config["n_positions"]
        if positions_needed > n_pos:
            raise ValueError(f"sequence too long: needs {positions_needed} positions but n_positions is {n_pos}")
        if ids.min() < 0 or ids.max() >= self.config["vocab_size"]:
            raise ValueError(f"token ids must be in [0, {self.config['vocab_size']}), got [{ids.min()}, {ids.max()}]")
        return jnp.asarray(ids, jnp.int32)

    def __call__(self, input_ids, interleaved: bool = False):
        """fp32 logits [B, T, V] in eval mode; `interleaved` selects duo-predict's training layout."""
        t = np.shape(input_ids)[-1]
        ids = self._check_ids(input_ids, (t + 1) // 2 if interleaved else t)
        return self._forward(self.params, ids, bool(interleaved))

    def generate(self, input_ids, max_new_tokens: int = 20, temperature: float = 0.0, top_k: int | None = None,
                 seed: int = 0):
        """ids [B, T + max_new_tokens]: greedy at temperature 0, else sampled (optionally top-k)."""
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if not (math.isfinite(temperature) and temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
        if top_k is not None and not 0 < top_k <= self.config["vocab_size"]:
            raise ValueError(f"top_k must be in [1, {self.config['vocab_size']}], got {top_k}")
        t = np.shape(input_ids)[-1]
        ids = self._check_ids(input_ids, t + max_new_tokens)
        if max_new_tokens == 0:
            return ids
        key = (t, max_new_tokens, float(temperature), top_k)
        if key not in self._decoders:
            self._decoders[key] = make_decoder(self.module, *key)
        return self._decoders[key](self.params, ids, jax.random.PRNGKey(seed))

    def save(self, path: str | os.PathLike, overwrite: bool = False) -> None:
        """Native checkpoint: config.json + flax_params.safetensors (+ tokenizer files)."""
        checkpoint.save_native(path, self.config, self.params, tokenizer_dir=self.tokenizer_dir, overwrite=overwrite)


def init(config, seed: int = 0, *, dtype=None, **build) -> LM:
    """A randomly initialised model (docs/gpt2.md init) from a config dict or JSON path."""
    cfg = load_config(config)
    module = build_model(cfg)
    params = jax.jit(lambda key: init_params(module, key))(jax.random.PRNGKey(seed))
    return LM(cfg, params, dtype=dtype, **build)


def load(path: str | os.PathLike, *, dtype=None, **build) -> LM:
    """A native checkpoint directory, or an HF directory: ours, the original's Hub format, or GPT-2
    in any published layout (see checkpoint.load_hf_dir)."""
    path = os.fspath(path)
    cfg, params = checkpoint.load_dir(path)
    tokenizer_dir = path if checkpoint.has_tokenizer(path) else None
    return LM(cfg, jax.tree.map(jnp.asarray, params), dtype=dtype, tokenizer_dir=tokenizer_dir, **build)
