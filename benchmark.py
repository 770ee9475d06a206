"""Training and inference throughput, JAX beside the PyTorch twin: `python benchmark.py --help`.

All logic is in flax_gpt2v/benchmark.py.
"""
import os
import sys

# Before JAX starts a GPU backend: allocate on demand, so that PyTorch fits beside it.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

from flax_gpt2v.evaluation.benchmark import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
