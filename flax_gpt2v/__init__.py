"""flax-gpt2v: GPT-2 and four research variants in Flax, with exact PyTorch/HF conversion.

    import flax_gpt2v as fg
    lm = fg.init(config, seed=0)      # dict or JSON path
    lm = fg.load(path)                # native checkpoint or HF/torch directory
    lm(input_ids), lm.generate(input_ids), lm.save(path)
"""
from flax_gpt2v.config import ConfigError
from flax_gpt2v.models import load_config
from flax_gpt2v.lm import LM, init, load
from flax_gpt2v.models import VARIANTS, build_model

__all__ = ["ConfigError", "LM", "VARIANTS", "build_model", "init", "load", "load_config"]
