"""Drift-Diffusion GPT-2 (docs/variants/dd-gpt2.md): GPT-2 whose per-head attention output drifts and diffuses.

Differs from GPT-2 only in `Attention.transform_heads`, applied to o = softmax(qk^T) v
[B, T, H, Dh] before heads merge:
  drift:     o + sigmoid(drift_param) * (o - baseline)   (or * o without baseline_each_head)
  diffusion: o + diffusion_param * eps, eps ~ N(0, 1) from the 'diffusion' rng, training only.
"""
import flax.linen as nn
import jax

from flax_gpt2v.config import head_dim
from flax_gpt2v.models.gpt2 import Attention, GPT2LMHeadModel, logical
from flax_gpt2v.models.variant import ParamRow, Variant


class DDAttention(Attention):
    rng_streams = ("dropout", "diffusion")

    def setup(self):
        super().setup()
        cfg = self.cfg
        shape = (cfg["n_head"], head_dim(cfg))
        unit = logical(nn.initializers.normal(stddev=1.0), "heads", "kv")
        if cfg["apply_drift"]:
            self.drift_param = self.param("drift_param", unit, shape)
            if cfg["baseline_each_head"]:
                self.baseline = self.param("baseline", logical(nn.initializers.normal(stddev=1e-3), "heads", "kv"),
                                           shape)
        if cfg["apply_diffusion"]:
            self.diffusion_param = self.param("diffusion_param", unit, shape)

    def transform_heads(self, o, deterministic: bool):
        cfg = self.cfg
        if cfg["apply_drift"]:
            s = jax.nn.sigmoid(self.drift_param).astype(o.dtype)
            o = o + s * (o - self.baseline.astype(o.dtype) if cfg["baseline_each_head"] else o)
        if cfg["apply_diffusion"] and not deterministic:
            eps = jax.random.normal(self.make_rng("diffusion"), o.shape, o.dtype)
            o = o + self.diffusion_param.astype(o.dtype) * eps
        return o


class DDGPT2LMHeadModel(GPT2LMHeadModel):
    attention_cls = DDAttention


def _layer_params(cfg) -> list[ParamRow]:
    shape = (cfg["n_head"], head_dim(cfg))
    rows = []
    if cfg["apply_drift"]:
        rows.append(("attn/drift_param", shape))
        if cfg["baseline_each_head"]:
            rows.append(("attn/baseline", shape))
    if cfg["apply_diffusion"]:
        rows.append(("attn/diffusion_param", shape))
    return rows


VARIANT = Variant(
    model_type="dd-gpt2",
    lm_class=DDGPT2LMHeadModel,
    architecture="DDGPT2LMHeadModel",
    twin_module="dd_gpt2",
    twin_config="DDGPT2Config",
    defaults=dict(apply_drift=True, apply_diffusion=True, baseline_each_head=True),
    bools=("apply_drift", "apply_diffusion", "baseline_each_head"),
    describing_keys=("apply_drift", "apply_diffusion", "baseline_each_head"),
    layer_params=_layer_params,
    experiments={"dd-gpt2-medium-wikitext": {}},
)
