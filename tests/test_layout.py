"""The package's layout holds: each part imports only what its docstring allows, there are no import
cycles between parts, and no module outside a variant's own files names that variant's model_type."""
import ast
import os
import re

import flax_gpt2v.models as models
from helpers import ROOT

PACKAGE = os.path.join(ROOT, "flax_gpt2v")
# What each part may import (README, Package layout; each part's docstring says the same).
ALLOWED = {
    "config": set(), "errors": set(), "durable": set(),
    "models": {"config"},
    "hf": {"config", "errors", "durable", "models"},
    "data": {"config", "errors", "durable", "models"},
    "training": {"config", "errors", "durable", "models", "hf", "data"},
    "lm": {"config", "models", "hf"},
    "evaluation": {"config", "errors", "durable", "models", "hf", "data", "training", "lm"},
    "cli": {"config", "errors", "durable", "models", "hf", "data", "training", "evaluation", "lm"},
    "__init__": {"config", "lm", "models"},
}


def modules():
    for directory, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                yield os.path.relpath(path, PACKAGE), open(path).read()


def part(relpath: str) -> str:
    return relpath.split(os.sep)[0].removesuffix(".py")


def imported_parts(source: str) -> set[str]:
    parts = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("flax_gpt2v."):
            parts.add(node.module.split(".")[1])
        elif isinstance(node, ast.ImportFrom) and node.module == "flax_gpt2v":
            parts.update(a.name for a in node.names)
    return parts


def test_each_part_imports_only_what_it_may():
    wrong = {}
    for relpath, source in modules():
        if relpath.startswith(os.path.join("hf", "twins")):
            continue  # torch-only remote code, checked below
        extra = imported_parts(source) - ALLOWED[part(relpath)] - {part(relpath)}
        if extra:
            wrong[relpath] = sorted(extra)
    assert not wrong


def test_the_twins_need_only_torch_and_transformers():
    """They are exported as remote code: bundled into one file that imports nothing of ours."""
    for relpath, source in modules():
        if relpath.startswith(os.path.join("hf", "twins")) and not relpath.endswith("__init__.py"):
            assert "flax_gpt2v" not in source, relpath


def test_a_variant_is_named_only_in_its_own_files():
    for variant in models.VARIANTS.values():
        if variant.twin_module is None:
            continue  # plain GPT-2's name is also a tokenizer's and a preset's
        own = {os.path.join("models", f"{variant.twin_module}.py"), os.path.join("hf", "twins", f"{variant.twin_module}.py")}
        # The pure math cites the page of the variant whose math it is (docs/variants/<model_type>.md).
        named = {relpath for relpath, source in modules()
                 if re.search(re.escape(variant.model_type) + r"(?!\.md)", source)}
        assert named <= own, (variant.model_type, sorted(named - own))
