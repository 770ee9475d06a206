"""Duo-Predict GPT-2 (docs/variants/duo-predict-gpt2.md): GPT-2 parameters, plus an interleaved layout for training.

Differs from GPT-2 only in `layout`. With `interleaved=True` the input is
x0, M, x1, M, ..., x_{L-1} (see `ops.interleave`): index 2m and 2m+1 share position m
and attention follows `ops.duo_mask`. With plain input (the default, and generation) it
is an ordinary causal LM over real tokens. The layout is an explicit argument, never
guessed from the length as the original did.
"""
import jax.numpy as jnp

from flax_gpt2v.models import ops
from flax_gpt2v.models.gpt2 import GPT2LMHeadModel


class DuoPredictGPT2LMHeadModel(GPT2LMHeadModel):
    def layout(self, length: int, interleaved: bool, cache_index):
        if not interleaved:
            return jnp.arange(length) + cache_index, None
        if not isinstance(cache_index, int) or cache_index != 0:
            raise ValueError("the interleaved layout is for whole sequences; decode with a cache in the plain layout")
        return ops.duo_positions(length), ops.duo_mask(length)
