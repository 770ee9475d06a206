from .core import CoreGPT2LMHeadModel, CoreGPT2Model

# Duo-Predict GPT-2 (docs/variants/duo-predict-gpt2.md): interleaved real/mask layout, switched on by the original's length rule.

import torch
from transformers import GPT2Config


class DuoPredictGPT2Config(GPT2Config):
    model_type = "duo-predict-gpt2"


class DuoPredictGPT2Model(CoreGPT2Model):
    config_class = DuoPredictGPT2Config

    def layout(self, length, past_length, position_ids, device):
        # The original's rule, kept so Hub checkpoints behave as before: only an input longer than
        # n_positions is the interleaved x_0, M, x_1, M, ..., x_{L-1}; anything else is plain causal.
        if length <= self.config.n_positions:
            return super().layout(length, past_length, position_ids, device)
        if past_length or position_ids is not None:
            raise ValueError(
                "the interleaved duo layout (input longer than n_positions) derives its own positions and "
                "cannot continue a KV cache; generate in the plain layout"
            )
        index = torch.arange(length, device=device)
        slot = index // 2
        query_real = (index % 2 == 0)[:, None]
        key_real = (index % 2 == 0)[None]
        q_slot, k_slot = slot[:, None], slot[None]
        # Real token x_m sees x_0..x_m; the mask after x_m sees x_0..x_{m-1}, itself and x_{m+1}.
        sees_real = torch.where(query_real, k_slot <= q_slot, (k_slot < q_slot) | (k_slot == q_slot + 1))
        allowed = (key_real & sees_real) | (index[:, None] == index[None])
        return slot[None], allowed[None, None]


class DuoPredictGPT2LMHeadModel(CoreGPT2LMHeadModel):
    config_class = DuoPredictGPT2Config
    base_model_class = DuoPredictGPT2Model
