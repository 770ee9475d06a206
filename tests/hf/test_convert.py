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

from flax_gpt2v.hf.checkpoint import CheckpointError, is_hf, is_native, load_hf_dir, load_native, save_hf_dir, save_native
from flax_gpt2v.models import load_config
from flax_gpt2v.hf.keymap import (ConversionError, flatten_params, flax_shapes, flax_to_torch_state, key_table,
                                  torch_to_flax_params, unflatten_params)

from helpers import (FIXTURES, KEY_TINY as TINY, KEY_VARIANTS as VARIANTS, ROOT, openai_config,  # noqa: F401
                     reference_gpt2, save_layout)

ORIGINAL_CASES = sorted(os.listdir(FIXTURES))
def tiny_config(variant, **overrides):
    return load_config({**TINY, **VARIANTS[variant], **overrides})


def random_params(cfg, seed=0):
    """Random values for every key, the embedding's padding rows zero as in any real model."""
    rng = np.random.default_rng(seed)
    flat = {path: rng.standard_normal(shape).astype(np.float32) for path, shape in flax_shapes(cfg).items()}
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


def test_layer_slices_map_to_torch_layers():
    """Slice i of a stacked leaf is transformer.h.{i}; qkv [d, 3, H, Dh] and c_proj [H, Dh, d] hold
    Conv1D's [d, 3d] and [d, d] in its order: column s*d + h*Dh + j is (s, h, j)."""
    cfg = tiny_config("gpt2", n_layer=3)
    params = random_params(cfg)
    state = flax_to_torch_state(params, cfg)
    attn = params["transformer"]["h"]["attn"]
    d, h, dh = 16, 4, 4
    assert attn["c_attn"]["kernel"].shape == (3, d, 3, h, dh) and attn["c_proj"]["kernel"].shape == (3, h, dh, d)
    for i in range(3):
        qkv = state[f"transformer.h.{i}.attn.c_attn.weight"]
        np.testing.assert_array_equal(qkv[:, d + 2 * dh + 1], attn["c_attn"]["kernel"][i, :, 1, 2, 1])  # k, head 2
        np.testing.assert_array_equal(state[f"transformer.h.{i}.attn.c_attn.bias"][2 * d:3 * d],
                                      attn["c_attn"]["bias"][i, 2].ravel())
        np.testing.assert_array_equal(state[f"transformer.h.{i}.attn.c_proj.weight"][dh * 3 + 2],
                                      attn["c_proj"]["kernel"][i, 3, 2])
        np.testing.assert_array_equal(state[f"transformer.h.{i}.mlp.c_fc.weight"],
                                      params["transformer"]["h"]["mlp"]["c_fc"]["kernel"][i])


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
    del flat["transformer/h/attn/rope/layer_norm/scale"]
    flat["transformer/h/attn/rope/extra"] = np.zeros(2, np.float32)
    flat["transformer/wpe/embedding"] = np.zeros((9, 16), np.float32)
    flat["transformer/h/attn/c_attn/kernel"] = flat["transformer/h/attn/c_attn/kernel"][:1]  # one layer of two
    with pytest.raises(ConversionError) as info:
        flax_to_torch_state(unflatten_params(flat), cfg)
    err = info.value
    assert err.missing == ["transformer/h/attn/rope/layer_norm/scale"]
    assert err.unexpected == ["transformer/h/attn/rope/extra"]
    assert err.mismatched == [("transformer/wpe/embedding", (8, 16), (9, 16)),
                              ("transformer/h/attn/c_attn/kernel", (2, 16, 3, 4, 4), (1, 16, 3, 4, 4))]


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
    assert json.loads((tmp_path / "ck" / "config.json").read_text())["flax_gpt2v_format"] == 3
    cfg2, params2 = load_native(tmp_path / "ck")
    assert cfg2 == cfg
    assert_same_tree(params, params2)
    assert sorted(os.listdir(tmp_path)) == ["ck", "tok"]  # no temporary directories left


@pytest.mark.parametrize("case", ["dd-both", "parallel-concat"])
def test_format_2_native_checkpoint_still_loads(case):
    """Written by flax-gpt2v before the layers were stacked (per-layer h/{i} keys, [d, 3d] qkv):
    converted on load, the same function as then (its logits saved beside it)."""
    import flax_gpt2v as fg

    path = os.path.join(ROOT, "tests", "fixtures", "native-format2", case)
    assert json.load(open(os.path.join(path, "config.json")))["flax_gpt2v_format"] == 2
    cfg, params = load_native(path)
    assert sorted(flatten_params(params)) == sorted(flax_shapes(cfg))
    lm = fg.load(path)
    ids = np.arange(12).reshape(2, 6) % 50
    np.testing.assert_allclose(np.asarray(lm(ids)), np.load(os.path.join(path, "logits.npy")), rtol=1e-5, atol=1e-5)


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
    # Stacked layers: a third layer is a longer layer axis on every per-layer leaf.
    with pytest.raises(ConversionError, match=r"12 shape mismatch\(es\): transformer/h/ln_1/scale expected \(3, 16\) "
                                              r"got \(2, 16\)"):
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
        pytest.skip("flax_gpt2v.hf.twins not written yet")
    import torch
    from transformers import AutoModelForCausalLM

    from flax_gpt2v.hf.twins import TWINS

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
    # The script itself, as a user runs it (the package installed: here, this checkout on the path).
    run = subprocess.run([sys.executable, "convert/to_torch.py", str(native), str(hf)],
                         cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT})
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


# ---- GPT-2 and the variants as published (issue 10): layouts, buffers, old configs ----

LAYOUTS = ("safetensors", "bin", "sharded-safetensors", "sharded-bin", "openai-bin", "openai-safetensors")
# Random tiny configs, one per layout, each off the defaults in its own way.
LAYOUT_CONFIGS = {
    "safetensors": dict(activation_function="gelu_pytorch_tanh"),
    "bin": dict(reorder_and_upcast_attn=True, n_inner=None),
    "sharded-safetensors": dict(n_layer=3, n_head=4, n_embd=32),
    "sharded-bin": dict(vocab_size=130, layer_norm_epsilon=1e-6),
    "openai-bin": dict(n_layer=1),
    "openai-safetensors": dict(n_positions=28, n_head=2),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_gpt2_layouts_give_transformers_logits(layout, tmp_path, capsys):
    import torch
    from transformers import GPT2LMHeadModel

    import flax_gpt2v as fg

    model = reference_gpt2(LAYOUTS.index(layout), **LAYOUT_CONFIGS[layout])
    if layout in ("safetensors", "sharded-safetensors"):  # what transformers writes today
        model.save_pretrained(tmp_path / "hf", max_shard_size="20KB" if layout.startswith("sharded") else "5GB")
        assert os.path.isfile(tmp_path / "hf" / ("model.safetensors.index.json" if layout.startswith("sharded")
                                                 else "model.safetensors"))
    else:  # transformers 5 no longer writes .bin files: written as transformers 4 and the OpenAI repos did
        config = openai_config(model.config) if layout.startswith("openai") else model.config.to_dict()
        save_layout(tmp_path / "hf", model.state_dict(), config, layout)
    reference = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()  # transformers reads it alike
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, (2, 9))
    with torch.no_grad():
        expected = model(torch.from_numpy(ids)).logits.numpy()
        np.testing.assert_array_equal(reference(torch.from_numpy(ids)).logits.numpy(), expected)
        tokens = reference.generate(torch.from_numpy(ids[:, :5]), max_new_tokens=20, do_sample=False,
                                    pad_token_id=0).numpy()

    lm = fg.load(tmp_path / "hf")
    np.testing.assert_allclose(np.asarray(lm(ids)), expected, atol=1e-4, rtol=1e-4)
    ours = np.asarray(lm.generate(ids[:, :5].astype(np.int32), max_new_tokens=20))
    assert len(set(ours[:, 5:].ravel().tolist())) > 3, "degenerate generation proves nothing"
    np.testing.assert_array_equal(ours, tokens)

    code, _, err = cli(capsys, FROM_TORCH, tmp_path / "hf", tmp_path / "native")
    assert code == 0, err
    assert_same_tree(lm.params, load_native(tmp_path / "native")[1])


@pytest.mark.parametrize("layout", ["bin", "sharded-safetensors", "sharded-bin", "openai-bin", "openai-safetensors"])
@pytest.mark.parametrize("case", ORIGINAL_CASES)
def test_original_checkpoints_in_every_layout(case, layout, tmp_path):
    import torch

    with open(os.path.join(FIXTURES, case, "config.json")) as f:
        config = json.load(f)
    state = {k: torch.from_numpy(v) for k, v in fixture_state(case).items()}
    if layout == "bin":  # torch.save of the full state dict keeps the tied head
        state["lm_head.weight"] = state["transformer.wte.weight"]
    save_layout(tmp_path, state, config, layout)
    if layout == "openai-safetensors":  # a base-model state dict saved next to the tied head
        import safetensors.torch
        base = safetensors.torch.load_file(tmp_path / "model.safetensors")
        base["lm_head.weight"] = base["wte.weight"].clone()
        safetensors.torch.save_file(base, tmp_path / "model.safetensors", metadata={"format": "pt"})
    cfg, params = load_hf_dir(tmp_path)
    expected_cfg, expected = load_hf_dir(os.path.join(FIXTURES, case))
    assert cfg == expected_cfg
    assert_same_tree(expected, params)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_bin_widens_exactly(dtype, tmp_path):
    import torch

    cfg = tiny_config("rh-lr-norm")
    params = random_params(cfg)
    state = {k: torch.from_numpy(v).to(getattr(torch, dtype)) for k, v in flax_to_torch_state(params, cfg).items()}
    save_layout(tmp_path, state, {**cfg, "torch_dtype": dtype}, "sharded-bin")
    widened = {k: v.float().numpy() for k, v in state.items()}
    assert_same_tree(torch_to_flax_params(widened, cfg), load_hf_dir(tmp_path)[1])


def gpt2_dir(tmp_path, layout="bin", state_edit=None, **config_edit):
    """A small valid GPT-2 directory, then one thing changed."""
    import torch

    cfg = tiny_config("gpt2")
    state = {k: torch.from_numpy(v) for k, v in flax_to_torch_state(random_params(cfg), cfg).items()}
    if state_edit:
        state_edit(state)
    config = {**cfg, **config_edit}
    save_layout(tmp_path / "hf", state, {k: v for k, v in config.items() if v is not ...}, layout)
    return tmp_path / "hf"


def _set(key, value):
    return lambda state: state.__setitem__(key, value)


def _mixed_prefix(state):
    state["ln_f.weight"] = state.pop("transformer.ln_f.weight")


def _foreign_names(state):
    for k in list(state):
        state["model.decoder." + k[len("transformer."):]] = state.pop(k)


REFUSALS = {
    "relu": (dict(activation_function="relu"), None, "activation_function relu is not supported"),
    "gelu": (dict(activation_function="gelu"), None, "activation_function gelu is not supported"),
    "inverse-layer-idx": (dict(scale_attn_by_inverse_layer_idx=True), None,
                          "scale_attn_by_inverse_layer_idx true is not supported"),
    "unscaled": (dict(scale_attn_weights=False), None, "scale_attn_weights false is not supported"),
    "untied-config": (dict(tie_word_embeddings=False), None, "tie_word_embeddings false is not supported"),
    "pruned": (dict(pruned_heads={"0": [1]}), None, 'pruned_heads {"0": [1]} is not supported'),
    "untied-head": ({}, lambda s: s.__setitem__("lm_head.weight", s["transformer.wte.weight"] + 1),
                    "lm_head.weight differs from transformer.wte.weight"),
    "mixed-prefix": ({}, _mixed_prefix, "keys lack the `transformer.` prefix that others have: 1 key(s), "
                                        "e.g. ln_f.weight"),
    "foreign-names": ({}, _foreign_names, "keys lack the `transformer.` prefix and are not GPT2Model's either, "
                                          "e.g. model.decoder."),
    "nan": ({}, lambda s: s["transformer.h.1.mlp.c_fc.weight"].__setitem__((0, 0), float("nan")),
            "transformer.h.1.mlp.c_fc.weight has 1 non-finite value(s) (NaN/inf)"),
    "inf": ({}, lambda s: s["transformer.wpe.weight"].__setitem__((3, 1), float("-inf")),
            "transformer.wpe.weight has 1 non-finite value(s) (NaN/inf)"),
    "int": ({}, lambda s: s.__setitem__("transformer.ln_f.bias", s["transformer.ln_f.bias"].long()),
            "transformer.ln_f.bias is int64, not floating point"),
}


@pytest.mark.parametrize("cause", sorted(REFUSALS))
def test_refusals_are_one_line_naming_the_cause(cause, tmp_path, capsys):
    config_edit, state_edit, message = REFUSALS[cause]
    hf = gpt2_dir(tmp_path, state_edit=state_edit, **config_edit)
    with pytest.raises(ValueError) as info:
        load_hf_dir(hf)
    assert message in str(info.value) and "\n" not in str(info.value)
    code, out, err = cli(capsys, FROM_TORCH, hf, tmp_path / "native")
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and message in err
    assert not os.path.exists(tmp_path / "native")


def _buffers(edit):
    def write(tmp_path):
        import torch

        hf = gpt2_dir(tmp_path, layout="openai-bin")
        state = torch.load(hf / "pytorch_model.bin", weights_only=True)
        edit(state)
        torch.save(state, hf / "pytorch_model.bin")
        return hf
    return write


def _remove(directory, name):
    os.remove(os.path.join(directory, name))
    return directory


LAYOUT_REFUSALS = {
    "no-weights": (lambda t: _remove(gpt2_dir(t), "pytorch_model.bin"),
                   "no weights file (model.safetensors, pytorch_model.bin or a sharded index) in "),
    "shards-without-index": (lambda t: _remove(gpt2_dir(t, "sharded-safetensors"), "model.safetensors.index.json"),
                             "sharded checkpoint without its index: "),
    "missing-shard": (lambda t: _remove(gpt2_dir(t, "sharded-bin"), "pytorch_model-00002-of-00003.bin"),
                      "sharded checkpoint incomplete: "),
    "mask-not-causal": (_buffers(lambda s: s["h.1.attn.bias"].fill_(1.0)),
                        "h.1.attn.bias is not GPT-2's causal mask buffer: it does not hold the lower triangle"),
    "mask-wrong-size": (_buffers(lambda s: s.__setitem__("h.0.attn.bias", s["h.0.attn.bias"][:, :, :4, :4])),
                        "h.0.attn.bias is not GPT-2's causal mask buffer: shape (1, 1, 4, 4)"),
    "masked-bias-wrong": (_buffers(lambda s: s["h.0.attn.masked_bias"].fill_(-1e9)),
                          "h.0.attn.masked_bias is not GPT-2's masked_bias buffer"),
}


@pytest.mark.parametrize("cause", sorted(LAYOUT_REFUSALS))
def test_layout_refusals_are_one_line_naming_the_cause(cause, tmp_path, capsys):
    make, message = LAYOUT_REFUSALS[cause]
    hf = make(tmp_path)
    with pytest.raises(CheckpointError) as info:
        load_hf_dir(hf)
    assert message in str(info.value) and "\n" not in str(info.value)
    code, _, err = cli(capsys, FROM_TORCH, hf, tmp_path / "native")
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and message in err


class NotATensor:
    pass


def test_safetensors_is_read_before_bin_as_in_transformers(tmp_path):
    import torch

    hf = gpt2_dir(tmp_path, layout="safetensors")
    cfg = tiny_config("gpt2")
    torch.save({k: torch.from_numpy(v) for k, v in flax_to_torch_state(random_params(cfg, seed=1), cfg).items()},
               hf / "pytorch_model.bin")
    assert_same_tree(random_params(cfg), load_hf_dir(hf)[1])


def test_missing_sizes_mean_transformers_gpt2_defaults(tmp_path):
    import torch
    from transformers import GPT2Config

    defaults = GPT2Config()
    cfg = tiny_config("gpt2", n_layer=1, n_embd=24, n_head=defaults.n_head, vocab_size=defaults.vocab_size,
                      n_positions=defaults.n_positions)
    state = {k: torch.from_numpy(v) for k, v in flax_to_torch_state(random_params(cfg), cfg).items()}
    # An old config.json written without the keys that equalled GPT2Config's defaults.
    save_layout(tmp_path, state, {"model_type": "gpt2", "n_layer": 1, "n_embd": 24}, "bin")
    got, _ = load_hf_dir(tmp_path)
    assert [got[k] for k in ("n_head", "vocab_size", "n_positions", "bos_token_id", "eos_token_id")] == \
        [defaults.n_head, defaults.vocab_size, defaults.n_positions, defaults.bos_token_id, defaults.eos_token_id]


def test_bin_is_read_with_the_weights_only_loader(tmp_path):
    import torch

    hf = gpt2_dir(tmp_path)
    state = torch.load(hf / "pytorch_model.bin", weights_only=True)
    state["payload"] = NotATensor()  # unpickling this would run arbitrary code in a real attack
    torch.save(state, hf / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"^cannot read .*pytorch_model\.bin with torch's weights-only "
                                              r"loader: ") as info:
        load_hf_dir(hf)
    assert "\n" not in str(info.value)


def test_key_mismatch_is_one_short_line(tmp_path):
    cfg = tiny_config("rh-lr")
    state = flax_to_torch_state(random_params(cfg), cfg)
    with pytest.raises(ConversionError) as info:
        torch_to_flax_params(state, tiny_config("gpt2", n_layer=3))
    msg = str(info.value)
    assert "\n" not in msg and len(msg) < 400, msg
    assert "unexpected 2 key(s): transformer.h.{0-1}.attn.rope.frequencies" in msg
    names = [k[len("transformer.h.2."):] for k in flax_to_torch_state(random_params(tiny_config("gpt2", n_layer=3)),
                                                                     tiny_config("gpt2", n_layer=3))
             if k.startswith("transformer.h.2.")]
    # Every missing name is listed, however many layers lack it.
    assert f"missing 12 key(s): transformer.h.2.{{{','.join(names)}}}" in msg
    with pytest.raises(ConversionError) as info:
        torch_to_flax_params(flax_to_torch_state(random_params(tiny_config("gpt2")), tiny_config("gpt2")),
                             tiny_config("gpt2", n_layer=5))
    msg = str(info.value)
    assert "\n" not in msg and len(msg) < 400, msg
    assert f"missing 36 key(s): transformer.h.{{2-4}}.{{{','.join(names)}}}" in msg
    assert "... and" not in msg
