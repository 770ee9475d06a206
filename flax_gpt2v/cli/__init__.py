"""The commands: train (train_jax.py, flax-gpt2v-train), evaluate (eval_jax.py), convert
(convert/*.py) and benchmark (benchmark.py); each follows the error contract of flax_gpt2v.errors.

May import: everything.
"""
