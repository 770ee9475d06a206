from .core import CoreGPT2LMHeadModel, CoreGPT2Model, CoreSelfAttention

# Drift-Diffusion GPT-2 (docs/variants/dd-gpt2.md): per-head drift and diffusion applied to the attention output.

import torch
from torch import nn
from transformers import GPT2Config
from transformers import initialization as init


class DDGPT2Config(GPT2Config):
    model_type = "dd-gpt2"
    apply_drift: bool = True
    apply_diffusion: bool = True
    baseline_each_head: bool = True


class DDSelfAttention(CoreSelfAttention):
    def __init__(self, config, layer_idx):
        super().__init__(config, layer_idx)
        self.apply_drift = config.apply_drift
        self.apply_diffusion = config.apply_diffusion
        self.baseline_each_head = config.baseline_each_head
        shape = (config.n_head, config.n_embd // config.n_head)
        if self.apply_drift:
            self.drift_param = nn.Parameter(torch.empty(shape))
            if self.baseline_each_head:
                self.baseline = nn.Parameter(torch.empty(shape))
        if self.apply_diffusion:
            self.diffusion_param = nn.Parameter(torch.empty(shape))

    def transform_heads(self, o):
        if self.apply_drift:
            drift = torch.sigmoid(self.drift_param)
            o = o + drift * (o - self.baseline if self.baseline_each_head else o)
        # Diffusion is training noise only: evaluation and generation are deterministic.
        if self.apply_diffusion and self.training:
            o = o + self.diffusion_param * torch.randn_like(o)
        return o

    def init_variant_parameters(self):
        if self.apply_drift:
            init.normal_(self.drift_param, mean=0.0, std=1.0)
            if self.baseline_each_head:
                init.normal_(self.baseline, mean=0.0, std=1e-3)
        if self.apply_diffusion:
            init.normal_(self.diffusion_param, mean=0.0, std=1.0)


class DDGPT2Model(CoreGPT2Model):
    config_class = DDGPT2Config
    attention_class = DDSelfAttention


class DDGPT2LMHeadModel(CoreGPT2LMHeadModel):
    config_class = DDGPT2Config
    base_model_class = DDGPT2Model
