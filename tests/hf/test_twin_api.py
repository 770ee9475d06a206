"""Exports behave as transformers models: AutoModel gives the base model, and output_hidden_states,
output_attentions, inputs_embeds, token_type_ids and position_ids work as in transformers' GPT-2.

Variants that reduce to GPT-2 (dd with drift and diffusion off, duo-predict in the plain layout) are
compared with transformers' own GPT2Model / GPT2LMHeadModel holding the same weights; the others
(rotating head, parallel, dd with drift) are checked for consistency between the paths."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import (AutoModel, AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, GPT2Model, PreTrainedTokenizerFast, pipeline)
from transformers.modeling_outputs import BaseModelOutputWithPastAndCrossAttentions

from flax_gpt2v.hf.checkpoint import load_hf_dir, save_hf_dir
from flax_gpt2v.hf.twins import TWINS, auto_map, bundle_source
from flax_gpt2v.hf.twins.core import CACHE_FIELD
import helpers
from helpers import FP32_TOL, TWIN_OFF_DEFAULT, TWIN_SMALL as SMALL, TWIN_VARIANTS as VARIANTS, random_model

FIXTURES = Path(helpers.FIXTURES)

# GPT-2 with other class names: dd with drift and diffusion off, and duo-predict on inputs no longer than
# n_positions (the plain layout; every input below is).
REDUCIBLE = ["dd-off", "duo-predict"]
V = SMALL["vocab_size"]


def ids(shape, seed=0, low=1):
    return torch.randint(low, V, shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    """variant -> a directory written as the converter writes an export: weights, auto_map, bundled code;
    layer_norm_epsilon, n_inner and initializer_range off their defaults (compared with GPT-2 below)."""
    made = {}

    def make(variant):
        if variant not in made:
            model = random_model(variant, **TWIN_OFF_DEFAULT)
            model.config.auto_map = auto_map(model.config.model_type)
            directory = tmp_path_factory.mktemp(variant)
            model.save_pretrained(directory)
            (directory / TWINS[model.config.model_type][2]).write_text(bundle_source(model.config.model_type))
            made[variant] = directory
        return made[variant]

    return make


def load(directory, auto=AutoModelForCausalLM, **kwargs):
    model = auto.from_pretrained(directory, trust_remote_code=True, **kwargs).eval()
    # Loaded from the bundled file, not from this package.
    assert not type(model).__module__.startswith("flax_gpt2v")
    return model


def gpt2_twin(directory, auto=GPT2LMHeadModel, attn_implementation="sdpa"):
    """transformers' own GPT-2 with the export's weights (strict: the variant adds nothing)."""
    config = json.loads((directory / "config.json").read_text())
    reference = auto(GPT2Config(**{k: v for k, v in config.items() if k in GPT2Config().to_dict()}))
    reference.set_attn_implementation(attn_implementation)
    state = load(directory).state_dict()
    if auto is GPT2Model:
        state = {k.removeprefix("transformer."): v for k, v in state.items() if k.startswith("transformer.")}
    result = reference.load_state_dict(state, strict=False)
    assert not result.unexpected_keys and set(result.missing_keys) <= {"lm_head.weight"}
    return reference.eval()


def left_padded(batch=2, length=9, pad=3, seed=0):
    """ids, attention_mask and the position_ids generate() derives for them (first row left-padded)."""
    input_ids = ids((batch, length), seed)
    mask = torch.ones_like(input_ids)
    mask[0, :pad] = 0
    input_ids[0, :pad] = 0
    return input_ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


# ---- AutoModel gives the base model ----

@pytest.mark.parametrize("case", ["dd-both", "duo-predict", "parallel-concat", "rotating-head-lr-norm"])
def test_converter_export_automodel_is_the_base_model(case, tmp_path):
    cfg, params = load_hf_dir(FIXTURES / case)
    save_hf_dir(tmp_path, cfg, params)
    config_class, model_class, _ = TWINS[cfg["model_type"]]
    base, info = AutoModel.from_pretrained(tmp_path, trust_remote_code=True, output_loading_info=True)
    assert type(base).__name__ == model_class.base_model_class.__name__ == model_class.__name__.replace("LMHead", "")
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    lm = load(tmp_path)
    assert type(lm.transformer).__name__ == type(base).__name__
    input_ids = torch.from_numpy(np.load(FIXTURES / case / "input_ids.npy"))
    with torch.no_grad():
        out = base.eval()(input_ids)
        assert isinstance(out, BaseModelOutputWithPastAndCrossAttentions)
        torch.testing.assert_close(lm.lm_head(out.last_hidden_state), lm(input_ids).logits, **FP32_TOL)


@pytest.mark.parametrize("variant", REDUCIBLE)
@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_base_model_equals_gpt2_model(variant, implementation, export_dir):
    directory = export_dir(variant)
    base = load(directory, AutoModel, attn_implementation=implementation)
    # transformers' GPT-2 returns attentions only from its eager path; the twin's SDPA falls back to eager.
    reference = gpt2_twin(directory, GPT2Model, attn_implementation="eager")
    input_ids = ids((2, 9))
    args = dict(output_hidden_states=True, output_attentions=True, use_cache=True)
    with torch.no_grad():
        out, expected = base(input_ids, **args), reference(input_ids, **args)
    torch.testing.assert_close(out.last_hidden_state, expected.last_hidden_state, **FP32_TOL)
    assert len(out.hidden_states) == len(expected.hidden_states) == SMALL["n_layer"] + 1
    for got, want in zip(out.hidden_states, expected.hidden_states):
        torch.testing.assert_close(got, want, **FP32_TOL)
    assert len(out.attentions) == len(expected.attentions) == SMALL["n_layer"]
    for got, want in zip(out.attentions, expected.attentions):
        torch.testing.assert_close(got, want, **FP32_TOL)
    assert out.past_key_values.get_seq_length() == 9
    # The cache continues as transformers' does.
    step = ids((2, 1), seed=1)
    with torch.no_grad():
        torch.testing.assert_close(base(step, past_key_values=out.past_key_values).last_hidden_state,
                                   reference(step, **{CACHE_FIELD: expected.past_key_values}).last_hidden_state,
                                   **FP32_TOL)


# ---- every argument of GPT2LMHeadModel.forward, against transformers' GPT-2 ----

def forward_arguments(model):
    input_ids, mask, positions = left_padded()
    embeds = model.get_input_embeddings()(input_ids) * 1.5  # not the ids' own embeddings
    return {
        "plain": dict(input_ids=input_ids),
        "output_hidden_states": dict(input_ids=input_ids, output_hidden_states=True),
        "output_attentions": dict(input_ids=input_ids, output_attentions=True),
        "inputs_embeds": dict(inputs_embeds=embeds),
        "token_type_ids": dict(input_ids=input_ids, token_type_ids=ids((2, 9), seed=5, low=0)),
        "position_ids": dict(input_ids=input_ids, position_ids=torch.arange(9)[None] + 7),
        "left_padding": dict(input_ids=input_ids, attention_mask=mask, position_ids=positions),
        "labels": dict(input_ids=input_ids, labels=input_ids),
        "logits_to_keep": dict(input_ids=input_ids, logits_to_keep=1),
    }


@pytest.mark.parametrize("variant", REDUCIBLE)
def test_lm_arguments_equal_gpt2(variant, export_dir):
    directory = export_dir(variant)
    model = load(directory, attn_implementation="eager")
    reference = gpt2_twin(directory, attn_implementation="eager")
    for name, kwargs in forward_arguments(model).items():
        with torch.no_grad():
            out, expected = model(**kwargs), reference(**kwargs)
        valid = slice(3, None) if name == "left_padding" else slice(None)  # row 0's padding slots are arbitrary
        torch.testing.assert_close(out.logits[:, valid], expected.logits[:, valid], **FP32_TOL, msg=name)
        for field in ("loss", "hidden_states", "attentions"):
            if getattr(expected, field) is None:
                assert getattr(out, field) is None, (name, field)
            else:
                torch.testing.assert_close(getattr(out, field), getattr(expected, field), **FP32_TOL, msg=name)
    plain = forward_arguments(model)["plain"]
    with torch.no_grad():
        torch.testing.assert_close(model(**plain, return_dict=False)[0], reference(**plain).logits, **FP32_TOL)


GENERATE_MODES = {
    "greedy-cache": dict(do_sample=False),
    "greedy-no-cache": dict(do_sample=False, use_cache=False),
    "beam-search": dict(do_sample=False, num_beams=3),
    "sampling": dict(do_sample=True, top_k=0, temperature=0.8),
    "left-padding": dict(do_sample=False),
    "inputs_embeds": dict(do_sample=False),
    "token_type_ids": dict(do_sample=False),
}


def generate(model, mode, seed=0):
    input_ids, mask, _ = left_padded(seed=seed)
    args = dict(max_new_tokens=12, min_new_tokens=12, pad_token_id=0, **GENERATE_MODES[mode])
    if mode == "left-padding":
        args["attention_mask"] = mask
    else:
        input_ids = input_ids[:, 3:]
    if mode == "token_type_ids":
        args["token_type_ids"] = ids(input_ids.shape, seed=5, low=0)
    torch.manual_seed(seed)
    if mode == "inputs_embeds":
        return model.generate(inputs_embeds=model.get_input_embeddings()(input_ids), **args)
    return model.generate(input_ids, **args)


@pytest.mark.parametrize("mode", GENERATE_MODES)
@pytest.mark.parametrize("variant", REDUCIBLE)
def test_generate_equals_gpt2(variant, mode, export_dir):
    directory = export_dir(variant)
    model, reference = load(directory), gpt2_twin(directory)
    tokens = generate(model, mode)
    assert torch.equal(tokens, generate(reference, mode))
    assert len(set(tokens[:, -12:].flatten().tolist())) > 3, "degenerate generation proves nothing"


@pytest.mark.parametrize("variant", REDUCIBLE)
def test_generate_scores_and_hidden_states_equal_gpt2(variant, export_dir):
    directory = export_dir(variant)
    model, reference = load(directory, attn_implementation="eager"), gpt2_twin(directory, attn_implementation="eager")
    args = dict(max_new_tokens=4, do_sample=False, return_dict_in_generate=True, output_scores=True,
                output_hidden_states=True, output_attentions=True, pad_token_id=0)
    out, expected = model.generate(ids((2, 6)), **args), reference.generate(ids((2, 6)), **args)
    assert torch.equal(out.sequences, expected.sequences)
    torch.testing.assert_close(out.scores, expected.scores, **FP32_TOL)
    torch.testing.assert_close(out.hidden_states, expected.hidden_states, **FP32_TOL)
    torch.testing.assert_close(out.attentions, expected.attentions, **FP32_TOL)


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(V)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="w1"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="w1", pad_token="w0", eos_token="w2")


@pytest.mark.parametrize("variant", REDUCIBLE)
def test_text_generation_pipeline_equals_gpt2(variant, export_dir):
    directory = export_dir(variant)
    tokenizer = tiny_tokenizer()
    prompt = " ".join(f"w{i}" for i in ids((7,), seed=3).tolist())
    texts = [pipeline("text-generation", model=m, tokenizer=tokenizer)(
        prompt, max_new_tokens=10, min_new_tokens=10, do_sample=False)[0]["generated_text"]
        for m in (load(directory), gpt2_twin(directory))]
    assert texts[0] == texts[1] and texts[0].startswith(prompt) and len(texts[0][len(prompt):].split()) == 10


# ---- the variants that are not GPT-2: each path against another ----

@pytest.mark.parametrize("variant", VARIANTS)
def test_hidden_states_and_attentions_are_consistent(variant, export_dir):
    directory = export_dir(variant)
    model, eager = load(directory), load(directory, attn_implementation="eager")
    assert model.config._attn_implementation == "sdpa"
    input_ids = ids((2, 9))
    with torch.no_grad():
        plain = model(input_ids)
        out = model(input_ids, output_hidden_states=True, output_attentions=True)
        out_eager = eager(input_ids, output_attentions=True)
    torch.testing.assert_close(out.logits, plain.logits, **FP32_TOL)
    states = out.hidden_states
    assert len(states) == model.config.n_layer + 1 and all(s.shape == (2, 9, SMALL["n_embd"]) for s in states)
    torch.testing.assert_close(model.lm_head(states[-1]), plain.logits, **FP32_TOL)
    embeddings = model.transformer.wte(input_ids) + model.transformer.wpe(torch.arange(9))
    torch.testing.assert_close(states[0], embeddings, **FP32_TOL)
    # hidden_states[i] is block i's input.
    inputs = []
    hooks = [block.register_forward_pre_hook(lambda module, args: inputs.append(args[0]))
             for block in model.transformer.h]
    with torch.no_grad():
        model(input_ids)
    for hook in hooks:
        hook.remove()
    for got, want in zip(states[:-1], inputs, strict=True):
        torch.testing.assert_close(got, want, **FP32_TOL)
    assert len(out.attentions) == model.config.n_layer
    for probs, probs_eager in zip(out.attentions, out_eager.attentions):
        assert probs.shape == (2, SMALL["n_head"], 9, 9)
        torch.testing.assert_close(probs.sum(-1), torch.ones(2, SMALL["n_head"], 9), **FP32_TOL)
        assert not probs.triu(1).any()  # causal
        torch.testing.assert_close(probs, probs_eager, **FP32_TOL)


@pytest.mark.parametrize("variant", VARIANTS)
def test_inputs_embeds_token_types_and_positions_are_consistent(variant, export_dir):
    model = load(export_dir(variant))
    base = load(export_dir(variant), AutoModel)
    input_ids, mask, positions = left_padded()
    types = ids((2, 9), seed=5, low=0)
    wte = model.get_input_embeddings()
    with torch.no_grad():
        logits = model(input_ids).logits
        torch.testing.assert_close(model(inputs_embeds=wte(input_ids)).logits, logits, **FP32_TOL)
        # GPT-2's token types: embedded through wte and added to the token embeddings.
        torch.testing.assert_close(model(input_ids, token_type_ids=types).logits,
                                   model(inputs_embeds=wte(input_ids) + wte(types)).logits, **FP32_TOL)
        assert not torch.allclose(model(input_ids, token_type_ids=types).logits, logits)
        # Explicit default positions change nothing; the positions generate() gives a left-padded row make it
        # compute what the unpadded row does.
        torch.testing.assert_close(model(input_ids, position_ids=torch.arange(9)[None]).logits, logits, **FP32_TOL)
        padded = model(input_ids, attention_mask=mask, position_ids=positions).logits
        torch.testing.assert_close(padded[0, 3:], model(input_ids[:1, 3:]).logits[0], **FP32_TOL)
        torch.testing.assert_close(padded[1], logits[1], **FP32_TOL)
        # The base model behind AutoModel is the LM's own transformer.
        torch.testing.assert_close(model.lm_head(base(input_ids, token_type_ids=types).last_hidden_state),
                                   model(input_ids, token_type_ids=types).logits, **FP32_TOL)


@pytest.mark.parametrize("variant", VARIANTS)
def test_generate_from_inputs_embeds_equals_from_ids(variant, export_dir):
    model = load(export_dir(variant))
    prompt = ids((2, 7), seed=2)
    args = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=0)
    from_ids = model.generate(prompt, **args)
    # As in transformers, generating from embeddings returns the new tokens only.
    assert torch.equal(model.generate(inputs_embeds=model.get_input_embeddings()(prompt), **args), from_ids[:, 7:])


@pytest.mark.parametrize("variant", VARIANTS)
def test_cache_equals_no_cache_with_every_output(variant, export_dir):
    model = load(export_dir(variant))
    input_ids = ids((2, 9))
    args = dict(output_hidden_states=True, output_attentions=True)
    with torch.no_grad():
        full = model(input_ids, use_cache=False, **args)
        prefix = model(input_ids[:, :6], use_cache=True)
        rest = model(input_ids[:, 6:], past_key_values=prefix.past_key_values, **args)
    torch.testing.assert_close(rest.logits, full.logits[:, 6:], **FP32_TOL)
    for got, want in zip(rest.hidden_states, full.hidden_states, strict=True):
        torch.testing.assert_close(got, want[:, 6:], **FP32_TOL)
    for got, want in zip(rest.attentions, full.attentions, strict=True):
        torch.testing.assert_close(got, want[:, :, 6:], **FP32_TOL)


# ---- what the twins cannot honour is refused, by name ----

@pytest.mark.parametrize("variant", ["dd-both", "rotating-gp"])
@pytest.mark.parametrize("argument", ["head_mask", "encoder_hidden_states", "encoder_attention_mask", "not_an_arg"])
def test_unsupported_argument_raises_naming_it(variant, argument, export_dir):
    directory = export_dir(variant)
    input_ids = ids((2, 5))
    for model in (load(directory), load(directory, AutoModel)):
        with pytest.raises(ValueError, match=argument):
            model(input_ids, **{argument: torch.ones(2, 5)})
        # An argument given as None asks for nothing.
        model(input_ids, **{argument: None})


def test_cache_given_twice_raises(export_dir):
    model = load(export_dir("dd-both"))
    cache = model(ids((1, 4)), use_cache=True).past_key_values
    with pytest.raises(ValueError, match="past_key_values"):
        model(ids((1, 1)), cache=cache, past_key_values=cache)
    with pytest.raises(ValueError, match="inputs_embeds"):
        model(ids((1, 4)), inputs_embeds=torch.zeros(1, 4, SMALL["n_embd"]))


# ---- what worked before keeps working ----

@pytest.mark.parametrize("variant", ["dd-both", "parallel-concat", "rotating-lr-norm"])
def test_resize_token_embeddings_save_and_reload(variant, export_dir, tmp_path):
    directory = export_dir(variant)
    model = load(directory)
    input_ids = ids((2, 9))
    with torch.no_grad():
        before = model(input_ids).logits
    model.resize_token_embeddings(V + 3)
    assert model.lm_head.weight is model.transformer.wte.weight and model.lm_head.weight.shape[0] == V + 3
    assert model.config.vocab_size == V + 3
    with torch.no_grad():
        after = model(input_ids).logits
        torch.testing.assert_close(after[..., :V], before, **FP32_TOL)
        assert model(torch.tensor([[V + 2]])).logits.shape == (1, 1, V + 3)
    model.save_pretrained(tmp_path)
    for auto in (AutoModelForCausalLM, AutoModel):
        reloaded = load(tmp_path, auto)
        with torch.no_grad():
            out = reloaded(input_ids)
        got = out.logits if auto is AutoModelForCausalLM else model.lm_head(out.last_hidden_state)
        torch.testing.assert_close(got, after, **FP32_TOL)


@pytest.mark.parametrize("variant", ["dd-off", "rotating-lr-norm"])
def test_bf16_base_model_close_to_fp32(variant, export_dir):
    directory = export_dir(variant)
    reference, base = load(directory, AutoModel), load(directory, AutoModel, dtype=torch.bfloat16)
    input_ids = ids((2, 9))
    with torch.no_grad():
        want = reference(input_ids, output_hidden_states=True).hidden_states
        got = base(input_ids, output_hidden_states=True).hidden_states
    for a, b in zip(got, want, strict=True):
        assert a.dtype == torch.bfloat16
        assert (a.float() - b).abs().max() <= 0.05 * b.abs().max()


@pytest.mark.parametrize("variant", ["duo-predict", "rotating-gp"])
def test_torch_compile_equals_eager(variant, export_dir):
    model = load(export_dir(variant))
    # The "eager" backend traces the model with dynamo (what breaks compile) without a C++ toolchain.
    compiled = torch.compile(model, backend="eager", fullgraph=False)
    input_ids = ids((2, 9))
    with torch.no_grad():
        want = model(input_ids, output_hidden_states=True)
        got = compiled(input_ids, output_hidden_states=True)
    torch.testing.assert_close(got.logits, want.logits, **FP32_TOL)
    torch.testing.assert_close(got.hidden_states, want.hidden_states, **FP32_TOL)


@pytest.mark.parametrize("model_type, extra", [("dd-gpt2", {}), ("rotating-head-gpt2", dict(use_norm=True))])
def test_fresh_base_and_lm_models_initialise_as_the_original(model_type, extra):
    """docs/gpt2.md, 2, 5 init, whichever class is built: c_proj N(0, 0.02 / sqrt(2 n_layer)), drift and diffusion
    N(0, 1), baseline N(0, 1e-3), learned frequencies N(0, 1), the frequencies' LayerNorm 1 and 0."""
    config_class, model_class, _ = TWINS[model_type]
    config = config_class(vocab_size=V, n_positions=16, n_embd=512, n_head=8, n_layer=2)
    for key, value in extra.items():
        setattr(config, key, value)
    expected = {"attn.c_attn.weight": 0.02, "attn.c_proj.weight": 0.01, "mlp.c_proj.weight": 0.01,
                "attn.drift_param": 1.0, "attn.baseline": 1e-3, "attn.diffusion_param": 1.0,
                "attn.rope.frequencies": 1.0}
    for cls in (model_class, model_class.base_model_class):
        torch.manual_seed(0)
        state = {k.removeprefix("transformer."): v for k, v in cls(config).state_dict().items()}
        stds = {name: state[f"h.1.{name}"].std().item() for name in expected if f"h.1.{name}" in state}
        assert len(stds) == (6 if model_type == "dd-gpt2" else 4), (cls.__name__, stds)
        for name, std in stds.items():
            assert 0.8 * expected[name] < std < 1.2 * expected[name], (cls.__name__, name, std)
        if model_type == "rotating-head-gpt2":
            assert torch.equal(state["h.1.attn.rope.layer_norm.weight"], torch.ones(32))
            assert torch.equal(state["h.1.attn.rope.layer_norm.bias"], torch.zeros(32))


@pytest.mark.parametrize("variant", REDUCIBLE)
def test_fresh_init_follows_initializer_range_as_gpt2(variant):
    """A fresh twin initialises as transformers' GPT-2 with the same config, initializer_range off its default:
    every weight's standard deviation within 20% of GPT-2's (a twin that ignored it would be 2.5x off)."""
    model_type, extra = VARIANTS[variant]
    config_class, model_class, _ = TWINS[model_type]
    fields = {**SMALL, **extra, **TWIN_OFF_DEFAULT, "n_embd": 512, "n_head": 8, "n_inner": 1024}
    torch.manual_seed(0)
    twin = model_class(config_class(**fields)).state_dict()
    torch.manual_seed(0)
    reference = GPT2LMHeadModel(GPT2Config(**{k: v for k, v in fields.items() if k in GPT2Config().to_dict()}))
    reference = reference.state_dict()
    weights = [k for k, v in reference.items() if k.endswith("weight") and v.dim() == 2]
    assert "transformer.h.1.attn.c_proj.weight" in weights and "transformer.h.1.mlp.c_fc.weight" in weights
    for key in weights:
        assert 0.8 * reference[key].std().item() < twin[key].std().item() < 1.2 * reference[key].std().item(), key

