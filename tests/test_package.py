"""`pip install .` gives a working package: installed outside the checkout, used from another directory,
it imports, builds, saves and exports a model (the twins' sources and the GPU targets come with it) and its
console scripts run."""
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

USE = """
import json, os, sys
import flax_gpt2v as fg
from flax_gpt2v.hf import checkpoint
from flax_gpt2v.evaluation import aot
assert os.path.dirname(fg.__file__).startswith(sys.argv[1]), fg.__file__
assert all(path.is_file() for path in aot.TARGETS.values())
lm = fg.init({"model_type": "dd-gpt2", "n_layer": 2, "n_embd": 32, "n_head": 4, "n_positions": 16, "vocab_size": 64})
lm.save("native")
checkpoint.export_hf("native", "hf")
print(json.dumps(sorted(os.listdir("hf"))))
"""


@pytest.mark.slow
def test_pip_install_gives_a_package_usable_from_any_directory(tmp_path):
    # A copy of what a source distribution holds, so the build writes nothing into the checkout.
    source, site = tmp_path / "source", tmp_path / "site"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".*", "tests", "runs", "build", "*.egg-info",
                                                                "__pycache__"))
    # --no-deps --no-build-isolation: the dependencies are this environment's, and no network is needed.
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(site), str(source)], check=True, cwd=tmp_path)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "JAX_PLATFORMS": "cpu"}
    run = subprocess.run([sys.executable, "-c", USE, str(site)], cwd=work, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    files = run.stdout.strip().splitlines()[-1]
    assert "modeling_dd_gpt2.py" in files and "model.safetensors" in files
    # The console scripts' entry points, called as pip's generated scripts call them.
    for entry in ("flax_gpt2v.cli.train:main", "flax_gpt2v.cli.convert:to_torch", "flax_gpt2v.cli.evaluate:main"):
        module, func = entry.split(":")
        run = subprocess.run([sys.executable, "-c", f"import sys; from {module} import {func}; sys.exit({func}(['--help']))"],
                             cwd=work, env=env, capture_output=True, text=True)
        assert run.returncode == 0 and "usage" in run.stdout, run.stderr[-2000:]
