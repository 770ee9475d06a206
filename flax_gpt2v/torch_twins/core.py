"""Self-contained GPT-2 causal LM (Hugging Face GPT2LMHeadModel semantics and state-dict names).

Variants subclass one hook point:
- ``CoreSelfAttention.rotate_qk`` / ``CoreSelfAttention.transform_heads`` (per-layer attention changes),
- ``CoreTransformer.layout`` (positions and which keys each query may see),
- ``CoreTransformer.run_blocks`` (how the block stack is run),
and point ``CoreGPT2LMHeadModel.attention_class`` / ``transformer_class`` at their subclass.

Trains like transformers' own GPT-2: attention through ``torch.nn.functional.scaled_dot_product_attention``
by default (``attn_implementation="eager"`` selects the explicit softmax path), bf16 autocast, and gradient
checkpointing of every block after ``model.gradient_checkpointing_enable()``.
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, GPT2Config, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import logging

logger = logging.get_logger(__name__)


class Conv1D(nn.Module):
    """HF GPT-2 projection: weight stored [in, out], y = x @ W + b.

    ``residual`` marks the projections that write into the residual stream (the c_proj layers), which
    GPT-2 initialises with a smaller std.
    """

    def __init__(self, n_in, n_out, residual=False):
        super().__init__()
        self.residual = residual
        self.weight = nn.Parameter(torch.empty(n_in, n_out))
        self.bias = nn.Parameter(torch.zeros(n_out))

    def forward(self, x):
        # addmm like HF's Conv1D, so that under autocast the bias add runs in the autocast dtype too.
        out = torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight)
        return out.view(*x.shape[:-1], out.shape[-1])


class CoreSelfAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        # Kept for config._attn_implementation, read at every call so set_attn_implementation() takes effect.
        self.config = config
        self.n_head = config.n_head
        self.head_dim = config.n_embd // config.n_head
        self.layer_idx = layer_idx
        self.c_attn = Conv1D(config.n_embd, 3 * config.n_embd)
        self.c_proj = Conv1D(config.n_embd, config.n_embd, residual=True)
        self.attn_dropout = nn.Dropout(config.attn_pdrop)
        self.resid_dropout = nn.Dropout(config.resid_pdrop)

    def rotate_qk(self, q, k, positions):
        """q, k: [B, H, T, Dh]; positions: [B or 1, T] absolute positions of the new tokens."""
        return q, k

    def transform_heads(self, o):
        """o: per-head attention output [B, T, H, Dh], before heads are merged."""
        return o

    def eager_attention(self, q, k, v, allowed):
        """softmax(q k^T / sqrt(Dh)) v with fp32 scores; allowed None means plain causal (no cache)."""
        if allowed is None:
            allowed = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
        scores = (q @ k.transpose(-1, -2)).float() * self.head_dim**-0.5
        # finfo.min instead of -inf: a query with no visible key (a left-padding slot) gets a
        # uniform distribution instead of NaN.
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
        probs = self.attn_dropout(scores.softmax(dim=-1).to(v.dtype))
        return probs @ v

    def sdpa_attention(self, q, k, v, allowed):
        """The same through torch's fused kernels: the causal (flash) kernel when allowed is None."""
        mask = None
        if allowed is not None:
            # An additive finfo.min mask rather than the bool one: a query with no visible key gets the
            # eager path's uniform distribution (a bool mask gives NaN or zeros depending on the kernel).
            mask = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device)
            mask = mask.masked_fill(~allowed, torch.finfo(q.dtype).min)
        return F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.attn_dropout.p if self.training else 0.0,
            is_causal=allowed is None,
            scale=self.head_dim**-0.5,
        )

    def forward(self, x, positions, allowed, cache):
        """allowed: bool [B or 1, 1, T, past + T], True where a query may see a key; None for the plain
        causal mask over the new tokens without a cache."""
        batch, length, _ = x.shape
        q, k, v = self.c_attn(x).view(batch, length, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4)
        # Rotate before caching so cached keys keep the rotation of their own position.
        q, k = self.rotate_qk(q, k, positions)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        if self.config._attn_implementation == "eager":
            o = self.eager_attention(q, k, v, allowed)
        else:
            o = self.sdpa_attention(q, k, v, allowed)
        o = self.transform_heads(o.transpose(1, 2))
        return self.resid_dropout(self.c_proj(o.reshape(batch, length, -1)))


class CoreMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        inner = config.n_inner if config.n_inner is not None else 4 * config.n_embd
        self.c_fc = Conv1D(config.n_embd, inner)
        self.c_proj = Conv1D(inner, config.n_embd, residual=True)
        self.dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, x):
        # gelu_new is exactly torch's tanh-approximated GELU.
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class CoreBlock(GradientCheckpointingLayer):
    """``gradient_checkpointing_enable()`` makes every call of a block in training a torch checkpoint."""

    def __init__(self, config, layer_idx, attention_class):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = attention_class(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = CoreMLP(config)

    def forward(self, x, positions, allowed, cache):
        x = x + self.attn(self.ln_1(x), positions, allowed, cache)
        return x + self.mlp(self.ln_2(x))


class CoreTransformer(nn.Module):
    def __init__(self, config, attention_class):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.drop = nn.Dropout(config.embd_pdrop)
        self.h = nn.ModuleList(CoreBlock(config, i, attention_class) for i in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)

    def layout(self, length, past_length, position_ids, device):
        """Positions [B or 1, T] of the new tokens and the bool mask allowed[B or 1, 1, T, past + T],
        or None for the plain causal mask without a cache (SDPA then runs its causal kernel)."""
        if position_ids is None:
            position_ids = torch.arange(past_length, past_length + length, device=device)[None]
        if not past_length:
            return position_ids, None
        query = torch.arange(past_length, past_length + length, device=device)[:, None]
        key = torch.arange(past_length + length, device=device)[None]
        return position_ids, (key <= query)[None, None]

    def run_blocks(self, x, positions, allowed, cache):
        # With gradient checkpointing enabled, every block call below is a checkpoint (CoreBlock is a
        # GradientCheckpointingLayer), so overrides of run_blocks get it too.
        for block in self.h:
            x = block(x, positions, allowed, cache)
        return x

    def forward(self, input_ids, cache=None, attention_mask=None, position_ids=None):
        length = input_ids.shape[1]
        past_length = cache.get_seq_length() if cache is not None else 0
        positions, allowed = self.layout(length, past_length, position_ids, input_ids.device)
        if attention_mask is not None:
            if attention_mask.dim() != 2 or attention_mask.shape[1] != past_length + length:
                raise ValueError(
                    "attention_mask must be 2D [batch, past + new tokens] "
                    f"({past_length + length}), got shape {tuple(attention_mask.shape)}"
                )
            if not attention_mask.all():
                # Padding slots are hidden as keys; their own outputs are meaningless but finite.
                if allowed is None:
                    allowed = torch.ones(length, length, dtype=torch.bool, device=input_ids.device).tril()
                allowed = allowed & attention_mask.bool()[:, None, None, :]
        x = self.drop(self.wte(input_ids) + self.wpe(positions))
        return self.ln_f(self.run_blocks(x, positions, allowed, cache))


def causal_lm_loss(logits, labels):
    """Hugging Face causal-LM loss: position t predicts labels[t + 1], mean CE, -100 ignored."""
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten().to(logits.device), ignore_index=-100
    )


class CoreGPT2LMHeadModel(PreTrainedModel, GenerationMixin):
    config_class = GPT2Config
    base_model_prefix = "transformer"
    transformer_class = CoreTransformer
    attention_class = CoreSelfAttention
    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}
    _no_split_modules = ["CoreBlock"]
    _supports_sdpa = True
    supports_gradient_checkpointing = True
    _skip_keys_device_placement = ["past_key_values"]

    def __init__(self, config):
        super().__init__(config)
        self.transformer = self.transformer_class(config, self.attention_class)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.transformer.wte

    def set_input_embeddings(self, new_embeddings):
        self.transformer.wte = new_embeddings

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        # The scaled init lives on Conv1D itself, not on its parent module: for remote code, transformers
        # skips _init_weights on modules without parameters of their own (attention, MLP).
        if isinstance(module, Conv1D):
            std = self.config.initializer_range
            if module.residual:
                # GPT-2 scales the residual-branch output projections by 1/sqrt(2 * n_layer).
                std /= (2 * self.config.n_layer) ** 0.5
            init.normal_(module.weight, mean=0.0, std=std)
            init.zeros_(module.bias)

    def forward(
        self,
        input_ids,
        past_key_values=None,
        attention_mask=None,
        position_ids=None,
        labels=None,
        use_cache=None,
        return_dict=None,
        **kwargs,
    ):
        use_cache = self.config.use_cache if use_cache is None else use_cache
        return_dict = self.config.return_dict if return_dict is None else return_dict
        if self.training and any(block.gradient_checkpointing for block in self.transformer.h):
            # The backward pass reruns every block, which would write its keys into a cache twice.
            if past_key_values is not None:
                raise ValueError("a KV cache cannot be used in training with gradient checkpointing")
            if use_cache:
                logger.warning_once("use_cache=True is incompatible with gradient checkpointing; not caching")
                use_cache = False
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        hidden = self.transformer(input_ids, past_key_values, attention_mask, position_ids)
        logits = self.lm_head(hidden)
        output = CausalLMOutputWithPast(
            loss=None if labels is None else causal_lm_loss(logits, labels),
            logits=logits,
            past_key_values=past_key_values if use_cache else None,
        )
        return output if return_dict else output.to_tuple()
