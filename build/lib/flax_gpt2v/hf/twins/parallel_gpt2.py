from .core import CoreGPT2LMHeadModel, CoreGPT2Model

# Parallel GPT-2 (docs/variants/parallel-gpt2.md): blocks run in pairs on the same input, outputs merged by a bottleneck.

import torch
from torch import nn
from transformers import GPT2Config

BOTTLENECK_METHODS = ("mean", "add", "concat")


class ParallelGPT2Config(GPT2Config):
    model_type = "parallel-gpt2"
    bottleneck_method: str = "mean"

    def __post_init__(self, **kwargs):
        if self.bottleneck_method not in BOTTLENECK_METHODS:
            raise ValueError(f"bottleneck_method must be one of {BOTTLENECK_METHODS}, got {self.bottleneck_method!r}")
        if self.n_layer % 2:
            raise ValueError(f"Number of hidden layers must be even, got n_layer={self.n_layer}")
        super().__post_init__(**kwargs)


class ParallelGPT2Model(CoreGPT2Model):
    config_class = ParallelGPT2Config

    def add_variant_modules(self, config):
        self.bottleneck_method = config.bottleneck_method
        if self.bottleneck_method == "concat":
            # One projection shared by every pair, as in the original checkpoints.
            self.bottleneck = nn.Linear(2 * config.n_embd, config.n_embd)

    def run_blocks(self, x, positions, allowed, cache, record):
        for left, right in zip(self.h[0::2], self.h[1::2]):
            a = left(x, positions, allowed, cache, record)
            b = right(x, positions, allowed, cache, record)
            if self.bottleneck_method == "mean":
                x = (a + b) / 2
            elif self.bottleneck_method == "add":
                x = a + b
            else:
                x = self.bottleneck(torch.cat([a, b], dim=-1))
        return x


class ParallelGPT2LMHeadModel(CoreGPT2LMHeadModel):
    config_class = ParallelGPT2Config
    base_model_class = ParallelGPT2Model
