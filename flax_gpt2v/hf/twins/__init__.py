"""PyTorch twins of the GPT-2 variants, exported next to converted checkpoints as remote code."""

import re
from pathlib import Path

from .core import CoreGPT2LMHeadModel, CoreGPT2Model
from .dd_gpt2 import DDGPT2Config, DDGPT2LMHeadModel
from .duo_predict_gpt2 import DuoPredictGPT2Config, DuoPredictGPT2LMHeadModel
from .parallel_gpt2 import ParallelGPT2Config, ParallelGPT2LMHeadModel
from .rotating_head_gpt2 import RotatingHeadGPT2Config, RotatingHeadGPT2LMHeadModel

# model_type -> (config class, LM head class, file name of the bundled modeling file); the base model class
# is the LM head class's base_model_class.
TWINS = {
    "dd-gpt2": (DDGPT2Config, DDGPT2LMHeadModel, "modeling_dd_gpt2.py"),
    "parallel-gpt2": (ParallelGPT2Config, ParallelGPT2LMHeadModel, "modeling_parallel_gpt2.py"),
    "duo-predict-gpt2": (DuoPredictGPT2Config, DuoPredictGPT2LMHeadModel, "modeling_duo_predict_gpt2.py"),
    "rotating-head-gpt2": (RotatingHeadGPT2Config, RotatingHeadGPT2LMHeadModel, "modeling_rotating_head_gpt2.py"),
}

_HERE = Path(__file__).parent
# Each variant file starts with exactly one (possibly parenthesised, multi-line) core import.
_CORE_IMPORT = re.compile(r"^from \.core import (\([^)]*\)|[^\n]*)\n", re.MULTILINE)


def bundle_source(model_type):
    """One self-contained modeling file (torch + transformers only) for ``model_type``: core + variant."""
    variant_file = _HERE / Path(TWINS[model_type][1].__module__.rsplit(".", 1)[1] + ".py")
    variant, count = _CORE_IMPORT.subn("", variant_file.read_text(), count=1)
    if count != 1:
        raise RuntimeError(f"{variant_file.name} must import the core with one 'from .core import ...' line")
    return (_HERE / "core.py").read_text() + "\n\n" + variant


def auto_map(model_type):
    """config.json's auto_map for an export: AutoModel gives the base model, as for transformers' GPT-2."""
    config_class, model_class, filename = TWINS[model_type]
    module = filename.removesuffix(".py")
    return {"AutoConfig": f"{module}.{config_class.__name__}",
            "AutoModel": f"{module}.{model_class.base_model_class.__name__}",
            "AutoModelForCausalLM": f"{module}.{model_class.__name__}"}


__all__ = ["TWINS", "auto_map", "bundle_source", "CoreGPT2LMHeadModel", "CoreGPT2Model"] + [
    cls.__name__ for config_class, model_class, _ in TWINS.values()
    for cls in (config_class, model_class, model_class.base_model_class)]
