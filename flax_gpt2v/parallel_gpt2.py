"""Parallel GPT-2 (SPEC 3): layers run in pairs on the same input, merged by a bottleneck.

Differs from GPT-2 only in `Transformer.run_blocks`: blocks 2p and 2p+1 both read x and
their outputs a, b become the next x as (a + b) / 2 ("mean"), a + b ("add"), or
bottleneck(concat(a, b)) with ONE Linear(2d -> d) shared by all pairs ("concat").

The two blocks of a pair are independent given x, so they run as one computation:
their parameters (still stored as h/{2p} and h/{2p+1}, like the HF state dict) are
stacked on a branch axis and a single block is vmapped over it.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

from .gpt2 import Block, GPT2LMHeadModel, Transformer, normal


class ParallelTransformer(Transformer):
    def setup(self):
        super().setup()
        if self.cfg["bottleneck_method"] == "concat":
            self.bottleneck = nn.Dense(self.cfg["n_embd"], dtype=self.dtype,
                                       kernel_init=normal(self.cfg["initializer_range"]))

    def merge(self, a, b):
        method = self.cfg["bottleneck_method"]
        if method == "mean":
            return (a + b) / 2
        if method == "add":
            return a + b
        return self.bottleneck(jnp.concatenate([a, b], axis=-1))

    def pair(self, p: int, x, positions, mask, kv, cache_index, deterministic: bool):
        """Both blocks of pair p, vmapped over the branch axis: ([2, B, T, d], kv [2, ...])."""
        if self.is_initializing():
            # Parameters come into being through the ordinary per-layer modules.
            outs = [self.h(2 * p + j, x, positions, mask, None if kv is None else (kv[0][j], kv[1][j]),
                           cache_index, deterministic) for j in range(2)]
            ys = jnp.stack([o[0] for o in outs])
            return ys, None if kv is None else tuple(jnp.stack([o[1][n] for o in outs]) for n in range(2))
        params = self.h.variables["params"]
        branch = jax.tree.map(lambda a, b: jnp.stack([a, b]), params[str(2 * p)], params[str(2 * p + 1)])
        block = Block(self.cfg, self.attention_cls, self.dtype, parent=None)
        rngs = {} if deterministic else {"dropout": jax.random.split(self.make_rng("dropout"), 2)}

        def one(params, rngs, kv):
            return block.apply({"params": params}, x, positions, mask, kv, cache_index, deterministic, rngs=rngs)

        if self.remat:
            one = jax.checkpoint(one)
        return jax.vmap(one)(branch, rngs, kv)

    def run_blocks(self, x, positions, mask, cache, cache_index, deterministic: bool):
        new_k, new_v = [], []
        for p in range(self.cfg["n_layer"] // 2):
            kv = None if cache is None else (cache["k"][2 * p:2 * p + 2], cache["v"][2 * p:2 * p + 2])
            ys, kv = self.pair(p, x, positions, mask, kv, cache_index, deterministic)
            x = self.merge(ys[0], ys[1])
            if kv is not None:
                new_k.append(kv[0])
                new_v.append(kv[1])
        return x, (None if cache is None else {"k": jnp.concatenate(new_k), "v": jnp.concatenate(new_v)})


class ParallelGPT2LMHeadModel(GPT2LMHeadModel):
    transformer_cls = ParallelTransformer
