"""Hugging Face and PyTorch on the other side: the key table (keymap), published checkpoint layouts
(layouts), native and HF checkpoint directories (checkpoint), the torch twins exported as remote code
(twins) and the Hub upload (hub).

May import: flax_gpt2v.config, flax_gpt2v.models (the variant registry). Never data, training or evaluation.
"""
