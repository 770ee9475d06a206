"""Rotating Head GPT-2 (docs/variants/rotating-head-gpt2.md): head-specific rotary on q and k, on top of GPT-2's learned positions.

Differs from GPT-2 only in `Attention.rotate_qk`: pairs (x[2i], x[2i+1]) of every head h
rotate by position * f[h, i], where f is learned ("lr") or a fixed geometric progression
("gp"), optionally passed through a LayerNorm over the Dh/2 axis (use_norm).
"""
import flax.linen as nn

from flax_gpt2v.models import ops
from flax_gpt2v.config import head_dim
from flax_gpt2v.models.gpt2 import Attention, GPT2LMHeadModel, layer_norm, logical

ROPE_NORM_EPS = 1e-5  # docs/variants/rotating-head-gpt2.md


class HeadFrequencies(nn.Module):
    """`attn/rope`: the per-head frequencies [H, Dh/2]."""
    cfg: dict

    @nn.compact
    def __call__(self):
        cfg = self.cfg
        shape = (cfg["n_head"], head_dim(cfg) // 2)
        if cfg["rotatinghead"] == "lr":
            f = self.param("frequencies", logical(nn.initializers.normal(stddev=1.0), "heads", "rotary"), shape)
        else:
            f = ops.gp_frequencies(cfg["n_head"], head_dim(cfg), cfg["base_frequency"], cfg["gp_scales"])
        if cfg["use_norm"]:
            # The norm of frequencies is computed in fp32 whatever the compute dtype. eps is
            # 1e-5 whatever layer_norm_epsilon says: the original builds nn.LayerNorm(Dh // 2).
            f = layer_norm(ROPE_NORM_EPS, None, "layer_norm")(f)
        return f


class RotatingHeadAttention(Attention):
    def setup(self):
        super().setup()
        self.rope = HeadFrequencies(self.cfg)

    def rotate_qk(self, q, k, positions):
        f = self.rope()
        return ops.rotate_interleaved(q, positions, f), ops.rotate_interleaved(k, positions, f)


class RotatingHeadGPT2LMHeadModel(GPT2LMHeadModel):
    attention_cls = RotatingHeadAttention
