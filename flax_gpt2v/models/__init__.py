"""model_type -> Flax model class, and the one place that builds a module and makes its parameters."""
import flax.linen as nn
import jax
import jax.numpy as jnp

from flax_gpt2v.models.dd_gpt2 import DDGPT2LMHeadModel
from flax_gpt2v.models.duo_predict_gpt2 import DuoPredictGPT2LMHeadModel
from flax_gpt2v.models.gpt2 import REMAT_POLICIES, GPT2LMHeadModel
from flax_gpt2v.models.parallel_gpt2 import ParallelGPT2LMHeadModel
from flax_gpt2v.models.rotating_head_gpt2 import RotatingHeadGPT2LMHeadModel

MODEL_CLASSES = {
    "gpt2": GPT2LMHeadModel,
    "dd-gpt2": DDGPT2LMHeadModel,
    "parallel-gpt2": ParallelGPT2LMHeadModel,
    "duo-predict-gpt2": DuoPredictGPT2LMHeadModel,
    "rotating-head-gpt2": RotatingHeadGPT2LMHeadModel,
}
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn")


def attention_implementation(choice: str, dtype) -> str:
    """"auto" -> cuDNN's fused attention on a GPU in bf16/fp16 (the only dtypes it takes), else XLA."""
    if choice not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"attention implementation must be one of {', '.join(ATTENTION_IMPLEMENTATIONS)}, "
                         f"got {choice!r}")
    if choice != "auto":
        return choice
    fused = jax.default_backend() == "gpu" and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    return "cudnn" if fused else "xla"


def build_model(cfg: dict, dtype=None, remat: str = "none", scan: bool = True, attention: str = "auto"):
    """The Flax module for a validated config.

    dtype: compute dtype (params stay fp32); remat: "none", "full" or "dots" (see
    gpt2.REMAT_POLICIES); scan: layers as one lax.scan (the layer compiled once);
    attention: "auto", "xla" or "cudnn".
    """
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat must be one of {', '.join(REMAT_POLICIES)}, got {remat!r}")
    dtype = dtype or jnp.float32
    return MODEL_CLASSES[cfg["model_type"]](cfg, dtype=dtype, remat=remat, scan=scan,
                                            attention_implementation=attention_implementation(attention, dtype))


def _boxed_params(module, key):
    return module.init(key, jnp.zeros((1, 1), jnp.int32))["params"]


def init_params(module, key):
    """Fresh fp32 parameters (plain arrays) of `module`: GPT-2's init (docs/gpt2.md)."""
    return nn.unbox(_boxed_params(module, key))


def param_axes(module) -> dict[str, tuple]:
    """'/'-joined parameter path -> its logical axis names (one per array axis), as the modules
    declare them; computed from shapes only."""
    boxed = jax.eval_shape(lambda key: _boxed_params(module, key), jax.random.PRNGKey(0))
    leaves = jax.tree_util.tree_flatten_with_path(boxed, is_leaf=lambda a: isinstance(a, nn.Partitioned))[0]
    return {"/".join(k.key for k in path): tuple(box.names) for path, box in leaves}
