"""Flax <-> PyTorch: exported directories behave like the Flax model they came from."""
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import flax_gpt2v as fg
from flax_gpt2v.hf import checkpoint
from flax_gpt2v.models import ops
from flax_gpt2v.config import BASE_DEFAULTS, CHOICES
from flax_gpt2v.models import VARIANTS as REGISTRY
from flax_gpt2v.models import load_config
from flax_gpt2v.hf.keymap import flatten_params
from helpers import FP32_TOL, VARIANTS, off_default, perturbed_lm, random_ids, small_config

SEEDS = (0, 1)
# Fields that select the variant: each takes every value across VARIANTS instead.
SELECTORS = {"model_type", "apply_drift", "apply_diffusion", "baseline_each_head", "bottleneck_method",
             "rotatinghead", "use_norm", "gp_scales"}
# The one value supported (a second value is refused on import).
SINGLE_CHOICE = {"activation_function"}


def cross_lm(variant, seed=0, **overrides):
    return perturbed_lm(variant, seed=seed, **{**off_default(variant), **overrides})


@pytest.mark.parametrize("variant", VARIANTS)
def test_cross_framework_configs_are_off_default_in_every_field(variant):
    cfg = cross_lm(variant).config
    mt = cfg["model_type"]
    default = load_config({"model_type": mt})
    same = sorted(k for k in {**BASE_DEFAULTS, **REGISTRY[mt].defaults}
                  if k not in SELECTORS | SINGLE_CHOICE and cfg[k] == default[k])
    assert not same, f"{variant}: {same} at their defaults"


def test_cross_framework_configs_cover_every_selector_value():
    configs = [load_config(small_config(v)) for v in VARIANTS]
    assert {c["model_type"] for c in configs} == set(REGISTRY)
    for key in SELECTORS - {"model_type"}:
        values = {c[key] for c in configs if key in c}
        choices = {**CHOICES, **{k: a for v in REGISTRY.values() for k, a in v.choices.items()}}
        expected = {True, False} if isinstance(next(iter(values)), bool) else set(choices.get(key, values))
        assert values >= expected, key


def export(lm, tmp_path, name="hf", dtype="float32"):
    native, hf = tmp_path / f"{name}-native", tmp_path / name
    lm.save(native)
    checkpoint.export_hf(native, hf, dtype=dtype)
    return hf


def torch_model(directory):
    return AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True).eval()


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_exported_torch_logits_equal_flax_and_round_trip_is_exact(variant, seed, tmp_path):
    lm = cross_lm(variant, seed=seed, n_layer=4 if variant.startswith("parallel") else 1 + seed)
    hf = export(lm, tmp_path)
    ids = random_ids((2, 11), seed=seed)
    with torch.no_grad():
        logits = torch_model(hf)(torch.from_numpy(ids).long()).logits.numpy()
    np.testing.assert_allclose(logits, lm(ids), **FP32_TOL)
    if variant == "duo-predict":
        # Longer than n_positions: the twin switches to the interleaved layout, as the original did.
        x = random_ids((2, lm.config["n_positions"]), seed=seed)
        inter = np.array(ops.interleave(x, lm.config["mask_token_id"]))
        with torch.no_grad():
            t_inter = torch_model(hf)(torch.from_numpy(inter).long()).logits.numpy()
        np.testing.assert_allclose(t_inter, lm(inter, interleaved=True), **FP32_TOL)
    back = fg.load(hf)
    assert back.config == lm.config
    for a, b in zip(*(flatten_params(p).items() for p in (back.params, lm.params))):
        assert a[0] == b[0]
        np.testing.assert_array_equal(np.asarray(a[1]), np.asarray(b[1]))


@pytest.mark.parametrize("variant", VARIANTS)
def test_transformers_generate_equals_flax_generate(variant, tmp_path):
    lm = cross_lm(variant, seed=6)  # a seed whose every variant generates varied tokens with these configs
    model = torch_model(export(lm, tmp_path))
    prompt = random_ids((2, 5), seed=6)
    with torch.no_grad():
        out = model.generate(torch.from_numpy(prompt).long(), max_new_tokens=20, min_new_tokens=20,
                             do_sample=False, use_cache=True, pad_token_id=0)
    ours = np.asarray(lm.generate(prompt, max_new_tokens=20))
    assert len(set(ours[:, 5:].ravel().tolist())) > 3, "degenerate generation proves nothing"
    np.testing.assert_array_equal(out.numpy(), ours)


def test_bf16_export_loads_and_is_close(tmp_path):
    lm = cross_lm("rotating-gp-norm")
    model = torch_model(export(lm, tmp_path, dtype="bfloat16"))
    assert model.dtype == torch.bfloat16
    ids = random_ids((2, 9))
    with torch.no_grad():
        logits = model(torch.from_numpy(ids).long()).logits.float().numpy()
    ref = np.asarray(lm(ids))
    # Same bf16 rule as the model tests: within 5% of the logits' scale.
    assert np.abs(logits - ref).max() <= 0.05 * np.abs(ref).max()
