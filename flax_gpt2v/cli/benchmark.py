"""`python benchmark.py` / `flax-gpt2v-benchmark`: training and inference throughput, JAX beside the
PyTorch twin (flax_gpt2v/evaluation/benchmark.py)."""
import os


def main(argv=None) -> int:
    # Before JAX starts a GPU backend: allocate on demand, so that PyTorch fits beside it.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    from flax_gpt2v.evaluation.benchmark import main as benchmark
    return benchmark(argv)
