"""One helper turns an exception into the one line an error message quotes (flax_gpt2v/errors.py)."""
from __future__ import annotations

import pathlib
import re

from flax_gpt2v.errors import first_line

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "flax_gpt2v"


def test_first_line():
    assert first_line(OSError("disk gone:\n  Traceback of a worker thread\n")) == "disk gone"
    assert first_line(ValueError("  \n")) == "ValueError"
    assert first_line(KeyError()) == "KeyError"
    assert first_line(ValueError("bad header\nmore"), with_type=True) == "ValueError: bad header"
    assert first_line(RuntimeError(""), with_type=True) == "RuntimeError"


def test_no_module_spells_its_own():
    # Each copy drifted (one kept the trailing colon, one failed on an empty message); there is one.
    own = re.compile(r"str\(\w+\)\.strip\(\)\.splitlines\(\)|def _?first_line")
    found = [f"{path.relative_to(PACKAGE)}:{n}" for path in PACKAGE.rglob("*.py") if path.name != "errors.py"
             for n, line in enumerate(path.read_text().splitlines(), 1) if own.search(line)]
    assert not found, found
