"""PyTorch twins of the GPT-2 variants, exported next to converted checkpoints as remote code.

core.py is GPT-2 with hook points; each variant's file subclasses it and needs only torch and
transformers, so core + variant bundle into one self-contained modeling file. Which file is a
variant's twin, and its class names, come from the variant's spec (flax_gpt2v.models.VARIANTS).
"""

import importlib
import re
from pathlib import Path

from flax_gpt2v.models import VARIANTS

from .core import CoreGPT2LMHeadModel, CoreGPT2Model


def _twin(variant):
    module = importlib.import_module(f"{__name__}.{variant.twin_module}")
    return (getattr(module, variant.twin_config), getattr(module, variant.architecture),
            f"modeling_{variant.twin_module}.py")


# model_type -> (config class, LM head class, file name of the bundled modeling file); the base model class
# is the LM head class's base_model_class. Plain GPT-2 has none: transformers has it.
TWINS = {mt: _twin(v) for mt, v in VARIANTS.items() if v.twin_module is not None}

_HERE = Path(__file__).parent
# Each variant file starts with exactly one (possibly parenthesised, multi-line) core import.
_CORE_IMPORT = re.compile(r"^from \.core import (\([^)]*\)|[^\n]*)\n", re.MULTILINE)


def bundle_source(model_type):
    """One self-contained modeling file (torch + transformers only) for ``model_type``: core + variant."""
    variant_file = _HERE / f"{VARIANTS[model_type].twin_module}.py"
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


__all__ = ["TWINS", "auto_map", "bundle_source", "CoreGPT2LMHeadModel", "CoreGPT2Model"]
