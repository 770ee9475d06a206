"""The `dataset: {source: tfds, ...}` source on a real TFDS dataset built here (tfds_tiny_text.py):
its texts grouped as the original did, run_clm's validation fallback, the training command, errors."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from flax_gpt2v.data import tokenizer
from flax_gpt2v.data.pipeline import DataError, prepare_data

import tfds_tiny_text
from helpers import ROOT, write_small_tokenizer



@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setattr(tokenizer, "hub_reachable", lambda: False)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("tfds")
    tfds_tiny_text.build(str(root / "data"))
    write_small_tokenizer(root / "tok", tfds_tiny_text.TEXTS["train"])
    return root


def config(root, name, **extra):
    return {"dataset": {"source": "tfds", "name": f"{tfds_tiny_text.NAME}/{name}", "data_dir": str(root / "data"),
                        **extra}, "block_size": 16, "tokenizer_name": str(root / "tok")}


def stored_texts(root, name, split):
    """The split's texts in TFDS's stored order, read with tfds' own data source."""
    import tensorflow_datasets as tfds

    rows = list(tfds.data_source(f"{tfds_tiny_text.NAME}/{name}", split=split, data_dir=str(root / "data")))
    return [r["text"].decode("utf-8") for r in rows], [int(r["id"]) for r in rows]


def grouped(tok, texts, block_size=16):
    ids = [i for t in texts for i in tok.encode(t)]
    n = len(ids) // block_size * block_size
    return np.array(ids[:n], np.int32).reshape(-1, block_size)


def test_tfds_splits_are_grouped_texts(built, tmp_path):
    got = prepare_data(config(built, "two_splits"), str(tmp_path), log=lambda s: None)
    assert got.source == f"tfds {tfds_tiny_text.NAME}/two_splits"
    for split, blocks in (("train", got.train), ("validation", got.validation)):
        texts, ids = stored_texts(built, "two_splits", split)
        assert sorted(ids) == list(range(len(tfds_tiny_text.TEXTS[split])))  # every example once
        assert sorted(texts) == sorted(tfds_tiny_text.TEXTS[split])
        np.testing.assert_array_equal(blocks, grouped(got.tokenizer, texts))


def test_tfds_without_validation_split_holds_out_the_first_percent(built, tmp_path):
    cfg = {**config(built, "train_only"), "validation_split_percentage": 10}
    got = prepare_data(cfg, str(tmp_path), log=lambda s: None)
    texts, _ = stored_texts(built, "train_only", "train")
    np.testing.assert_array_equal(got.validation, grouped(got.tokenizer, texts[:12]))
    np.testing.assert_array_equal(got.train, grouped(got.tokenizer, texts[12:]))


def test_tfds_through_the_training_command(built, tmp_path):
    cfg = {"model_type": "gpt2", "n_layer": 2, "n_embd": 32, "n_head": 4, "n_positions": 16,
           "per_device_train_batch_size": 4, "max_steps": 4, "eval_steps": 2, "save_steps": 2, "logging_steps": 2,
           "learning_rate": 1e-3, "bf16": False, "gradient_checkpointing": False, "report_to": "none",
           "export_hf": False, "block_size": 16, "tokenizer_name": str(built / "tok"),
           "cache_dir": str(tmp_path / "cache"), "output_dir": str(tmp_path / "run")}
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    dataset = config(built, "two_splits")["dataset"]
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train_jax.py"), "--config", str(tmp_path / "cfg.json"),
                        "--dataset", json.dumps(dataset)], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"tfds {tfds_tiny_text.NAME}/two_splits" in r.stdout + r.stderr
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "eval_loss" in m] == [2, 4]
    run_config = json.loads((tmp_path / "run" / "run_config.json").read_text())
    assert run_config["data"]["dataset"] == dataset
    # The same blocks as an in-process prepare_data: the command read the dataset, not something else.
    got = prepare_data({**config(built, "two_splits"), "cache_dir": str(tmp_path / "cache")},
                       str(tmp_path / "cache"), log=lambda s: None)
    assert got.cache_hit


def test_tfds_errors_are_one_line(built, tmp_path):
    for cfg, words in ((config(built, "no_such_config"), "no_such_config"),
                       (config(built, "two_splits", text_column="body"), "no feature 'body'"),
                       ({**config(built, "two_splits"), "dataset": {**config(built, "two_splits")["dataset"],
                                                                     "train_split": "test"}}, "no split 'test'"),
                       # A feature that is not text: named with its first row, as a file's would be.
                       (config(built, "two_splits", text_column="id"),
                        r"split train: row 1, column 'id': int\w* '\d+', not text")):
        with pytest.raises(DataError, match=words) as err:
            prepare_data(cfg, str(tmp_path), log=lambda s: None)
        assert "\n" not in str(err.value)


def test_tfrecord_dataset_without_tensorflow_says_what_to_install(built, tmp_path, monkeypatch):
    # The same dataset as TFDS's default format (tfrecord), which only TensorFlow reads: its
    # dataset_info.json says so (building one needs TensorFlow, which the tests do without).
    data = tmp_path / "data"
    shutil.copytree(built / "data", data)
    info_path = data / tfds_tiny_text.NAME / "two_splits" / "1.0.0" / "dataset_info.json"
    info = json.loads(info_path.read_text())
    assert info["fileFormat"] == "array_record"
    info_path.write_text(json.dumps({**info, "fileFormat": "tfrecord"}))
    monkeypatch.setitem(sys.modules, "tensorflow", None)  # not installed, wherever this runs
    cfg = {**config(built, "two_splits"), "dataset": {**config(built, "two_splits")["dataset"], "data_dir": str(data)}}
    with pytest.raises(DataError, match="stored as tfrecord.*tensorflow-cpu") as err:
        prepare_data(cfg, str(tmp_path / "cache"), log=lambda s: None)
    assert "\n" not in str(err.value)


def test_tfds_cache_key_follows_the_named_dataset_not_the_whole_data_dir(built, tmp_path):
    """Another dataset written into a shared data_dir keeps the cache; a change to this dataset's
    own files rebuilds it."""
    data = tmp_path / "data"
    shutil.copytree(built / "data", data)
    cfg = {**config(built, "two_splits"), "dataset": {**config(built, "two_splits")["dataset"], "data_dir": str(data)}}
    cache, lines = str(tmp_path / "cache"), []
    assert not prepare_data(cfg, cache, log=lines.append).cache_hit
    (data / "some_other_dataset" / "1.0.0").mkdir(parents=True)
    (data / "some_other_dataset" / "1.0.0" / "shard-00000").write_bytes(b"x" * 100)
    assert prepare_data(cfg, cache, log=lines.append).cache_hit
    info = data / tfds_tiny_text.NAME / "two_splits" / "1.0.0" / "dataset_info.json"
    info.write_text(info.read_text() + " ")
    assert not prepare_data(cfg, cache, log=lines.append).cache_hit
