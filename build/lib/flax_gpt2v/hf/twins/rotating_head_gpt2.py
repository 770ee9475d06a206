from .core import CoreGPT2LMHeadModel, CoreGPT2Model, CoreSelfAttention

# Rotating Head GPT-2 (docs/variants/rotating-head-gpt2.md): per-head rotary rotation of q and k on top of learned positions.

import torch
from torch import nn
from transformers import GPT2Config
from transformers import initialization as init

ROTATION_KINDS = ("lr", "gp")
GP_SCALE_SCHEDULES = ("code", "seed")


class RotatingHeadGPT2Config(GPT2Config):
    model_type = "rotating-head-gpt2"
    rotatinghead: str = "lr"
    use_norm: bool = False
    base_frequency: float = 10000.0
    gp_scales: str = "code"

    def __post_init__(self, **kwargs):
        if self.rotatinghead not in ROTATION_KINDS:
            raise ValueError(f"rotatinghead must be one of {ROTATION_KINDS}, got {self.rotatinghead!r}")
        if self.gp_scales not in GP_SCALE_SCHEDULES:
            raise ValueError(f"gp_scales must be one of {GP_SCALE_SCHEDULES}, got {self.gp_scales!r}")
        super().__post_init__(**kwargs)


class HeadRotation(nn.Module):
    """Per-head frequencies f[h, i] (learned for "lr", fixed geometric progression for "gp")."""

    def __init__(self, config):
        super().__init__()
        self.n_head = config.n_head
        self.half_dim = config.n_embd // config.n_head // 2
        self.kind = config.rotatinghead
        self.base_frequency = config.base_frequency
        self.gp_scales = config.gp_scales
        if self.kind == "lr":
            self.frequencies = nn.Parameter(torch.empty(self.n_head, self.half_dim))
        if config.use_norm:
            self.layer_norm = nn.LayerNorm(self.half_dim, eps=1e-5)

    def init_variant_parameters(self):
        if self.kind == "lr":
            init.normal_(self.frequencies, mean=0.0, std=1.0)

    def gp_frequencies(self, device):
        # Computed on the fly rather than kept as a buffer: nothing to store, load or cast.
        heads = torch.arange(self.n_head, device=device, dtype=torch.float32)
        if self.gp_scales == "code":
            scales = 10.0 ** (-heads / max(self.n_head - 1, 1))
        else:
            scales = torch.exp(torch.linspace(0.0, 1.0, self.n_head, device=device))
        pair = torch.arange(self.half_dim, device=device, dtype=torch.float32)
        return scales[:, None] * self.base_frequency ** (-2.0 * pair / (2 * self.half_dim))

    def forward(self, device):
        f = self.frequencies.float() if self.kind == "lr" else self.gp_frequencies(device)
        if hasattr(self, "layer_norm"):
            f = nn.functional.layer_norm(
                f, (self.half_dim,), self.layer_norm.weight.float(), self.layer_norm.bias.float(), self.layer_norm.eps
            )
        return f


def rotate_pairs(x, cos, sin):
    """Rotate interleaved pairs (x[2i], x[2i+1]) by the angle whose cos/sin are given per pair."""
    even, odd = x.float()[..., 0::2], x.float()[..., 1::2]
    rotated = torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1)
    return rotated.flatten(-2).to(x.dtype)


class RotatingHeadSelfAttention(CoreSelfAttention):
    def __init__(self, config, layer_idx):
        super().__init__(config, layer_idx)
        self.rope = HeadRotation(config)

    def rotate_qk(self, q, k, positions):
        f = self.rope(q.device)
        # angle[b, h, t, i] = position[b, t] * f[h, i], in fp32 so large positions stay exact under bf16.
        angle = positions.float()[:, None, :, None] * f[None, :, None, :]
        cos, sin = angle.cos(), angle.sin()
        return rotate_pairs(q, cos, sin), rotate_pairs(k, cos, sin)


class RotatingHeadGPT2Model(CoreGPT2Model):
    config_class = RotatingHeadGPT2Config
    attention_class = RotatingHeadSelfAttention


class RotatingHeadGPT2LMHeadModel(CoreGPT2LMHeadModel):
    config_class = RotatingHeadGPT2Config
    base_model_class = RotatingHeadGPT2Model
