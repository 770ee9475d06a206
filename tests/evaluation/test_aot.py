"""Ahead-of-time compilation (flax_gpt2v/evaluation/aot.py): the pure parts here, cheaply; the compiles for the
H100 under the `aot` marker (they need jax-cuda12-pjrt and jax-cuda12-plugin at jax's version), the full
recipe also under `slow`."""
import json
import os
import subprocess
import sys

import pytest

from flax_gpt2v.config import ConfigError
from flax_gpt2v.evaluation import aot
from flax_gpt2v.evaluation.benchmark import ALL_CONFIGS, make_workload
from flax_gpt2v.training.steps import flops_per_token
from helpers import ROOT

needs_plugin = pytest.mark.skipif(bool(aot.missing_plugins()), reason="deviceless compilation needs "
                                  + ", ".join(aot.missing_plugins()) + " (README: Compile for the H100 without one)")
GIB = 2 ** 30

# A scanned step's shape: a collective in the entry, async ones (counted once, by -start) in a loop body
# that runs 24 times, a reducer computation (to_apply) that holds none, and a fusion.
HLO = """HloModule jit_step, entry_computation_layout={(f32[8]{0})->f32[4]{0}}

%region_add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %add = f32[] add(%a, %b)
}

%fused_computation (p: f32[8]) -> f32[8] {
  %p = f32[8]{0} parameter(0)
  ROOT %n = f32[8]{0} negate(%p)
}

%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %p = (s32[], f32[8]{0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = f32[8]{0} get-tuple-element(%p), index=1
  %all-reduce-start = f32[8]{0} all-reduce-start(%x), channel_id=1, replica_groups={{0,1}}, to_apply=%region_add
  %all-reduce-done = f32[8]{0} all-reduce-done(%all-reduce-start)
  %cp = f32[8]{0} collective-permute(%all-reduce-done), channel_id=2, source_target_pairs={{0,1},{1,0}}
  %f = f32[8]{0} fusion(%cp), kind=kLoop, calls=%fused_computation
  ROOT %t = (s32[], f32[8]{0}) tuple(%i, %f)
}

%cond (p: (s32[], f32[8])) -> pred[] {
  %p = (s32[], f32[8]{0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant(24)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

ENTRY %main (x: f32[8]) -> f32[4] {
  %x = f32[8]{0} parameter(0)
  %ag-start = (f32[8]{0}, f32[16]{0}) all-gather-start(%x), channel_id=3, dimensions={0}, replica_groups={{0,1}}
  %ag-done = f32[16]{0} all-gather-done(%ag-start)
  %zero = s32[] constant(0)
  %init = (s32[], f32[8]{0}) tuple(%zero, %x)
  %w = (s32[], f32[8]{0}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"24"}}
  %y = f32[8]{0} get-tuple-element(%w), index=1
  ROOT %rs = f32[4]{0} reduce-scatter(%y), channel_id=4, dimensions={0}, replica_groups={{0,1}}, to_apply=%region_add
}
"""


def test_count_collectives_per_step():
    assert aot.count_collectives(HLO) == {"all-reduce": 24, "all-gather": 1, "reduce-scatter": 1,
                                          "collective-permute": 24, "all-to-all": 0}
    assert aot.count_collectives("") == dict.fromkeys(aot.COLLECTIVES, 0)


def test_attention_kernel():
    cudnn = ('%custom-call.1 = (bf16[4,16,1024,64]{3,1,2,0}, f32[4,16,1024]{2,1,0}, u8[0]{0}) custom-call(%q, %k, '
             '%v), custom_call_target="__cudnn$fmhaSoftmax", backend_config={}')
    explicit = '%dot.3 = f32[4,16,1024,1024]{3,2,1,0} dot(%q, %k), lhs_contracting_dims={3}, rhs_contracting_dims={3}'
    assert aot.attention_kernel(cudnn) == "cudnn"
    assert aot.attention_kernel(HLO + explicit) == "explicit"


def test_flops_per_step_formula():
    """6N per token for the matmuls forward and backward plus 12 L T d for attention (PaLM, appendix B)."""
    cfg = {"n_layer": 24, "n_embd": 1024}
    assert flops_per_token(cfg, 354_823_168, 1024) == 6 * 354_823_168 + 12 * 24 * 1024 * 1024


def report(**overrides):
    base = dict(device="NVIDIA H100 80GB HBM3", device_memory_bytes=80 * GIB, peak_bytes=100 * GIB,
                argument_bytes=10 * GIB, temp_bytes=80 * GIB, per_device_batch=64, remat="dots")
    return {**base, **overrides}


def test_fit_verdict_and_its_error_line():
    assert aot.fit_error(report(peak_bytes=80 * GIB)) is None
    assert aot.fit_error(report(device_memory_bytes=None)) is None  # a CPU: no device memory to exceed
    # 20 GiB of state and 80 GiB of temporaries at batch 64: 60 GiB of temporaries fit, batch 48.
    assert aot.fit_error(report()) == (
        "peak memory 100.0 GiB per device does not fit the 80.0 GiB of NVIDIA H100 80GB HBM3 (arguments 10.0 GiB, "
        "temporaries 80.0 GiB); try per_device_train_batch_size 48 (now 64), or remat_policy full, or a mesh with "
        "fsdp > 1 over more devices (splits parameters and optimizer state)")
    # State alone over the limit: no batch fits; full remat already on.
    line = aot.fit_error(report(peak_bytes=90 * GIB, temp_bytes=5 * GIB, remat="full"))
    assert "per_device_train_batch_size" not in line and "remat" not in line and "fsdp > 1" in line


def test_missing_plugins_are_named_at_jax_version(monkeypatch):
    import jax

    def version(name):
        raise aot.importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(aot.importlib.metadata, "version", version)
    assert aot.missing_plugins() == [f"jax-cuda12-pjrt=={jax.__version__}", f"jax-cuda12-plugin=={jax.__version__}",
                                     "nvidia-cudnn-cu12"]
    with pytest.raises(ConfigError, match=r"--target h100 compiles without the GPU and needs jax-cuda12-pjrt=="):
        aot.target_devices("h100", 1)
    with pytest.raises(ConfigError, match="--devices: must be a positive integer, got 0"):
        aot.devices_for("h100", {}, 0)


def tiny_run_config(tmp_path):
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps({"model_type": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 2, "n_positions": 64,
                               "vocab_size": 256, "block_size": 64, "per_device_train_batch_size": 4,
                               "output_dir": str(tmp_path / "run")}))
    return str(cfg)


def test_check_on_this_machine_reports_and_trains_nothing(tmp_path, capsys):
    from flax_gpt2v.cli.train import main

    assert main(["--config", tiny_run_config(tmp_path), "--check"]) == 0
    out = capsys.readouterr().out
    assert "peak memory" in out and "attention: explicit" in out and out.endswith("fits: the run can start\n")
    assert not (tmp_path / "run").exists()


@pytest.mark.aot
@needs_plugin
def test_check_refuses_a_step_too_big_for_the_h100(tmp_path):
    """The tiny model's explicit attention scores at batch 4096 x 1024 positions need more than 80 GB."""
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train_jax.py"), "--config", tiny_run_config(tmp_path),
                        "--check", "--target", "h100", "--n_positions", "1024", "--block_size", "1024",
                        "--per_device_train_batch_size", "4096"], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT})
    assert r.returncode == 2, r.stderr[-3000:]
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: peak memory ")
    assert "of NVIDIA H100 80GB HBM3" in r.stderr and "try per_device_train_batch_size" in r.stderr


@pytest.mark.aot
@needs_plugin
@pytest.mark.parametrize("name", ALL_CONFIGS)
def test_every_variant_compiles_for_the_h100_with_fused_attention(name, tmp_path, capsys):
    """Reduced size, no dropout, through `benchmark.py --aot h100`: the step compiles for the H100, its attention
    is cuDNN's fused kernel, and the JSON and table report it."""
    from flax_gpt2v.evaluation.benchmark import main

    output = tmp_path / "aot.json"
    assert main(["--aot", "h100", "--config", name, "--size", "tiny", "--seq", "128", "--batch", "2",
                 "--attn-pdrop", "0", "--output", str(output)]) == 0
    report = json.loads(output.read_text())
    assert report["command"].startswith("python benchmark.py --aot h100") and report["environment"]["jax-cuda12-pjrt"]
    (r,) = report["results"]
    work = make_workload(name, "tiny", 128, 2)
    assert r["config"] == name and r["attention"] == "cudnn" and r["device_memory_bytes"] == 84942979072
    assert 0 < r["peak_bytes"] < GIB and r["collectives"] == dict.fromkeys(aot.COLLECTIVES, 0)
    assert r["input_length"] == work.length and r["global_batch"] == 2
    assert r["flops_per_step"] == flops_per_token(work.cfg, r["num_params"], work.length) * 2 * work.length
    assert f"| {name} | 2 | 0 |" in capsys.readouterr().out


@pytest.mark.aot
@pytest.mark.slow
@needs_plugin
def test_original_recipe_fits_the_h100(tmp_path):
    """The README's command: every variant at gpt2-medium, seq 1024, batch 64, bf16, remat dots, attn_pdrop 0.1
    as the original trained compiles (duo-predict's interleaved length too, with Triton gemms on) and fits in
    80 GB; explicit attention, since dropout has no fused kernel."""
    from flax_gpt2v.evaluation.benchmark import main

    output = tmp_path / "aot.json"
    assert main(["--aot", "h100", "--all", "--size", "gpt2-medium", "--seq", "1024", "--batch", "64",
                 "--output", str(output)]) == 0
    results = json.loads(output.read_text())["results"]
    assert [r["config"] for r in results] == list(ALL_CONFIGS)
    for r in results:
        assert r["attn_pdrop"] == 0.1 and r["attention"] == "explicit", r["config"]
        assert aot.fit_error(r) is None and r["peak_bytes"] < 0.8 * r["device_memory_bytes"], r["config"]
