"""Rotating Head GPT-2 (docs/variants/rotating-head-gpt2.md): head-specific rotary on q and k, on top of GPT-2's learned positions.

Differs from GPT-2 only in `Attention.rotate_qk`: pairs (x[2i], x[2i+1]) of every head h
rotate by position * f[h, i], where f is learned ("lr") or a fixed geometric progression
("gp"), optionally passed through a LayerNorm over the Dh/2 axis (use_norm).
"""
import flax.linen as nn

from flax_gpt2v.models import ops
from flax_gpt2v.config import head_dim, key_error
from flax_gpt2v.models.gpt2 import Attention, GPT2LMHeadModel, layer_norm, logical
from flax_gpt2v.models.variant import ParamRow, Variant

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


def _check(cfg: dict) -> None:
    if head_dim(cfg) % 2:
        raise key_error("n_head", f"rotating-head-gpt2 needs an even head dim, got {head_dim(cfg)}")


def _layer_params(cfg) -> list[ParamRow]:
    half = head_dim(cfg) // 2
    rows = [("attn/rope/frequencies", (cfg["n_head"], half))] if cfg["rotatinghead"] == "lr" else []
    if cfg["use_norm"]:  # GP frequencies are computed, not stored; their norm's affine is
        rows += [("attn/rope/layer_norm/scale", (half,)), ("attn/rope/layer_norm/bias", (half,))]
    return rows


def _complete_from_weights(cfg: dict, weights) -> None:
    # The original's Hub configs have no use_norm; only its later version, which always applies the
    # LayerNorm, stores rope.layer_norm.* weights.
    if "use_norm" not in cfg:
        cfg["use_norm"] = any(".attn.rope.layer_norm." in k for k in weights)


VARIANT = Variant(
    model_type="rotating-head-gpt2",
    lm_class=RotatingHeadGPT2LMHeadModel,
    architecture="RotatingHeadGPT2LMHeadModel",
    twin_module="rotating_head_gpt2",
    twin_config="RotatingHeadGPT2Config",
    defaults=dict(rotatinghead="lr", use_norm=False, base_frequency=10000.0, gp_scales="code"),
    bools=("use_norm",),
    floats=("base_frequency",),
    choices={"rotatinghead": ("lr", "gp"), "gp_scales": ("code", "seed")},
    check=_check,
    describing_keys=("rotatinghead", "use_norm", "base_frequency", "gp_scales"),
    layer_params=_layer_params,
    complete_from_weights=_complete_from_weights,
    # The -norm runs used the original's later code, which always applies the frequency LayerNorm
    # (the first lr/gp runs had none: our default).
    experiments={"rotating-head-lr-gpt2-medium-wikitext": {}, "rotating-head-gp-gpt2-medium-wikitext": {},
                 "rotating-head-lr-norm-gpt2-medium-wikitext": {"use_norm": True},
                 "rotating-head-gp-norm-gpt2-medium-wikitext": {"use_norm": True}},
)
