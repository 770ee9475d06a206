"""The suite's one conftest: paths, markers, the variants table and shared session fixtures.

Layout: tests/<subpackage>/ mirrors flax_gpt2v/<subpackage>/ (models, hf, data, training, evaluation, cli).
Test modules never import each other; what several share is in tests/helpers.py, which the scripts that
tests run in subprocesses import too (with tests/ on sys.path).

The variants table: helpers.VARIANTS (every JAX variant and option, small configs), with the tables
for the key table (KEY_VARIANTS), the torch twins (TWIN_VARIANTS) and tiny training runs
(TRAIN_VARIANTS); conftest puts tests/ on sys.path, so every test
folder imports them as `from helpers import ...`.

Markers (registered in pyproject.toml too):
  slow        runs training in subprocesses (a minute or more on a loaded CPU); deselect with -m 'not slow'
  whole_machine  starts several processes that each want every core (multi-host pairs, 8 simulated
              devices); under pytest-xdist these share one worker (xdist_group "whole_machine") so that
              two of them never run at once."""
import os
import sys

import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)

import helpers  # noqa: E402
from helpers import VARIANTS  # noqa: E402,F401  (the variants table)

MARKERS = {
    "slow": "runs training in subprocesses (a minute or more on a loaded CPU); deselect with -m 'not slow'",
    "whole_machine": "starts several processes that each want the whole machine; under xdist they share one "
                     "worker (xdist_group 'whole_machine')",
}


def pytest_configure(config):
    for name, text in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {text}")


def pytest_collection_modifyitems(config, items):
    # Tests that need the whole machine run one after another on one worker (with --dist loadgroup).
    for item in items:
        if item.get_closest_marker("whole_machine") and not item.get_closest_marker("xdist_group"):
            item.add_marker(pytest.mark.xdist_group("whole_machine"))
