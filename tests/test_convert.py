"""Key table, native checkpoints, HF import/export and the convert CLIs."""
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import safetensors.numpy
from safetensors import safe_open

from flax_gpt2v.checkpoint import (CheckpointError, is_hf, is_native, load_hf_dir, load_native,
                                   save_hf_dir, save_native)
from flax_gpt2v.config import load_config
from flax_gpt2v.keymap import (ConversionError, flatten_params, flax_to_torch_state, key_table,
                               torch_to_flax_params, unflatten_params)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "original")
ORIGINAL_CASES = sorted(os.listdir(FIXTURES))
TINY = dict(n_layer=2, n_embd=16, n_head=4, n_positions=8, vocab_size=32)
# Every model type and every option that changes the parameter set.
VARIANTS = {
    "gpt2": dict(model_type="gpt2"),
    "dd-drift": dict(model_type="dd-gpt2", apply_drift=True, apply_diffusion=False, baseline_each_head=True),
    "dd-drift-nobaseline": dict(model_type="dd-gpt2", apply_drift=True, apply_diffusion=False,
                                baseline_each_head=False),
    "dd-diffusion": dict(model_type="dd-gpt2", apply_drift=False, apply_diffusion=True),
    "dd-both": dict(model_type="dd-gpt2", apply_drift=True, apply_diffusion=True),
    "dd-none": dict(model_type="dd-gpt2", apply_drift=False, apply_diffusion=False),
    "parallel-mean": dict(model_type="parallel-gpt2", bottleneck_method="mean"),
    "parallel-add": dict(model_type="parallel-gpt2", bottleneck_method="add"),
    "parallel-concat": dict(model_type="parallel-gpt2", bottleneck_method="concat", n_layer=4),
    "duo": dict(model_type="duo-predict-gpt2"),
    "rh-lr": dict(model_type="rotating-head-gpt2", rotatinghead="lr"),
    "rh-lr-norm": dict(model_type="rotating-head-gpt2", rotatinghead="lr", use_norm=True),
    "rh-gp": dict(model_type="rotating-head-gpt2", rotatinghead="gp"),
    "rh-gp-norm": dict(model_type="rotating-head-gpt2", rotatinghead="gp", use_norm=True),
}


def tiny_config(variant, **overrides):
    return load_config({**TINY, **VARIANTS[variant], **overrides})


def random_params(cfg, seed=0):
    """Random values for every key, the embedding's padding rows zero as in any real model."""
    rng = np.random.default_rng(seed)
    flat = {e.flax_path: rng.standard_normal(e.shape).astype(np.float32) for e in key_table(cfg)}
    flat["transformer/wte/embedding"][cfg["vocab_size"]:] = 0
    return unflatten_params(flat)


def assert_same_tree(a, b):
    fa, fb = flatten_params(a), flatten_params(b)
    assert sorted(fa) == sorted(fb)
    for k in fa:
        assert np.asarray(fb[k]).dtype == np.asarray(fa[k]).dtype, k
        np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=k)


def fixture_state(case):
    return safetensors.numpy.load_file(os.path.join(FIXTURES, case, "model.safetensors"))


# ---- key table ----

@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_round_trip_is_bit_exact(variant):
    cfg = tiny_config(variant)
    params = random_params(cfg)
    state = flax_to_torch_state(params, cfg)
    assert "lm_head.weight" not in state
    assert sorted(state) == sorted(e.torch_key for e in key_table(cfg))
    assert_same_tree(params, torch_to_flax_params(state, cfg))


def test_padded_embedding_is_trimmed_on_export_and_padded_on_import():
    cfg = tiny_config("gpt2", vocab_size=100)
    params = random_params(cfg)
    state = flax_to_torch_state(params, cfg)
    assert params["transformer"]["wte"]["embedding"].shape == (128, 16)
    assert state["transformer.wte.weight"].shape == (100, 16)
    assert_same_tree(params, torch_to_flax_params(state, cfg))
    params["transformer"]["wte"]["embedding"][120, 3] = 1.0
    with pytest.raises(ConversionError, match="non-zero padding rows beyond 100"):
        flax_to_torch_state(params, cfg)


def test_variant_keys():
    keys = {v: {e.torch_key for e in key_table(tiny_config(v))} for v in VARIANTS}
    base = keys["gpt2"]
    assert keys["dd-drift"] - base == {f"transformer.h.{i}.attn.{n}" for i in (0, 1)
                                       for n in ("drift_param", "baseline")}
    assert keys["dd-drift-nobaseline"] - base == {f"transformer.h.{i}.attn.drift_param" for i in (0, 1)}
    assert keys["dd-none"] == keys["parallel-mean"] == keys["duo"] == keys["rh-gp"] == base
    assert keys["rh-gp-norm"] - base == {f"transformer.h.{i}.attn.rope.layer_norm.{n}" for i in (0, 1)
                                         for n in ("weight", "bias")}


def test_concat_bottleneck_is_transposed():
    cfg = tiny_config("parallel-concat")
    params = random_params(cfg)
    kernel = params["transformer"]["bottleneck"]["kernel"]
    assert kernel.shape == (32, 16)
    np.testing.assert_array_equal(flax_to_torch_state(params, cfg)["transformer.bottleneck.weight"], kernel.T)


def test_torch_side_reports_every_problem_at_once():
    cfg = tiny_config("dd-both")
    state = flax_to_torch_state(random_params(cfg), cfg)
    del state["transformer.h.1.attn.baseline"]
    del state["transformer.ln_f.bias"]
    state["transformer.h.0.attn.bogus"] = np.zeros(3, np.float32)
    state["transformer.h.0.attn.drift_param"] = np.zeros((4, 3), np.float32)
    with pytest.raises(ConversionError) as info:
        torch_to_flax_params(state, cfg)
    err = info.value
    assert err.missing == ["transformer.h.1.attn.baseline", "transformer.ln_f.bias"]
    assert err.unexpected == ["transformer.h.0.attn.bogus"]
    assert err.mismatched == [("transformer.h.0.attn.drift_param", (4, 4), (4, 3))]
    msg = str(err)
    assert "\n" not in msg
    for key in ("transformer.h.1.attn.baseline", "transformer.ln_f.bias", "transformer.h.0.attn.bogus",
                "transformer.h.0.attn.drift_param expected (4, 4) got (4, 3)"):
        assert key in msg


def test_flax_side_reports_every_problem_at_once():
    cfg = tiny_config("rh-lr-norm")
    flat = flatten_params(random_params(cfg))
    del flat["transformer/h/0/attn/rope/layer_norm/scale"]
    flat["transformer/h/0/attn/rope/extra"] = np.zeros(2, np.float32)
    flat["transformer/wpe/embedding"] = np.zeros((9, 16), np.float32)
    with pytest.raises(ConversionError) as info:
        flax_to_torch_state(unflatten_params(flat), cfg)
    err = info.value
    assert err.missing == ["transformer/h/0/attn/rope/layer_norm/scale"]
    assert err.unexpected == ["transformer/h/0/attn/rope/extra"]
    assert err.mismatched == [("transformer/wpe/embedding", (8, 16), (9, 16))]


def test_wrong_variant_state_is_rejected():
    cfg = tiny_config("gpt2")
    state = flax_to_torch_state(random_params(tiny_config("rh-lr")), tiny_config("rh-lr"))
    with pytest.raises(ConversionError, match="unexpected 2 key"):
        torch_to_flax_params(state, cfg)


def test_tied_lm_head_is_consumed_untied_rejected():
    cfg = tiny_config("gpt2")
    params = random_params(cfg)
    state = flax_to_torch_state(params, cfg)
    state["lm_head.weight"] = state["transformer.wte.weight"].copy()
    assert_same_tree(params, torch_to_flax_params(state, cfg))
    state["lm_head.weight"][0, 0] += 1
    with pytest.raises(ConversionError, match="lm_head.weight differs from transformer.wte.weight"):
        torch_to_flax_params(state, cfg)


# ---- native checkpoints ----

def write_tokenizer(directory):
    os.makedirs(directory, exist_ok=True)
    for name, text in (("vocab.json", '{"a": 0}'), ("merges.txt", "#version: 0.2\n")):
        with open(os.path.join(directory, name), "w") as f:
            f.write(text)


def test_native_round_trip(tmp_path):
    cfg = tiny_config("parallel-concat")
    params = random_params(cfg)
    write_tokenizer(tmp_path / "tok")
    files = save_native(tmp_path / "ck", cfg, params, tokenizer_dir=tmp_path / "tok")
    assert files == ["config.json", "flax_params.safetensors", "merges.txt", "vocab.json"]
    assert is_native(tmp_path / "ck") and not is_hf(tmp_path / "ck")
    assert json.loads((tmp_path / "ck" / "config.json").read_text())["flax_gpt2v_format"] == 2
    cfg2, params2 = load_native(tmp_path / "ck")
    assert cfg2 == cfg
    assert_same_tree(params, params2)
    assert sorted(os.listdir(tmp_path)) == ["ck", "tok"]  # no temporary directories left


def test_native_save_refuses_to_overwrite(tmp_path):
    cfg = tiny_config("gpt2")
    os.makedirs(tmp_path / "empty")
    save_native(tmp_path / "empty", cfg, random_params(cfg))  # an empty directory is fine
    with pytest.raises(CheckpointError, match="refusing to overwrite"):
        save_native(tmp_path / "empty", cfg, random_params(cfg, seed=1))
    save_native(tmp_path / "empty", cfg, random_params(cfg, seed=1), overwrite=True)
    assert_same_tree(random_params(cfg, seed=1), load_native(tmp_path / "empty")[1])
    assert sorted(os.listdir(tmp_path)) == ["empty"]


def test_failed_save_keeps_existing_checkpoint(tmp_path):
    cfg = tiny_config("gpt2")
    save_native(tmp_path / "ck", cfg, random_params(cfg))
    os.makedirs(tmp_path / "no-tokenizer")
    with pytest.raises(CheckpointError, match="no tokenizer files"):
        save_native(tmp_path / "ck", cfg, random_params(cfg, seed=1), tokenizer_dir=tmp_path / "no-tokenizer",
                    overwrite=True)
    assert_same_tree(random_params(cfg), load_native(tmp_path / "ck")[1])
    assert sorted(os.listdir(tmp_path)) == ["ck", "no-tokenizer"]


def test_corrupt_native_checkpoint(tmp_path):
    cfg = tiny_config("gpt2")
    save_native(tmp_path / "ck", cfg, random_params(cfg))
    weights = tmp_path / "ck" / "flax_params.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"^corrupt checkpoint: .*flax_params\.safetensors: "):
        load_native(tmp_path / "ck")
    weights.unlink()
    with pytest.raises(CheckpointError, match="has no flax_params.safetensors"):
        load_native(tmp_path / "ck")


def test_native_checkpoint_with_wrong_keys(tmp_path):
    cfg = tiny_config("gpt2")
    save_native(tmp_path / "ck", cfg, random_params(cfg))
    raw = json.loads((tmp_path / "ck" / "config.json").read_text())
    (tmp_path / "ck" / "config.json").write_text(json.dumps({**raw, "n_layer": 3}))
    with pytest.raises(ConversionError, match="missing 12 key"):
        load_native(tmp_path / "ck")


# ---- HF directories ----

@pytest.mark.parametrize("case", ORIGINAL_CASES)
def test_original_hub_format_loads_strictly(case):
    cfg, params = load_hf_dir(os.path.join(FIXTURES, case))
    if cfg["model_type"] == "rotating-head-gpt2":
        assert cfg["use_norm"] == case.endswith("-norm")
    expected = fixture_state(case)
    state = flax_to_torch_state(params, cfg)
    assert sorted(state) == sorted(expected)
    for key in expected:
        np.testing.assert_array_equal(state[key], expected[key], err_msg=key)


def test_original_lm_head_accepted_if_tied(tmp_path):
    state = fixture_state("gpt2")
    state["lm_head.weight"] = state["transformer.wte.weight"]
    write_hf_copy(tmp_path, "gpt2", state)
    load_hf_dir(tmp_path)
    state["lm_head.weight"] = state["transformer.wte.weight"] * 2
    write_hf_copy(tmp_path, "gpt2", state)
    with pytest.raises(ConversionError, match="lm_head.weight differs"):
        load_hf_dir(tmp_path)


def write_hf_copy(directory, case, state):
    with open(os.path.join(FIXTURES, case, "config.json")) as f:
        (directory / "config.json").write_text(f.read())
    safetensors.numpy.save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})


def test_hf_export_gpt2_loads_in_transformers(tmp_path):
    import torch
    from transformers import GPT2LMHeadModel

    case = os.path.join(FIXTURES, "gpt2")
    cfg, params = load_hf_dir(case)
    write_tokenizer(tmp_path / "tok")
    result = save_hf_dir(tmp_path / "hf", cfg, params, tokenizer_dir=tmp_path / "tok")
    assert result == {"dtype": "float32", "files": ["config.json", "generation_config.json", "merges.txt",
                                                    "model.safetensors", "vocab.json"]}
    written = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert written["architectures"] == ["GPT2LMHeadModel"] and "auto_map" not in written
    assert written["tie_word_embeddings"] is True and written["torch_dtype"] == written["dtype"] == "float32"
    model, info = GPT2LMHeadModel.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    with torch.no_grad():
        logits = model.eval()(torch.from_numpy(np.load(os.path.join(case, "input_ids.npy")))).logits
    np.testing.assert_allclose(logits.numpy(), np.load(os.path.join(case, "logits.npy")), atol=1e-4, rtol=1e-4)
    cfg2, params2 = load_hf_dir(tmp_path / "hf")
    assert cfg2 == cfg
    assert_same_tree(params, params2)
    with pytest.raises(CheckpointError, match="refusing to overwrite"):
        save_hf_dir(tmp_path / "hf", cfg, params)


def test_bf16_export_writes_bf16(tmp_path):
    import torch

    cfg = tiny_config("gpt2")
    params = random_params(cfg)
    assert save_hf_dir(tmp_path / "hf", cfg, params, dtype="bfloat16")["dtype"] == "bfloat16"
    written = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert written["torch_dtype"] == written["dtype"] == "bfloat16"
    with safe_open(tmp_path / "hf" / "model.safetensors", framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    rounded = {k: torch.from_numpy(v).to(torch.bfloat16).float().numpy()
               for k, v in flatten_params(params).items()}
    assert_same_tree(unflatten_params(rounded), load_hf_dir(tmp_path / "hf")[1])


# Needs the torch twins (another module); import them lazily so the rest runs without them.
@pytest.mark.parametrize("case", [c for c in ORIGINAL_CASES if c != "gpt2"])
def test_hf_export_variants_load_with_remote_code(tmp_path, case):
    if not os.path.exists(os.path.join(ROOT, "flax_gpt2v", "torch_twins", "__init__.py")):
        pytest.skip("flax_gpt2v.torch_twins not written yet")
    import torch
    from transformers import AutoModelForCausalLM

    from flax_gpt2v.torch_twins import TWINS

    cfg, params = load_hf_dir(os.path.join(FIXTURES, case))
    files = save_hf_dir(tmp_path / "hf", cfg, params)["files"]
    _, model_cls, filename = TWINS[cfg["model_type"]]
    assert filename in files
    written = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert written["auto_map"]["AutoModelForCausalLM"] == f"{filename[:-3]}.{model_cls.__name__}"
    assert set(written["auto_map"]) == {"AutoConfig", "AutoModel", "AutoModelForCausalLM"}
    model, info = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True,
                                                       output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    with torch.no_grad():
        ids = torch.from_numpy(np.load(os.path.join(FIXTURES, case, "input_ids.npy")))
        logits = model.eval()(ids).logits
    np.testing.assert_allclose(logits.numpy(), np.load(os.path.join(FIXTURES, case, "logits.npy")),
                               atol=1e-4, rtol=1e-4)


# ---- CLIs ----

def load_cli(script):
    # In-process (each interpreter start costs seconds); one test runs a script for real.
    spec = importlib.util.spec_from_file_location(script[:-3], os.path.join(ROOT, "convert", script))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


TO_TORCH, FROM_TORCH = load_cli("to_torch.py"), load_cli("from_torch.py")


def cli(capsys, main, *args):
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_round_trip_and_overwrite_refusal(tmp_path, capsys):
    native, hf = tmp_path / "native", tmp_path / "hf"
    code, _, err = cli(capsys, FROM_TORCH, os.path.join(FIXTURES, "gpt2"), native)
    assert code == 0, err
    assert is_native(native)
    write_tokenizer(native)

    code, out, err = cli(capsys, TO_TORCH, native, hf, "--dtype", "bfloat16")
    assert code == 0, err
    assert "bfloat16" in out
    assert (hf / "vocab.json").read_text() == (native / "vocab.json").read_text()
    before = (hf / "model.safetensors").read_bytes()

    code, _, err = cli(capsys, FROM_TORCH, hf, native)
    assert code == 2 and err.startswith("error: ") and "refusing to overwrite" in err
    # The script itself, as a user runs it.
    run = subprocess.run([sys.executable, "convert/to_torch.py", str(native), str(hf)],
                         cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 2
    assert run.stderr.startswith("error: ") and run.stderr.count("\n") == 1
    assert "refusing to overwrite" in run.stderr
    assert (hf / "model.safetensors").read_bytes() == before

    code, out, err = cli(capsys, TO_TORCH, native, hf, "--force")
    assert code == 0, err
    assert "float32" in out
    assert_same_tree(load_native(native)[1], load_hf_dir(hf)[1])


def test_cli_bad_source(tmp_path, capsys):
    code, _, err = cli(capsys, TO_TORCH, tmp_path / "missing", tmp_path / "out")
    assert code == 2 and err.startswith("error: not a flax_gpt2v checkpoint")
    code, _, err = cli(capsys, FROM_TORCH, tmp_path, tmp_path)
    assert code == 2 and "same directory" in err
    assert not os.path.exists(tmp_path / "out")
