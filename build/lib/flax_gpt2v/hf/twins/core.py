"""Self-contained GPT-2 (Hugging Face GPT2Model / GPT2LMHeadModel semantics and state-dict names).

Variants subclass these hook points:
- ``CoreSelfAttention.rotate_qk`` / ``CoreSelfAttention.transform_heads`` (per-layer attention changes),
- ``CoreGPT2Model.layout`` (positions and which keys each query may see),
- ``CoreGPT2Model.run_blocks`` (how the block stack is run),
- ``CoreGPT2Model.add_variant_modules`` (modules beside the blocks),
- ``init_variant_parameters()`` on any module with parameters of its own (called by ``_init_weights``),
and point ``CoreGPT2Model.attention_class`` and ``CoreGPT2LMHeadModel.base_model_class`` at their subclass.

As in transformers, ``AutoModel`` gives the base model (``last_hidden_state``, ``hidden_states``,
``attentions``) and ``AutoModelForCausalLM`` the LM head on it, whose base model is ``transformer``.
An argument the models cannot honour raises an error naming it; none is dropped silently.

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
from transformers.modeling_outputs import BaseModelOutputWithPastAndCrossAttentions, CausalLMOutputWithPast
from transformers.utils import logging

logger = logging.get_logger(__name__)

# transformers 5.24 renamed past_key_values to cache, in model inputs and outputs; earlier 5.x use the old name.
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
# Passed by generate() of transformers before 5.24; always arange(past, past + new tokens), which the cache gives.
IMPLIED_ARGUMENTS = ("cache_position",)


def refuse_unsupported(model, kwargs):
    """Raise naming every argument given a value that ``model`` does not implement."""
    given = sorted(name for name, value in kwargs.items() if value is not None and name not in IMPLIED_ARGUMENTS)
    if given:
        raise ValueError(f"{type(model).__name__} does not support the argument(s) {', '.join(given)}")


def one_cache(cache, past_key_values):
    """The KV cache, under either of its names."""
    if cache is not None and past_key_values is not None:
        raise ValueError("pass the KV cache as cache or as past_key_values, not both")
    return past_key_values if cache is None else cache


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


class Recorder:
    """What a forward pass was asked for besides its output: each block's input and attention probabilities
    (a list each, None when not asked for)."""

    def __init__(self, hidden_states, attentions):
        self.hidden_states = [] if hidden_states else None
        self.attentions = [] if attentions else None


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
        """(softmax(q k^T / sqrt(Dh)) v, the probabilities) with fp32 scores; allowed None means plain causal."""
        if allowed is None:
            allowed = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
        scores = (q @ k.transpose(-1, -2)).float() * self.head_dim**-0.5
        # finfo.min instead of -inf: a query with no visible key (a left-padding slot) gets a
        # uniform distribution instead of NaN.
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
        probs = self.attn_dropout(scores.softmax(dim=-1).to(v.dtype))
        return probs @ v, probs

    def sdpa_attention(self, q, k, v, allowed):
        """The same output through torch's fused kernels: the causal (flash) kernel when allowed is None."""
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

    def forward(self, x, positions, allowed, cache, record):
        """allowed: bool [B or 1, 1, T, past + T], True where a query may see a key; None for the plain
        causal mask over the new tokens without a cache."""
        batch, length, _ = x.shape
        q, k, v = self.c_attn(x).view(batch, length, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4)
        # Rotate before caching so cached keys keep the rotation of their own position.
        q, k = self.rotate_qk(q, k, positions)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        # SDPA cannot return the probabilities: a call that asks for them runs the eager path, as in transformers.
        if self.config._attn_implementation == "eager" or record.attentions is not None:
            o, probs = self.eager_attention(q, k, v, allowed)
            if record.attentions is not None:
                record.attentions.append(probs)
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

    def forward(self, x, positions, allowed, cache, record):
        # hidden_states[i] is block i's input, as transformers records them.
        if record.hidden_states is not None:
            record.hidden_states.append(x)
        x = x + self.attn(self.ln_1(x), positions, allowed, cache, record)
        return x + self.mlp(self.ln_2(x))


def causal_lm_loss(logits, labels, num_items_in_batch=None):
    """Hugging Face causal-LM loss: position t predicts labels[t + 1], -100 ignored; the mean, or the sum over
    num_items_in_batch (what HF Trainer passes so that gradient accumulation weighs every token alike)."""
    loss = F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(),
        labels[:, 1:].flatten().to(logits.device),
        ignore_index=-100,
        reduction="mean" if num_items_in_batch is None else "sum",
    )
    if num_items_in_batch is None:
        return loss
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch


class CoreGPT2PreTrainedModel(PreTrainedModel):
    config_class = GPT2Config
    base_model_prefix = "transformer"
    _no_split_modules = ["CoreBlock"]
    _supports_sdpa = True
    supports_gradient_checkpointing = True
    _skip_keys_device_placement = ["cache", "past_key_values"]

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
        if hasattr(module, "init_variant_parameters"):
            module.init_variant_parameters()


class CoreGPT2Model(CoreGPT2PreTrainedModel):
    attention_class = CoreSelfAttention

    def __init__(self, config):
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.drop = nn.Dropout(config.embd_pdrop)
        self.h = nn.ModuleList(CoreBlock(config, i, self.attention_class) for i in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.add_variant_modules(config)
        self.post_init()

    def add_variant_modules(self, config):
        """Variants create the modules they add beside the blocks here, before the weights are initialised."""

    def get_input_embeddings(self):
        return self.wte

    def set_input_embeddings(self, new_embeddings):
        self.wte = new_embeddings

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

    def run_blocks(self, x, positions, allowed, cache, record):
        # With gradient checkpointing enabled, every block call below is a checkpoint (CoreBlock is a
        # GradientCheckpointingLayer), so overrides of run_blocks get it too.
        for block in self.h:
            x = block(x, positions, allowed, cache, record)
        return x

    def forward(
        self,
        input_ids=None,
        cache=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        inputs_embeds=None,
        use_cache=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
        past_key_values=None,
        **kwargs,
    ):
        """GPT2Model.forward. token_type_ids are embedded through wte and added, as in GPT-2. hidden_states:
        each block's input, then the output after ln_f (n_layer + 1; parallel pairs share their input)."""
        refuse_unsupported(self, kwargs)
        cache = one_cache(cache, past_key_values)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        return_dict = self.config.return_dict if return_dict is None else return_dict
        output_attentions = self.config.output_attentions if output_attentions is None else output_attentions
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        if self.training and any(block.gradient_checkpointing for block in self.h):
            # The backward pass reruns every block, which would write its keys into a cache twice.
            if cache is not None:
                raise ValueError("a KV cache cannot be used in training with gradient checkpointing")
            if use_cache:
                logger.warning_once("use_cache=True is incompatible with gradient checkpointing; not caching")
                use_cache = False
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if inputs_embeds is None:
            inputs_embeds = self.wte(input_ids)
        length = inputs_embeds.shape[1]
        past_length = cache.get_seq_length() if cache is not None else 0
        if position_ids is not None:
            position_ids = position_ids.reshape(-1, length)
        positions, allowed = self.layout(length, past_length, position_ids, inputs_embeds.device)
        if attention_mask is not None:
            if attention_mask.dim() != 2 or attention_mask.shape[1] != past_length + length:
                raise ValueError(
                    "attention_mask must be 2D [batch, past + new tokens] "
                    f"({past_length + length}), got shape {tuple(attention_mask.shape)}"
                )
            if not attention_mask.all():
                # Padding slots are hidden as keys; their own outputs are meaningless but finite.
                if allowed is None:
                    allowed = torch.ones(length, length, dtype=torch.bool, device=inputs_embeds.device).tril()
                allowed = allowed & attention_mask.bool()[:, None, None, :]
        x = inputs_embeds + self.wpe(positions)
        if token_type_ids is not None:
            x = x + self.wte(token_type_ids.reshape(-1, length))
        record = Recorder(output_hidden_states, output_attentions)
        x = self.ln_f(self.run_blocks(self.drop(x), positions, allowed, cache, record))
        output = BaseModelOutputWithPastAndCrossAttentions(
            last_hidden_state=x,
            hidden_states=None if record.hidden_states is None else (*record.hidden_states, x),
            attentions=None if record.attentions is None else tuple(record.attentions),
            **{CACHE_FIELD: cache if use_cache else None},
        )
        return output if return_dict else output.to_tuple()


class CoreGPT2LMHeadModel(CoreGPT2PreTrainedModel, GenerationMixin):
    base_model_class = CoreGPT2Model
    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}

    def __init__(self, config):
        super().__init__(config)
        self.transformer = self.base_model_class(config)
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

    def forward(
        self,
        input_ids=None,
        cache=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
        logits_to_keep=0,
        num_items_in_batch=None,
        past_key_values=None,
        **kwargs,
    ):
        """GPT2LMHeadModel.forward; arguments as in CoreGPT2Model.forward."""
        refuse_unsupported(self, kwargs)
        return_dict = self.config.return_dict if return_dict is None else return_dict
        base = self.transformer(
            input_ids,
            cache,
            attention_mask,
            token_type_ids,
            position_ids,
            inputs_embeds,
            use_cache,
            output_attentions,
            output_hidden_states,
            return_dict=True,
            past_key_values=past_key_values,
        )
        # logits_to_keep: an int keeps the last that many positions (0: all), a tensor the positions it lists.
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(base.last_hidden_state[:, keep])
        output = CausalLMOutputWithPast(
            loss=None if labels is None else causal_lm_loss(logits, labels, num_items_in_batch),
            logits=logits,
            hidden_states=base.hidden_states,
            attentions=base.attentions,
            **{CACHE_FIELD: getattr(base, CACHE_FIELD)},
        )
        return output if return_dict else output.to_tuple()
