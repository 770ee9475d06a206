"""Train a model: `python train_jax.py --config configs/X.json [--key value ...]`; `--help` lists every key
(flax_gpt2v/cli/train.py)."""
import sys

from flax_gpt2v.cli.train import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
