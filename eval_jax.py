"""Evaluate, compare and sample models: `python eval_jax.py --help` (flax_gpt2v/cli/evaluate.py)."""
import sys

from flax_gpt2v.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
