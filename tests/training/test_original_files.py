"""The original's experiment files (docs/experiments.md) run unchanged, and its data preparation (docs/training.md)
matches what `datasets` + run_clm's `group_texts` give. Local data only."""
import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from huggingface_hub import constants

import train_jax
from flax_gpt2v.data import pipeline as data, tokenizer
from flax_gpt2v.training import original_experiments as oe
from flax_gpt2v.training import options
from flax_gpt2v.config import TRAINING_KEYS, ConfigError
from flax_gpt2v.data.pipeline import map_batch_starts, prepare_data
from helpers import ROOT

ORIGINAL = os.path.join(ROOT, "tests", "fixtures", "original-configs")
FILES = sorted(os.listdir(ORIGINAL))
WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches".split()
# Lines of varied length (some empty, like WikiText's), so that batch remainders differ.
LINES = [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(i % 11)) + "\n" for i in range(240)]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    # The Hub is never contacted in tests, whatever the machine's network.
    monkeypatch.setattr(tokenizer, "hub_reachable", lambda: False)
    monkeypatch.setattr(data, "hub_reachable", lambda: False)


def write_lines(path, lines):
    with open(path, "w") as f:
        f.writelines(lines)
    return str(path)


def group_texts(examples, block_size):
    """HF run_clm's group_texts, as the original used it under datasets.map."""
    concatenated = {k: sum(examples[k], []) for k in examples}
    total_length = (len(concatenated["input_ids"]) // block_size) * block_size
    return {k: [t[i:i + block_size] for i in range(0, total_length, block_size)]
            for k, t in concatenated.items()}


def original_blocks(text_file, split, tok, block, batch_size, num_proc):
    """The original's pipeline in datasets itself: load the split, tokenize, group with map."""
    import datasets

    ds = datasets.load_dataset("text", data_files={"train": text_file}, split=split, keep_linebreaks=True)
    ids = ds.map(lambda b: {"input_ids": tok.encode_batch(b["text"])}, batched=True, remove_columns=["text"])
    grouped = ids.map(group_texts, batched=True, batch_size=batch_size, num_proc=num_proc,
                      fn_kwargs={"block_size": block})
    return np.array(grouped["input_ids"], dtype=np.int32).reshape(-1, block)


# ---------------------------------------------------------------- data preparation (docs/training.md)

@pytest.mark.parametrize("n, batch_size, num_proc", [(103, 10, None), (103, 10, 3), (7, 4, 20), (50, None, 2)])
def test_map_batch_starts_are_those_datasets_map_uses(n, batch_size, num_proc):
    import datasets

    ds = datasets.Dataset.from_dict({"i": list(range(n))})
    seen = ds.map(lambda b: {"first": [b["i"][0]] * len(b["i"])}, batched=True, batch_size=batch_size,
                  num_proc=num_proc)
    assert map_batch_starts(n, batch_size, num_proc) == sorted(set(seen["first"]))


@pytest.mark.parametrize("streaming", [False, True])
def test_split_and_grouping_match_the_original(tmp_path, streaming):
    text = write_lines(tmp_path / "train.txt", LINES)
    # As in the original's files: train_files replace the dataset, whose num_proc shards the grouping map.
    cfg = {"train_files": [text], "dataset": {"path": "wikitext", "name": "x", "num_proc": 3},
           "validation_split_percentage": "10", "batch_size": 30, "block_size": 8,
           "streaming": streaming}
    got = prepare_data(cfg, str(tmp_path / "c"), log=lambda s: None)
    tok = got.tokenizer
    expected_train = original_blocks(text, "train[10%:]", tok, 8, 30, 3)
    expected_val = original_blocks(text, "train[:10%]", tok, 8, 30, 3)
    np.testing.assert_array_equal(got.train, expected_train)
    np.testing.assert_array_equal(got.validation, expected_val)
    # Per-batch remainders really were dropped: fewer blocks than grouping all of train at once.
    whole = original_blocks(text, "train[10%:]", tok, 8, None, None)
    assert len(got.train) < len(whole)


def test_streaming_gives_the_same_tokens(tmp_path):
    text = write_lines(tmp_path / "train.txt", LINES)
    cfg = {"train_files": [text], "validation_split_percentage": "5", "batch_size": 25, "block_size": 8}
    plain = prepare_data(cfg, str(tmp_path / "a"), log=lambda s: None)
    streamed = prepare_data({**cfg, "streaming": True}, str(tmp_path / "b"), log=lambda s: None)
    assert len(plain.train) > 10
    np.testing.assert_array_equal(plain.train, streamed.train)
    np.testing.assert_array_equal(plain.validation, streamed.validation)


def test_max_train_samples_is_train_and_validation(tmp_path):
    text = write_lines(tmp_path / "train.txt", LINES)
    cfg = {"train_file": text, "validation_split_percentage": "1", "max_train_samples": 120, "block_size": 8, "batch_size": 40}
    got = prepare_data(cfg, str(tmp_path / "c"), log=lambda s: None)
    expected = original_blocks(text, "train[:120]", got.tokenizer, 8, 40, None)
    np.testing.assert_array_equal(got.train, expected)
    np.testing.assert_array_equal(got.validation, expected)


def test_validation_file_and_dataset_split_win_only_without_percentage(tmp_path):
    import datasets

    train = write_lines(tmp_path / "train.txt", LINES[:200])
    val = write_lines(tmp_path / "val.txt", LINES[200:])
    cfg = {"train_file": train, "validation_file": val, "validation_split_percentage": "10", "block_size": 8}
    got = prepare_data(cfg, str(tmp_path / "c"), log=lambda s: None)
    assert got.validation.size == sum(len(got.tokenizer.encode(t)) for t in LINES[200:]) // 8 * 8
    # A dataset with its own validation split: the percentage takes train[:P%] instead (docs/training.md).
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": LINES[:200]}),
                               "validation": datasets.Dataset.from_dict({"text": LINES[200:]})})
    dd.save_to_disk(str(tmp_path / "saved"))
    base = {"dataset": {"path": str(tmp_path / "saved")}, "block_size": 8}
    own = prepare_data(base, str(tmp_path / "c"), log=lambda s: None)
    np.testing.assert_array_equal(own.validation, got.validation)
    pct = prepare_data({**base, "validation_split_percentage": "10"}, str(tmp_path / "c"), log=lambda s: None)
    n_val = 20  # 10% of 200 rows
    first = sum(len(own.tokenizer.encode(t)) for t in LINES[:n_val])
    assert pct.validation.size == first // 8 * 8


@pytest.mark.parametrize("bad", [{"batch_size": 0}, {"validation_split_percentage": "one"},
                                 {"validation_split_percentage": 100}, {"train_files": "a.txt"},
                                 {"max_train_samples": -1}])
def test_bad_data_keys_name_the_key(tmp_path, bad):
    key = next(iter(bad))
    with pytest.raises(data.DataError, match=f"'{key}'"):
        data.DataSpec.from_config({"train_file": write_lines(tmp_path / "a.txt", LINES), **bad})


# ---------------------------------------------------------------- keys (docs/experiments.md)

EVERY_KEY_FILE = {
    "run_name": "r", "model_name": "m",
    "dataset": {"path": "wikitext", "name": "wikitext-103-raw-v1", "num_proc": 20},
    "train_files": [], "max_train_samples": None, "max_eval_samples": None, "validation_split_percentage": "1",
    "batch_size": 40000, "block_size": 1024, "max_seq_length": 512, "overwrite_cache": False, "streaming": False,
    "keep_in_memory": True, "cache_dir": "./c", "use_fast_tokenizer": True, "tokenizer_file": "gpt2-medium",
    "model_revision": "zero", "push_to_hub": True, "hub_model_id": "BluebrainAI/x", "report_to": "wandb",
    "logging_steps": 100, "eval_steps": 500, "save_steps": 500, "eval_strategy": "steps",
    "save_strategy": "steps", "save_total_limit": 5, "load_best_model_at_end": True,
    "metric_for_best_model": "eval_loss", "greater_is_better": False, "include_for_metrics": ["loss"],
    "seed": 42, "data_seed": 43, "per_device_train_batch_size": 64, "per_device_eval_batch_size": 64,
    "learning_rate": 1e-4, "num_train_epochs": 5, "warmup_ratio": 0.1, "warmup_steps": 0, "weight_decay": 0.01,
    "lr_scheduler_type": "linear", "gradient_accumulation_steps": 1, "gradient_checkpointing": True,
    "bf16": True, "device_map": "auto", "use_cpu": False, "should_log": True, "torch_empty_cache_steps": 100,
    "overwrite_output_dir": True, "do_train": True, "do_eval": True, "max_steps": 10,
    "model_type": "duo-predict-gpt2",
}


def test_a_file_with_every_spec9_key_loads():
    notes = []
    _, cfg, opts, train = options.load_run_config(EVERY_KEY_FILE, notes=notes)
    assert opts.block_size == 512  # min(block_size, max_seq_length)
    assert opts.per_device_train_batch_size == 64  # batch_size 40000 is the grouping batch, not this
    assert train["batch_size"] == 40000
    line = oe.no_effect_line(k for k in train if k in options.IGNORED_KEYS)
    for key in ("device_map", "use_cpu", "should_log", "torch_empty_cache_steps", "do_train", "do_eval",
                "include_for_metrics", "use_fast_tokenizer", "tokenizer_file", "model_revision", "keep_in_memory",
                "load_best_model_at_end", "overwrite_output_dir"):
        assert line.count(key) == 1, key
    # Every training key is judged: honoured (trainer option or data key), checked, or named as no effect.
    assert TRAINING_KEYS == options.TRAINER_KEYS, TRAINING_KEYS ^ options.TRAINER_KEYS
    assert set(oe.ONLY_VALUES) <= {f.name for f in dataclasses.fields(options.AcceptedOptions)}
    with pytest.raises(ConfigError, match="'eval_strategy'"):
        options.load_run_config({**EVERY_KEY_FILE, "eval_strategy": "epoch"})
    with pytest.raises(ConfigError, match="'max_seq_length'"):
        options.load_run_config({**EVERY_KEY_FILE, "model_type": "gpt2", "max_seq_length": 2048, "block_size": 4096,
                            "n_positions": 1024})


def test_override_null_removes_a_key():
    raw = {"dataset": {"path": "wikitext", "name": "w"}, "train_files": [], "block_size": 8}
    out = options.apply_overrides(raw, {"dataset": None, "train_file": "a.txt", "mesh.fsdp": None, "block_size": None})
    assert out == {"train_files": [], "train_file": "a.txt"}
    assert options.apply_overrides(raw, {"dataset.name": None})["dataset"] == {"path": "wikitext"}
    _, over = options.parse_cli(["--config", "x.json", "--dataset", "null"])
    assert over == {"dataset": None}


def test_original_experiments_supply_their_code_version_and_explicit_keys_win():
    lr_norm = {"model_type": "rotating-head-gpt2", "rotatinghead": "lr",
               "hub_model_id": "BluebrainAI/rotating-head-lr-norm-gpt2-medium-wikitext"}
    notes = []
    _, cfg, _, _ = options.load_run_config(lr_norm, notes=notes)
    assert cfg["use_norm"] is True and len(notes) == 1 and "use_norm=true" in notes[0]
    notes = []
    _, cfg, _, _ = options.load_run_config(lr_norm, {"use_norm": False}, notes=notes)
    assert cfg["use_norm"] is False and notes == []
    _, cfg, _, _ = options.load_run_config({**lr_norm, "hub_model_id": None,
                                       "run_name": "rotating-head-gp-gpt2-medium-wikitext"})
    assert cfg["use_norm"] is False
    duo = {"model_type": "duo-predict-gpt2", "run_name": "duo-predict-gpt2-medium-wikitext", "block_size": 256}
    _, cfg, opts, _ = options.load_run_config(duo)
    assert (cfg["duo_loss"], cfg["n_positions"], opts.block_size) == ("original", 256, 256)
    small = {"model_type": "gpt2", "run_name": "gpt2-medium-wikitext", "block_size": 8192, "max_seq_length": 8192}
    notes = []
    _, cfg, opts, _ = options.load_run_config(small, notes=notes)
    assert (cfg["n_positions"], opts.block_size) == (8192, 8192) and "could not run" in notes[0]
    assert options.load_run_config({**small, "block_size": 1024}, notes=(notes := []))[1]["n_positions"] == 1024
    assert notes == []
    # Not one of the original's runs: nothing supplied, but duo-predict's positions follow its blocks in
    # every run, as the original's duo code set them; a given n_positions wins.
    _, cfg, _, _ = options.load_run_config({**duo, "run_name": "mine"})
    assert (cfg["duo_loss"], cfg["n_positions"]) == ("dual", 256)
    assert options.load_run_config({"model_type": "duo-predict-gpt2", "max_seq_length": 1024})[1]["n_positions"] == 1024
    assert options.load_run_config({**duo, "run_name": "mine", "n_positions": 512})[1]["n_positions"] == 512
    assert options.load_run_config({"model_type": "duo-predict-gpt2"})[1]["n_positions"] == 512


# ---------------------------------------------------------------- the files themselves

def size_overrides(tmp_path, text):
    """Only data and size change: local text, a tiny model, two steps."""
    return ["--dataset", "null", "--train_file", text, "--validation_file", text,
            "--n_layer", "2", "--n_embd", "64", "--n_head", "4", "--block_size", "32", "--max_seq_length", "32",
            "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "2", "--max_steps", "2",
            "--output_dir", str(tmp_path / "run"), "--cache_dir", str(tmp_path / "cache")]


@pytest.mark.slow
@pytest.mark.parametrize("name", FILES)
def test_original_file_runs_unchanged(name, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # no upload attempt for push_to_hub
    path = os.path.join(ORIGINAL, name)
    original = json.load(open(path))
    text = write_lines(tmp_path / "tiny.txt", LINES * 3)
    assert train_jax.main(["--config", path, *size_overrides(tmp_path, text)]) == 0
    lines = capsys.readouterr().out.splitlines()
    no_effect = [line for line in lines if line.startswith("config keys with no effect here:")]
    assert len(no_effect) == 1, lines
    for key in sorted(set(original) & options.IGNORED_KEYS):
        assert no_effect[0].count(key) == 1, key
    with open(tmp_path / "run" / "run_config.json") as f:
        run = json.load(f)
    assert run["train"]["per_device_train_batch_size"] == 2 and run["train"]["block_size"] == 32
    assert run["data"]["batch_size"] == 40000
    model = run["model"]
    assert model["model_type"] == original["model_type"]
    if original["model_type"] == "rotating-head-gpt2":
        assert model["use_norm"] is ("-norm-" in original["run_name"])
        assert sum("original experiment" in line for line in lines) == ("-norm-" in original["run_name"])
    if original["model_type"] == "duo-predict-gpt2":
        assert (model["duo_loss"], model["n_positions"]) == ("original", 32)
    if original["model_type"] == "parallel-gpt2":
        assert model["bottleneck_method"] == "concat"


@pytest.mark.slow
def test_offline_wikitext_is_one_line_saying_what_to_do(tmp_path, monkeypatch):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "HF_DATASETS_CACHE": str(tmp_path / "hf" / "datasets"), "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train_jax.py"), "--config",
                        os.path.join(ORIGINAL, "dd-gpt2-medium.json"), "--output_dir", str(tmp_path / "run"),
                        "--cache_dir", str(tmp_path / "cache")], capture_output=True, text=True, cwd=tmp_path,
                       env=env)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [
        "error: dataset wikitext/wikitext-103-raw-v1 is not cached and HF_HUB_OFFLINE is set; run once online, "
        "or point the file at local text: --dataset null --train_file a.txt --validation_file b.txt"]
    # Without HF_HUB_OFFLINE, an unreachable Hub is found out at once (no retries), also in one line.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    cfg = {"dataset": {"path": "wikitext", "name": "wikitext-103-raw-v1"}, "block_size": 8}
    with pytest.raises(data.DataError) as err:
        prepare_data(cfg, str(tmp_path / "c"), log=lambda s: None)
    assert str(err.value) == (
        "dataset wikitext/wikitext-103-raw-v1 cannot be loaded: the Hugging Face Hub is unreachable (if it is "
        "cached, run with HF_HUB_OFFLINE=1); run once online, or point the file at local text: "
        "--dataset null --train_file a.txt --validation_file b.txt")


# ---------------------------------------------------------------- overwrite_cache: false

def pretokenized_dataset(path, block, vocab):
    """A local dataset shaped like the original's BluebrainAI/...-tokenized-grouped."""
    import datasets

    rng = np.random.default_rng(0)

    def split(n):
        ids = rng.integers(0, vocab, (n, block)).tolist()
        return datasets.Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * block] * n, "labels": ids})

    dd = datasets.DatasetDict({"train": split(40), "validation": split(6)})
    dd.save_to_disk(str(path))
    return dd


def test_pretokenized_blocks_are_read_and_unreadable_ones_fall_back(tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # whatever the environment says
    text = write_lines(tmp_path / "train.txt", LINES)
    pretok = tmp_path / "pretok"
    dd = pretokenized_dataset(pretok, 8, 50)
    # WikiText itself cannot be loaded here (offline): the blocks must come from the dataset alone.
    cfg = {"dataset": {"path": "wikitext", "name": "wikitext-103-raw-v1", "pretokenized": str(pretok)},
           "overwrite_cache": False, "max_seq_length": 8, "block_size": 8,
           "batch_size": 40000, "validation_split_percentage": "1"}
    logs = []
    got = prepare_data(cfg, str(tmp_path / "c"), log=logs.append)
    np.testing.assert_array_equal(got.train, np.array(dd["train"]["input_ids"]))
    np.testing.assert_array_equal(got.validation, np.array(dd["validation"]["input_ids"]))
    assert sum("read from the original's pre-tokenized" in line for line in logs) == 2
    # The default is the original's Hub dataset; unreachable here: one line, then the raw text.
    spec = data.DataSpec.from_config({**cfg, "dataset": {"path": "wikitext", "name": "wikitext-103-raw-v1"}})
    assert data.pretokenized_source(spec, cfg, got.tokenizer) == \
        "BluebrainAI/wikitext-103-raw-v1-seq8-tokenized-grouped"
    assert data.pretokenized_source(spec, {**cfg, "overwrite_cache": True}, got.tokenizer) is None
    for source, why in (("BluebrainAI/nothing-here", "the Hugging Face Hub is unreachable"),
                        (str(pretok), "rows are not blocks of 16 tokens")):
        logs = []
        fell_back = prepare_data({"train_file": text, "dataset": {"pretokenized": source}, "overwrite_cache": False,
                                  "block_size": 16}, str(tmp_path / "c"), log=logs.append)
        notes = [line for line in logs if "overwrite_cache false" in line]
        assert len(notes) == 1 and why in notes[0] and "building them from the raw text" in notes[0], logs
        assert fell_back.train.shape[1] == 16 and len(fell_back.train) > 0
