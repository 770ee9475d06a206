"""Training and inference throughput, JAX beside the PyTorch twin: `python benchmark.py --help`."""
import sys

from flax_gpt2v.cli.benchmark import main

if __name__ == "__main__":
    sys.exit(main())
