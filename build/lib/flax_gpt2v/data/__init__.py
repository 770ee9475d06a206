"""Training text to token blocks: sources (Hub datasets, local files, TFDS, the embedded corpus),
the tokenizer, the on-disk token cache and the batches.

May import: flax_gpt2v.config, flax_gpt2v.models (a variant's input layout). Never hf, training or evaluation.
"""
