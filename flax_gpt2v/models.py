"""model_type -> Flax model class."""
from .dd_gpt2 import DDGPT2LMHeadModel
from .duo_predict_gpt2 import DuoPredictGPT2LMHeadModel
from .gpt2 import GPT2LMHeadModel
from .parallel_gpt2 import ParallelGPT2LMHeadModel
from .rotating_head_gpt2 import RotatingHeadGPT2LMHeadModel

MODEL_CLASSES = {
    "gpt2": GPT2LMHeadModel,
    "dd-gpt2": DDGPT2LMHeadModel,
    "parallel-gpt2": ParallelGPT2LMHeadModel,
    "duo-predict-gpt2": DuoPredictGPT2LMHeadModel,
    "rotating-head-gpt2": RotatingHeadGPT2LMHeadModel,
}


def build_model(cfg: dict, dtype=None, remat: bool = False):
    """The Flax module for a validated config; dtype is the compute dtype (params stay fp32)."""
    import jax.numpy as jnp
    return MODEL_CLASSES[cfg["model_type"]](cfg, dtype=dtype or jnp.float32, remat=remat)
