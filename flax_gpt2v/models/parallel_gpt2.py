"""Parallel GPT-2 (docs/variants/parallel-gpt2.md): layers run in pairs on the same input, merged by a bottleneck.

Differs from GPT-2 only in `Transformer.run_blocks`: blocks 2p and 2p+1 both read x and
their outputs a, b become the next x as (a + b) / 2 ("mean"), a + b ("add"), or
bottleneck(concat(a, b)) with ONE Linear(2d -> d) shared by all pairs ("concat").

The two blocks of a pair are independent given x, so they run as one computation: the
stacked layers [L, ...] (stored as GPT-2 stores them, like the HF state dict's h.{i}) are
viewed as [L/2, 2, ...] and a single block is vmapped over the branch axis; the pairs then
run like layers.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

from flax_gpt2v.config import key_error
from flax_gpt2v.models.gpt2 import GPT2LMHeadModel, Transformer, logical, normal, run_layers
from flax_gpt2v.models.variant import ParamRow, Variant


class ParallelTransformer(Transformer):
    def setup(self):
        super().setup()
        if self.cfg["bottleneck_method"] == "concat":
            self.bottleneck = nn.Dense(self.cfg["n_embd"], dtype=self.dtype,
                                       kernel_init=logical(normal(self.cfg["initializer_range"]), "concat", "embed"),
                                       bias_init=logical(nn.initializers.zeros, "embed"))

    def merge_fn(self):
        """(a, b) -> next x as a pure function (it runs inside the scan over pairs)."""
        method = self.cfg["bottleneck_method"]
        if method == "mean":
            return lambda a, b: (a + b) / 2
        if method == "add":
            return lambda a, b: a + b
        if self.is_initializing():  # the scan body is pure: the parameters must exist before it
            self.bottleneck(jnp.zeros((1, 2 * self.cfg["n_embd"]), self.dtype))
        dense = nn.Dense(self.cfg["n_embd"], dtype=self.dtype, parent=None)
        params = self.bottleneck.variables["params"]
        return lambda a, b: dense.apply({"params": params}, jnp.concatenate([a, b], axis=-1))

    def run_blocks(self, x, positions, mask, cache, cache_index, deterministic: bool):
        layer = self.layer_fn(positions, mask, cache_index, deterministic)
        merge = self.merge_fn()
        # Layer inputs [L, ...] -> [L/2, 2, ...]: pair p is layers (2p, 2p+1).
        pairs = jax.tree.map(lambda a: a.reshape(a.shape[0] // 2, 2, *a.shape[1:]),
                             self.layer_inputs(cache, deterministic))

        def pair(x, xs):
            ys, kv = jax.vmap(lambda params, kv, rngs: layer(params, x, kv, rngs))(*xs)
            return merge(ys[0], ys[1]), kv

        x, kv = run_layers(pair, x, pairs, self.scan)
        if cache is None:
            return x, None
        return x, {"k": kv[0].reshape(cache["k"].shape), "v": kv[1].reshape(cache["v"].shape)}


class ParallelGPT2LMHeadModel(GPT2LMHeadModel):
    transformer_cls = ParallelTransformer


def _check(cfg: dict) -> None:
    if cfg["n_layer"] % 2:
        raise key_error("n_layer", f"parallel-gpt2 needs an even number of layers, got {cfg['n_layer']}")


def _model_params(cfg) -> list[ParamRow]:
    d = cfg["n_embd"]
    if cfg["bottleneck_method"] != "concat":
        return []
    # torch keeps the bottleneck as an nn.Linear: [out, in], the transpose of the Flax kernel.
    return [("transformer/bottleneck/kernel", (2 * d, d), "transpose"), ("transformer/bottleneck/bias", (d,))]


VARIANT = Variant(
    model_type="parallel-gpt2",
    lm_class=ParallelGPT2LMHeadModel,
    architecture="ParallelGPT2LMHeadModel",
    twin_module="parallel_gpt2",
    twin_config="ParallelGPT2Config",
    defaults=dict(bottleneck_method="mean"),
    choices={"bottleneck_method": ("mean", "add", "concat")},
    check=_check,
    describing_keys=("bottleneck_method",),
    model_params=_model_params,
    experiments={"parallel-gpt2-medium-wikitext": {}, "parallel-mean-bottleneck-gpt2-medium-wikitext": {}},
)
