"""Duo-Predict GPT-2 (docs/variants/duo-predict-gpt2.md): GPT-2 parameters, plus an interleaved layout for training.

Differs from GPT-2 only in `layout`. With `interleaved=True` the input is
x0, M, x1, M, ..., x_{L-1} (see `ops.interleave`): index 2m and 2m+1 share position m
and attention follows `ops.DUO` (`ops.duo_allowed`), over a length padded to a multiple of
`ops.DUO_LENGTH_MULTIPLE` with slots nothing sees. With plain input (the default, and generation) it
is an ordinary causal LM over real tokens. The layout is an explicit argument, never
guessed from the length as the original did.
"""
import dataclasses

import jax.numpy as jnp
import numpy as np

from flax_gpt2v.config import key_error
from flax_gpt2v.models import ops
from flax_gpt2v.models.gpt2 import GPT2LMHeadModel
from flax_gpt2v.models.variant import Variant


class DuoPredictGPT2LMHeadModel(GPT2LMHeadModel):
    def layout(self, length: int, interleaved: bool, cache_index):
        if not interleaved:
            return jnp.arange(length) + cache_index, None
        if not isinstance(cache_index, int) or cache_index != 0:
            raise ValueError("the interleaved layout is for whole sequences; decode with a cache in the plain layout")
        padded = ops.duo_padded_length(length)
        return ops.duo_positions(padded, length), dataclasses.replace(ops.DUO, seen=length)


def _check(cfg: dict) -> None:
    if cfg["mask_token_id"] is None:
        cfg["mask_token_id"] = cfg["vocab_size"] - 1
    if cfg["mask_token_id"] >= cfg["vocab_size"]:
        raise key_error("mask_token_id", f"{cfg['mask_token_id']} is outside the vocabulary of {cfg['vocab_size']}")


def _batch(rows: np.ndarray, cfg) -> tuple[np.ndarray, np.ndarray]:
    """x0 M x1 M ... and its targets (ops.duo_targets under the config's duo_loss)."""
    return (np.asarray(ops.interleave(rows, cfg["mask_token_id"])),
            np.asarray(ops.duo_targets(rows, cfg.get("duo_loss", "dual"))))


VARIANT = Variant(
    model_type="duo-predict-gpt2",
    lm_class=DuoPredictGPT2LMHeadModel,
    architecture="DuoPredictGPT2LMHeadModel",
    twin_module="duo_predict_gpt2",
    twin_config="DuoPredictGPT2Config",
    # The original trained duo with 512 positions and 512-token blocks (docs/variants/duo-predict-gpt2.md).
    defaults=dict(n_positions=512, duo_loss="dual", mask_token_id=None),
    optional_ints=("mask_token_id",),
    choices={"duo_loss": ("dual", "original")},
    check=_check,
    describing_keys=("duo_loss",),
    batch=_batch,
    interleaved=True,
    default_block_size=512,
    positions_follow_block=True,
    # The first run used the original's shifted loss (its perplexity 13.46); the loss-fixed run's exact
    # loss is not published: the intended pairing (our default, "dual") is what its name says.
    experiments={"duo-predict-gpt2-medium-wikitext": {"duo_loss": "original"},
                 "duo-predict-loss-fixed-gpt2-medium-wikitext": {}},
)
