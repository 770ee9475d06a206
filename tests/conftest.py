"""The suite's one conftest: tests/ on sys.path, the session's JAX compilation cache, the whole_machine group.

Layout: tests/<subpackage>/ mirrors flax_gpt2v/<subpackage>/ (models, hf, data, training, evaluation, cli).
Test modules never import each other; what several share is in tests/helpers.py, which the scripts that
tests run in subprocesses import too (with tests/ on sys.path).

The variants table: helpers.VARIANTS (every JAX variant and option, small configs), with the tables
for the key table (KEY_VARIANTS), the torch twins (TWIN_VARIANTS) and tiny training runs
(TRAIN_VARIANTS); conftest puts tests/ on sys.path, so every test
folder imports them as `from helpers import ...`. The markers are pyproject.toml's.

Run with `python -m pytest -n auto` (pytest-xdist, `--dist loadgroup` from pyproject's addopts)."""
import os
import shutil
import sys
import tempfile

import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)

# One persistent JAX compilation cache for the session, shared by the xdist workers and by every
# subprocess the tests start (they inherit the environment): the tiny models and train steps that
# many tests compile alike are compiled once. Set here, before anything imports jax; the controller
# (or the only process, without -n) makes the directory and removes it at the end. A cache that the
# caller set (JAX_COMPILATION_CACHE_DIR) is used as it is and kept.
_OWN_CACHE = "FLAX_GPT2V_TEST_JAX_CACHE" not in os.environ and "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="flax-gpt2v-jax-cache-")
    os.environ["FLAX_GPT2V_TEST_JAX_CACHE"] = os.environ["JAX_COMPILATION_CACHE_DIR"]
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

# The suite's models are tiny, so its time goes to compiling, not running: LLVM's optimisations off
# halve XLA:CPU's compile time (a tiny train step: 7.7 s of CPU against 4.6 s, AMD EPYC) for a few
# milliseconds more per step. XLA's own HLO passes (fusion, sharding, collectives) still run, and
# the arithmetic stays IEEE (no fast-math either way). Subprocesses inherit it; those that simulate
# devices add to it (helpers.simulated_devices_env).
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()


def pytest_unconfigure(config):
    if _OWN_CACHE and not hasattr(config, "workerinput"):
        shutil.rmtree(os.environ["FLAX_GPT2V_TEST_JAX_CACHE"], ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    # Tests that need the whole machine run one after another on one worker (with --dist loadgroup).
    for item in items:
        if item.get_closest_marker("whole_machine") and not item.get_closest_marker("xdist_group"):
            item.add_marker(pytest.mark.xdist_group("whole_machine"))
