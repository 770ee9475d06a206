"""Trainer tests on tiny models and a small real-text corpus (the repository's docs/, byte-level tokens)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import flax_gpt2v as fg
from flax_gpt2v.data import pipeline as data
from flax_gpt2v.models import ops
from flax_gpt2v.training import run_checkpoints, sharding
from flax_gpt2v.config import TRAINING_KEYS, ConfigError
from flax_gpt2v.hf.keymap import flatten_params
from flax_gpt2v.hf.checkpoint import CheckpointError
from flax_gpt2v.training.schedule import decay_mask, lr_schedule
from flax_gpt2v.training import options, run_files, steps, trainer as tr
from helpers import KILLED_RUN, ROOT, TESTS, TINY, TRAIN_VARIANTS as VARIANTS, corpus, read_metrics, tiny_config

# ---------------------------------------------------------------- optimizer pieces

def test_schedule_values():
    lin = lr_schedule("linear", 1.0, 10, 110)
    assert [float(lin(s)) for s in (0, 5, 10, 60, 110, 200)] == pytest.approx([0, 0.5, 1, 0.5, 0, 0])
    cos = lr_schedule("cosine", 2.0, 0, 100)
    assert [float(cos(s)) for s in (0, 50, 100)] == pytest.approx([2, 1, 0], abs=1e-6)
    assert float(lr_schedule("constant", 1.0, 10, 100)(0)) == 1.0  # HF: no warmup for "constant"
    assert float(lr_schedule("constant_with_warmup", 1.0, 10, 100)(5)) == pytest.approx(0.5)


def test_decay_mask_excludes_biases_and_layernorms():
    lm = fg.init({"model_type": "dd-gpt2", **TINY, "vocab_size": 64})
    mask = flatten_params(decay_mask(lm.params))
    for path, decays in mask.items():
        name = path.split("/")[-1]
        assert decays == (name not in ("bias", "scale")), path
    assert mask["transformer/wte/embedding"] and mask["transformer/h/attn/c_attn/kernel"]
    assert mask["transformer/h/attn/drift_param"]  # HF decays it too (its name has no "bias")
    assert not mask["transformer/ln_f/scale"] and not mask["transformer/h/mlp/c_fc/bias"]


def test_duo_eval_step_groups_are_the_full_logits_loss():
    """duo-predict's eval sums: whole sequence, real positions (even) and mask positions (odd),
    each equal to the cross-entropy of the full logits over those positions."""
    cfg = fg.load_config({**TINY, "model_type": "duo-predict-gpt2", "vocab_size": 257, "mask_token_id": 256})
    module = fg.build_model(cfg)
    batch = {k: jnp.asarray(v) for k, v in data.make_batch(corpus().train, np.arange(4), cfg).items()}
    params = fg.init(cfg, seed=1).params
    sums = jax.jit(steps.make_eval_step(module, interleaved=True))(params, batch)
    logits, t = module.apply({"params": params}, batch["input_ids"], interleaved=True), batch["targets"]
    for group, sl in (("", slice(None)), ("next_", slice(0, None, 2)), ("fill_", slice(1, None, 2))):
        expected = ops.cross_entropy(logits[:, sl], t[:, sl])
        np.testing.assert_allclose(sums[group][0], expected[0], rtol=1e-5)
        assert [int(x) for x in sums[group][1:]] == [int(x) for x in expected[1:]], group


def test_gradient_accumulation_matches_one_big_batch():
    cfg = fg.load_config({**TINY, "vocab_size": 257})
    module = fg.build_model(cfg)
    batch = {k: jnp.asarray(v) for k, v in data.make_batch(corpus().train, np.arange(16), cfg).items()}
    # Padding rows contribute nothing, and the mean is over tokens of the whole batch.
    batch["targets"] = batch["targets"].at[3, 5:].set(ops.IGNORE)
    mesh = sharding.make_mesh({}, jax.devices()[:1])
    sched = lr_schedule("constant", 1e-3, 0, 10)
    results = []
    for accum in (1, 2, 4):
        # Plain SGD: the update is lr * gradient, so parameters compare the accumulated gradients.
        # (Adam's first step, g / (|g| + eps), turns rounding in near-zero gradients into O(lr) changes.)
        tx = optax.sgd(sched)
        state, shardings = steps.init_state(module, tx, mesh, 0)
        step = steps.jit_train_step(module, tx, sched, mesh, shardings, accum=accum, seed=0, interleaved=False)
        results.append(step(state, batch))
    (s1, m1), *others = results
    for s, m in others:
        assert float(m["loss"]) == pytest.approx(float(m1["loss"]), rel=1e-6)
        assert float(m["grad_norm"]) == pytest.approx(float(m1["grad_norm"]), rel=1e-5)
        for a, b in zip(jax.tree.leaves(s1["params"]), jax.tree.leaves(s["params"])):
            np.testing.assert_allclose(a, b, atol=1e-6)


# ---------------------------------------------------------------- configuration

def test_cli_parsing_and_overrides():
    path, over = options.parse_cli(["--config", "configs/x.json", "--max_steps", "40", "--output_dir", "runs/demo",
                               "--mesh.fsdp", "4", "--bf16=false", "--dataset.name", "wikitext-2-raw-v1"])
    assert path == "configs/x.json"
    assert over == {"max_steps": 40, "output_dir": "runs/demo", "mesh.fsdp": 4, "bf16": False,
                    "dataset.name": "wikitext-2-raw-v1"}
    raw = options.apply_overrides({"dataset": {"path": "wikitext", "name": "a"}, "mesh": {"data": -1}}, over)
    assert raw["dataset"] == {"path": "wikitext", "name": "wikitext-2-raw-v1"}
    assert raw["mesh"] == {"data": -1, "fsdp": 4}
    _, _, opts, _ = options.load_run_config({"model_type": "gpt2", **TINY}, over)
    assert (opts.max_steps, opts.output_dir, opts.mesh, opts.bf16) == (40, "runs/demo", {"fsdp": 4}, False)
    with pytest.raises(ConfigError, match="--config"):
        options.parse_cli(["--max_steps", "3"])


def test_defaults_are_the_original_recipe():
    _, cfg, opts, _ = options.load_run_config({"model_type": "gpt2"})
    assert (opts.learning_rate, opts.warmup_ratio, opts.weight_decay, opts.num_train_epochs) == (1e-4, 0.1, 0.01, 5.0)
    assert (opts.per_device_train_batch_size, opts.bf16, opts.gradient_checkpointing) == (64, True, True)
    assert (opts.eval_steps, opts.early_stopping_patience, opts.lr_scheduler_type) == (500, 2, "linear")
    assert opts.block_size == 1024
    assert options.load_run_config({"model_type": "duo-predict-gpt2"})[2].block_size == 512
    assert options.load_run_config({"model_type": "gpt2", "n_positions": 128})[2].block_size == 128
    assert TRAINING_KEYS == options.TRAINER_KEYS  # else split_config would reject them, or keep them from the model
    assert {"device_map", "fp16", "tf32", "torch_compile", "torch_empty_cache_steps"} <= options.IGNORED_KEYS


@pytest.mark.parametrize("cfg, key", [
    ({"model_type": "gpt2", "learning_rat": 1e-4}, "learning_rat"),
    ({"model_type": "gpt3"}, "model_type"),
    ({"model_type": "parallel-gpt2", "n_layer": 3}, "n_layer"),
    ({"model_type": "gpt2", "n_positions": 64, "block_size": 128}, "block_size"),
    ({"model_type": "gpt2", "learning_rate": "fast"}, "learning_rate"),
    ({"model_type": "gpt2", "lr_scheduler_type": "polynomial"}, "lr_scheduler_type"),
    ({"model_type": "gpt2", "gradient_accumulation_steps": 0}, "gradient_accumulation_steps"),
])
def test_config_errors_name_the_key(cfg, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        options.load_run_config(cfg)


def test_cli_reports_bad_key_in_one_line(tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"model_type": "gpt2", "num_train_epoch": 3}))
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train_jax.py"), "--config", str(cfg)],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["error: config key 'num_train_epoch': unknown key for model_type 'gpt2'"]


def test_refuses_to_overwrite_a_model_that_is_not_a_run(tmp_path):
    fg.init({**TINY, "vocab_size": 257}).save(tmp_path / "m")
    before = (tmp_path / "m" / "flax_params.safetensors").read_bytes()
    with pytest.raises(ConfigError, match="output_dir"):
        tr.train(tiny_config(out=tmp_path / "m"), prepared=corpus(), log=lambda m: None)
    assert (tmp_path / "m" / "flax_params.safetensors").read_bytes() == before


# ---------------------------------------------------------------- training runs

@pytest.mark.parametrize("model_type", list(VARIANTS))
def test_loss_falls_and_outputs_load(model_type, tmp_path):
    out = tmp_path / "run"
    lines = []
    extra = {"device_map": "auto", "fp16": False, "tf32": True} if model_type == "gpt2" else {}
    summary = tr.train(tiny_config(model_type, out, **extra), prepared=corpus(), log=lines.append)
    if extra:
        assert ("config keys with no effect here: device_map, fp16, tf32 (PyTorch/HF Trainer plumbing)"
                in lines)
    train_lines = [m for m in read_metrics(out) if "loss" in m]
    assert [m["step"] for m in train_lines] == [5, 10, 15, 20, 25, 30]
    assert train_lines[-1]["loss"] < train_lines[0]["loss"] - 0.5, train_lines
    evals = [m for m in read_metrics(out) if "eval_loss" in m]
    assert [m["step"] for m in evals] == [15, 30] and evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    if model_type == "duo-predict-gpt2":
        assert {"eval_next_loss", "eval_fill_accuracy", "eval_fill_perplexity"} <= set(evals[-1])
    assert summary["step"] == 30 and summary["eval_loss"] == evals[-1]["eval_loss"]
    assert lines[-1].startswith(f"trained {model_type} (2 layers, d 32, ") and "on docs/ as bytes" in lines[-1]
    with open(out / "summary.json") as f:
        assert json.load(f) == summary
    lm = fg.load(out)
    assert lm.config["model_type"] == model_type and lm.config["vocab_size"] == 257
    assert fg.load(out / "best").config == lm.config
    assert sorted(os.listdir(out / "checkpoints")) == ["15", "30"]


def test_what_was_trained_line():
    def prepared(source, tokenizer, n_train, n_val):
        return types.SimpleNamespace(source=source, tokenizer=types.SimpleNamespace(source=tokenizer),
                                     train=np.zeros((n_train, 128), np.int32), validation=np.zeros((n_val, 128), np.int32))

    embedded = prepared("embedded corpus: CPython documentation (pydoc_data.topics)", "gpt2", 1032, 62)
    cfg = {"model_type": "rotating-head-gpt2", "n_layer": 4, "n_embd": 128}
    assert run_files.what_was_trained(cfg, 7_241_000, 150, embedded, {"eval_perplexity": 412.345}) == (
        "trained rotating-head-gpt2 (4 layers, d 128, 7.2M params) for 150 steps on embedded corpus: CPython "
        "documentation (pydoc_data.topics) (132.1K training tokens); eval perplexity 412.3 on 7.9K held-out tokens - "
        "per GPT-2 token, the unit of GPT-2's published perplexities (on this text, not theirs)")
    duo = {"model_type": "duo-predict-gpt2", "n_layer": 2, "n_embd": 32}
    other = prepared("tfds my_texts", "my-tokenizer", 3, 1)
    assert run_files.what_was_trained(duo, 900, 30, other, {"eval_perplexity": 3.0, "eval_next_perplexity": 5.25,
                                                     "eval_fill_perplexity": 1.75}) == (
        "trained duo-predict-gpt2 (2 layers, d 32, 900 params) for 30 steps on tfds my_texts (384 training tokens); "
        "eval perplexity 3.0 on 128 held-out tokens (next-token 5.2, fill-in 1.8) - per token of the my-tokenizer "
        "tokenizer, not comparable with GPT-2's perplexities")
    assert run_files.what_was_trained(duo, 900, 30, other, None).endswith("(384 training tokens); not evaluated")


def test_bf16_remat_accumulation_and_hf_export(tmp_path):
    out = tmp_path / "run"
    summary = tr.train(tiny_config("gpt2", out, bf16=True, gradient_checkpointing=True, gradient_accumulation_steps=2,
                                   per_device_train_batch_size=4, max_steps=20, export_hf=True,
                                   report_to="tensorboard"),
                       prepared=corpus(), log=lambda m: None)
    losses = [m["loss"] for m in read_metrics(out) if "loss" in m]
    assert losses[-1] < losses[0] - 0.5
    assert summary["tokens_per_s"] > 0
    assert os.path.exists(out / "hf" / "model.safetensors")


def test_early_stopping(tmp_path):
    # A huge learning rate makes the eval loss worse from the second evaluation on.
    out = tmp_path / "run"
    lines = []
    tr.train(tiny_config("gpt2", out, learning_rate=0.5, warmup_steps=0, eval_steps=2, save_steps=2, max_steps=30),
             prepared=corpus(), log=lines.append)
    evals = [m for m in read_metrics(out) if "eval_loss" in m]
    assert len(evals) < 15 and any(line.startswith("early stopping") for line in lines)
    best = min(m["eval_loss"] for m in evals)
    # Resuming a stopped run trains no further.
    assert tr.train(tiny_config("gpt2", out, learning_rate=0.5, warmup_steps=0, eval_steps=2, save_steps=2,
                                max_steps=30), prepared=corpus(), log=lambda m: None)["step"] == evals[-1]["step"]
    assert best == pytest.approx(min(m["eval_loss"] for m in read_metrics(out) if "eval_loss" in m))


@pytest.mark.slow
@pytest.mark.parametrize("model_type", ["dd-gpt2"])
def test_sigkill_and_resume_is_exact(model_type, tmp_path):
    # dd-gpt2 uses both rng streams (dropout and diffusion noise).
    extra = dict(max_steps=14, save_steps=4, eval_steps=4, logging_steps=1, resid_pdrop=0.1, attn_pdrop=0.1,
                 gradient_accumulation_steps=2, per_device_train_batch_size=4)
    ref, out = tmp_path / "ref", tmp_path / "killed"
    tr.train(tiny_config(model_type, ref, **extra), prepared=corpus(), log=lambda m: None)
    script = KILLED_RUN.format(tests=TESTS, kill_at=10, model_type=model_type, out=str(out),
                               extra=extra)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == -9, r.stderr[-2000:]
    assert max(int(s) for s in os.listdir(out / "checkpoints") if s.isdigit()) == 8
    assert max(m["step"] for m in read_metrics(out)) == 10  # lines of steps 9, 10 get dropped on resume
    lines = []
    tr.train(tiny_config(model_type, out, **extra), prepared=corpus(), log=lines.append)
    assert "resumed from" in " ".join(lines)
    assert read_metrics(out) == read_metrics(ref)
    a, b = fg.load(ref), fg.load(out)
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        np.testing.assert_array_equal(x, y)
    for x, y in zip(jax.tree.leaves(fg.load(ref / "best").params), jax.tree.leaves(fg.load(out / "best").params)):
        np.testing.assert_array_equal(x, y)


def test_resume_from_a_format_2_run_names_the_format(tmp_path):
    """A run saved before the layers were stacked (tests/fixtures/orbax-format2: this tiny gpt2 config,
    2 steps) cannot resume; the one-line error says why."""
    out = tmp_path / "run"
    shutil.copytree(os.path.join(ROOT, "tests", "fixtures", "orbax-format2"), out)
    with pytest.raises(CheckpointError, match=r"no checkpoint is intact .*step 2: .*holds flax_gpt2v_format 2 state; "
                                              r"this version restores format 3"):
        tr.train(tiny_config("gpt2", out, max_steps=4, save_steps=2, warmup_steps=1), prepared=corpus(),
                 log=lambda m: None)


def test_resume_from_an_unreadable_checkpoint_is_one_line_error(tmp_path):
    out = tmp_path / "run"
    tr.train(tiny_config("gpt2", out, max_steps=2, save_steps=2, warmup_steps=1), prepared=corpus(), log=lambda m: None)
    # Junk that its checksum file vouches for (as a checkpoint of another version would be): the damage
    # shows when Orbax reads it.
    for f in (out / "checkpoints" / "2" / "state").rglob("*"):
        if f.is_file() and f.name != "_CHECKPOINT_METADATA":
            f.write_bytes(b"not a checkpoint")
    run_checkpoints.write_manifest(str(out / "checkpoints" / "2"))
    kept = (out / "metrics.jsonl").read_text()
    with pytest.raises(CheckpointError, match=r"cannot resume from .*checkpoints: no checkpoint is intact .*step 2: "
                                              r".*checkpoints/2 cannot be restored") as e:
        tr.train(tiny_config("gpt2", out, max_steps=4), prepared=corpus(), log=lambda m: None)
    assert "\n" not in str(e.value)
    assert (out / "metrics.jsonl").read_text() == kept


def test_resume_refuses_a_different_model(tmp_path):
    out = tmp_path / "run"
    tr.train(tiny_config("gpt2", out, max_steps=2, save_steps=2, warmup_steps=1), prepared=corpus(), log=lambda m: None)
    with pytest.raises(ConfigError, match="'n_embd'"):
        tr.train(tiny_config("gpt2", out, max_steps=4, n_embd=64), prepared=corpus(), log=lambda m: None)
