"""Torch twins: reproduce the original classes' tensors, and behave as transformers 5.x models."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, GPT2Config

import helpers
from flax_gpt2v.hf.twins import TWINS, CoreGPT2LMHeadModel, auto_map, bundle_source
from helpers import BF16_SCALE_TOL, FP32_TOL, TWIN_SMALL as SMALL, TWIN_VARIANTS as VARIANTS, random_model

FIXTURES = Path(helpers.FIXTURES)
CASES = sorted(p.name for p in FIXTURES.iterdir() if p.is_dir())
def fixture_model(case):
    """The twin for a fixture case, its weights loaded strictly (only the tied lm_head may be missing)."""
    config = json.loads((FIXTURES / case / "config.json").read_text())
    state = load_file(FIXTURES / case / "model.safetensors")
    if config["model_type"] == "gpt2":
        config_class, model_class = GPT2Config, CoreGPT2LMHeadModel
    else:
        config_class, model_class = TWINS[config["model_type"]][:2]
    if config["model_type"] == "rotating-head-gpt2":
        # The original configs carry no use_norm: the later (normed) version is told apart by its weights.
        config["use_norm"] = any(".rope.layer_norm." in key for key in state)
    model = model_class(config_class(**config))
    result = model.load_state_dict(state, strict=False)
    assert result.missing_keys == ["lm_head.weight"]
    assert result.unexpected_keys == []
    assert model.lm_head.weight is model.transformer.wte.weight
    return model.eval()


def tensor(case, name):
    return torch.from_numpy(np.load(FIXTURES / case / name))


@pytest.mark.parametrize("case", CASES)
def test_fixture_logits_and_loss(case):
    model = fixture_model(case)
    input_ids = tensor(case, "input_ids.npy")
    with torch.no_grad():
        out = model(input_ids, labels=input_ids)
    torch.testing.assert_close(out.logits, tensor(case, "logits.npy"), **FP32_TOL)
    if (FIXTURES / case / "loss.npy").exists():
        torch.testing.assert_close(out.loss, tensor(case, "loss.npy"), **FP32_TOL)


def test_duo_interleaved_fixture():
    model = fixture_model("duo-predict")
    input_ids = tensor("duo-predict", "interleaved_input_ids.npy")
    assert input_ids.shape[1] > model.config.n_positions  # the original's rule selects the interleaved layout
    with torch.no_grad():
        logits = model(input_ids).logits
    torch.testing.assert_close(logits, tensor("duo-predict", "interleaved_logits.npy"), **FP32_TOL)


@pytest.mark.parametrize("variant", VARIANTS)
def test_generate_with_cache_matches_without(variant):
    model = random_model(variant)
    prompt = torch.randint(1, SMALL["vocab_size"], (3, 7), generator=torch.Generator().manual_seed(1))
    args = dict(max_new_tokens=20, min_new_tokens=20, do_sample=False)
    cached = model.generate(prompt, use_cache=True, **args)
    uncached = model.generate(prompt, use_cache=False, **args)
    assert cached.shape == (3, 27)
    assert len(set(cached[:, 7:].flatten().tolist())) > 3, "degenerate generation proves nothing"
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("variant", VARIANTS)
def test_left_padded_generation_matches_unpadded(variant):
    model = random_model(variant)
    prompt = torch.randint(1, SMALL["vocab_size"], (1, 7), generator=torch.Generator().manual_seed(2))
    args = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=0)
    plain = model.generate(prompt, **args)
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), prompt], dim=1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 7, dtype=torch.long)], dim=1)
    assert torch.equal(model.generate(padded, attention_mask=mask, **args)[:, 3:], plain)


def test_dd_diffusion_noise_only_in_training():
    model = random_model("dd-both")
    input_ids = torch.randint(0, SMALL["vocab_size"], (2, 9))
    with torch.no_grad():
        assert torch.equal(model(input_ids).logits, model(input_ids).logits)
        # Dropout off so that only the diffusion noise can make training passes differ.
        model.config.attn_pdrop = model.config.embd_pdrop = model.config.resid_pdrop = 0.0
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        model.train()
        assert not torch.equal(model(input_ids).logits, model(input_ids).logits)
        model.eval()
        assert torch.equal(model(input_ids).logits, model(input_ids).logits)


def test_parallel_requires_even_layers():
    config_class = TWINS["parallel-gpt2"][0]
    with pytest.raises(ValueError, match="Number of hidden layers must be even"):
        config_class(**{**SMALL, "n_layer": 3})


@pytest.mark.parametrize(
    "model_type, key", [("parallel-gpt2", "bottleneck_method"), ("rotating-head-gpt2", "rotatinghead")]
)
def test_unknown_option_raises(model_type, key):
    with pytest.raises(ValueError, match=key):
        TWINS[model_type][0](**{**SMALL, "n_layer": 4, key: "nope"})


@pytest.mark.parametrize("variant", VARIANTS)
def test_bf16_forward_close_to_fp32(variant):
    model = random_model(variant)
    input_ids = torch.randint(0, SMALL["vocab_size"], (2, 9))
    with torch.no_grad():
        reference = model(input_ids).logits
        logits = model.to(torch.bfloat16)(input_ids).logits
    assert logits.dtype == torch.bfloat16
    assert (logits.float() - reference).abs().max() <= BF16_SCALE_TOL * reference.abs().max()


@pytest.mark.parametrize("model_type", TWINS)
def test_bundle_imports_only_torch_and_transformers(model_type):
    source = bundle_source(model_type)
    imported = set(re.findall(r"^(?:from|import) (\S+)", source, re.MULTILINE))
    assert {name.split(".")[0] for name in imported} == {"torch", "transformers"}
    config_class, model_class, _ = TWINS[model_type]
    for cls in (config_class, model_class, model_class.base_model_class):
        assert f"class {cls.__name__}(" in source


@pytest.mark.parametrize("variant", ["dd-both", "parallel-concat", "duo-predict", "rotating-lr-norm"])
def test_remote_code_roundtrip(variant, tmp_path):
    model = random_model(variant)
    config_class, model_class, filename = TWINS[model.config.model_type]
    model.config.auto_map = auto_map(model.config.model_type)
    model.save_pretrained(tmp_path)
    (tmp_path / filename).write_text(bundle_source(model.config.model_type))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True).eval()
    assert type(loaded).__name__ == model_class.__name__ and type(loaded) is not model_class
    input_ids = torch.randint(0, SMALL["vocab_size"], (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids).logits, model(input_ids).logits, **FP32_TOL)


# ---- SDPA attention and gradient checkpointing (how the original trained: HF Trainer, bf16, SDPA) ----

def eager_and_sdpa(variant):
    """The same random model twice: with the explicit softmax attention and with SDPA."""
    eager, sdpa = random_model(variant), random_model(variant)
    eager.set_attn_implementation("eager")
    assert sdpa.config._attn_implementation == "sdpa"  # the default, as for transformers' own models
    return eager, sdpa


def duo_interleaved_ids(model, real=40, seed=3):
    """x_0, M, x_1, M, ..., x_{L-1}: longer than n_positions, so the twin uses the duo layout."""
    tokens = torch.randint(1, SMALL["vocab_size"] - 1, (2, real), generator=torch.Generator().manual_seed(seed))
    ids = torch.full((2, 2 * real - 1), SMALL["vocab_size"] - 1)
    ids[:, 0::2] = tokens
    assert ids.shape[1] > model.config.n_positions
    return ids


@pytest.mark.parametrize("variant", VARIANTS)
def test_sdpa_matches_eager(variant):
    eager, sdpa = eager_and_sdpa(variant)
    input_ids = torch.randint(0, SMALL["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(4))
    # Left padding: a query with no visible key gets the same (finite) output on both paths.
    mask = torch.ones_like(input_ids)
    mask[0, :3] = 0
    with torch.no_grad():
        for kwargs in (dict(), dict(attention_mask=mask)):
            reference = eager(input_ids, **kwargs).logits
            assert torch.isfinite(reference).all()
            torch.testing.assert_close(sdpa(input_ids, **kwargs).logits, reference, **FP32_TOL)
        # One more token on a KV cache: the mask path with a cache offset.
        step = input_ids[:, :1]
        past = [model(input_ids, attention_mask=mask, use_cache=True).past_key_values for model in (eager, sdpa)]
        full_mask = torch.cat([mask, torch.ones_like(step)], dim=1)
        eager_logits, sdpa_logits = (model(step, past_key_values=cache, attention_mask=full_mask).logits
                                     for model, cache in zip((eager, sdpa), past))
        torch.testing.assert_close(sdpa_logits, eager_logits, **FP32_TOL)
    if variant == "duo-predict":
        ids = duo_interleaved_ids(sdpa)
        with torch.no_grad():
            torch.testing.assert_close(sdpa(ids).logits, eager(ids).logits, **FP32_TOL)


@pytest.mark.parametrize("variant", VARIANTS)
def test_sdpa_left_padded_generation_matches_eager(variant):
    eager, sdpa = eager_and_sdpa(variant)
    prompt = torch.randint(1, SMALL["vocab_size"], (2, 7), generator=torch.Generator().manual_seed(5))
    padded = torch.cat([torch.zeros(2, 3, dtype=torch.long), prompt], dim=1)
    mask = torch.ones_like(padded)
    mask[0, :3] = 0
    args = dict(attention_mask=mask, max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=0)
    assert torch.equal(sdpa.generate(padded, **args), eager.generate(padded, **args))


def test_attn_implementation_is_a_loading_option(tmp_path):
    model = random_model("rotating-gp")
    filename = TWINS[model.config.model_type][2]
    model.config.auto_map = auto_map(model.config.model_type)
    model.save_pretrained(tmp_path)
    (tmp_path / filename).write_text(bundle_source(model.config.model_type))
    for implementation in ("eager", "sdpa"):
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True,
                                                      attn_implementation=implementation)
        assert loaded.config._attn_implementation == implementation
    with pytest.raises(ValueError):
        AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True,
                                             attn_implementation="flash_attention_2")


def train_gradients(model, input_ids, seed=7):
    """Gradients of the HF loss in training mode (dropout off; diffusion noise drawn from `seed`)."""
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    model(input_ids, labels=input_ids).loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.filterwarnings("ignore:.*gradient_checkpointing_enable.*:FutureWarning")
@pytest.mark.parametrize("variant", VARIANTS)
def test_gradient_checkpointing_gives_the_same_gradients(variant):
    models = []
    for _ in range(2):
        model = random_model(variant)
        model.config.attn_pdrop = model.config.embd_pdrop = model.config.resid_pdrop = 0.0
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        models.append(model)
    plain, checkpointed = models
    assert checkpointed.supports_gradient_checkpointing
    checkpointed.gradient_checkpointing_enable()
    input_ids = (duo_interleaved_ids(plain) if variant == "duo-predict"
                 else torch.randint(0, SMALL["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(6)))
    # Each block (attention included) runs twice under checkpointing: forward, then again in backward.
    calls = []
    for block in checkpointed.transformer.h:
        block.attn.register_forward_hook(lambda *args: calls.append(1))
    reference = train_gradients(plain, input_ids)
    gradients = train_gradients(checkpointed, input_ids)
    assert len(calls) == 2 * checkpointed.config.n_layer
    assert gradients.keys() == reference.keys()
    for name in reference:
        torch.testing.assert_close(gradients[name], reference[name], **FP32_TOL, msg=name)
    # Evaluation does not checkpoint (nothing to recompute without a backward pass).
    calls.clear()
    with torch.no_grad():
        checkpointed.eval()(input_ids)
    assert len(calls) == checkpointed.config.n_layer


@pytest.mark.filterwarnings("ignore:.*gradient_checkpointing_enable.*:FutureWarning")
@pytest.mark.parametrize("variant", ["dd-both", "parallel-concat", "duo-predict", "rotating-lr-norm"])
def test_bf16_autocast_training_step(variant):
    model = random_model(variant).train()
    if variant == "parallel-concat":
        model.gradient_checkpointing_enable()
    if variant == "duo-predict":
        input_ids = duo_interleaved_ids(model)
    else:
        input_ids = torch.randint(0, SMALL["vocab_size"], (2, 9))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(input_ids, use_cache=False).logits
    assert logits.dtype == torch.bfloat16  # the matmuls ran in bf16
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten())
    loss.backward()
    assert all(p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in model.parameters())
    optimizer.step()
