"""Data pipeline: sources, grouping, caches, batch order and batch layout. Local data only."""
import hashlib
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from flax_gpt2v.data import pipeline as data, tokenizer
from flax_gpt2v.models import ops
from flax_gpt2v.models import load_config
from flax_gpt2v.data.pipeline import BatchSchedule, DataError, eval_batches, make_batch, prepare_data
from flax_gpt2v.data.tokenizer import TokenizerError, load_tokenizer

from helpers import write_small_tokenizer

LINES = [f"Line {i}: the quick brown fox jumps over the lazy dog {i * 7}.\n" for i in range(60)]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    # The Hub is never contacted in tests, whatever the machine's network.
    monkeypatch.setattr(tokenizer, "hub_reachable", lambda: False)
    monkeypatch.setattr(data, "hub_reachable", lambda: False)


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("cache"))
    logs = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tokenizer, "hub_reachable", lambda: False)
        first = prepare_data({"block_size": 256}, cache, log=logs.append)
        second = prepare_data({"block_size": 256}, cache, log=logs.append)
    return cache, first, second, logs


def group_texts(examples, block_size):
    """HF run_clm's group_texts, as the original used it."""
    concatenated = {k: sum(examples[k], []) for k in examples}
    total_length = (len(concatenated["input_ids"]) // block_size) * block_size
    return {k: [t[i:i + block_size] for i in range(0, total_length, block_size)]
            for k, t in concatenated.items()}


def write_lines(path, lines):
    with open(path, "w") as f:
        f.writelines(lines)
    return str(path)


def test_grouping_matches_original(tmp_path):
    train = write_lines(tmp_path / "train.txt", LINES[:50])
    val = write_lines(tmp_path / "val.txt", LINES[50:])
    cfg = {"train_file": train, "validation_file": val, "block_size": 16,
           "cache_dir": str(tmp_path / "hf")}
    got = prepare_data(cfg, str(tmp_path / "cache"), log=lambda s: None)
    tok = got.tokenizer
    assert got.train.dtype == np.int32 and got.train.shape[1] == 16
    for lines, blocks in ((LINES[:50], got.train), (LINES[50:], got.validation)):
        expected = group_texts({"input_ids": [tok.encode(t) for t in lines]}, 16)["input_ids"]
        np.testing.assert_array_equal(blocks, np.array(expected, dtype=np.int32))
    # The remainder really was dropped, not padded.
    n_tokens = sum(len(tok.encode(t)) for t in LINES[:50])
    assert got.train.size == n_tokens // 16 * 16


def test_a_full_disk_under_the_token_cache_names_it(tmp_path, monkeypatch):
    import errno

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "fsync", full)  # where the cache's writes end: the disk is full
    cfg = {"train_file": write_lines(tmp_path / "train.txt", LINES), "block_size": 16,
           "cache_dir": str(tmp_path / "hf")}
    with pytest.raises(DataError) as e:
        prepare_data(cfg, str(tmp_path / "cache"), log=lambda s: None)
    (directory,) = (tmp_path / "cache" / "data").iterdir()
    assert str(e.value) == (f"disk full while writing the token cache {directory}: No space left on device; free "
                            "space there or set cache_dir to a disk with room, then run the same command")
    assert os.listdir(directory) == []  # no partial cache left taking room

    # What a build that exited at once (a stop during data preparation) left is removed by the next build
    # on this host, unless its process still runs.
    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()
    host = socket.gethostname()
    left, running = (directory / f".train.bin.partial-{host}-{pid}-0123abcd" for pid in (dead.pid, os.getppid()))
    left.write_bytes(b"x")
    running.write_bytes(b"x")
    monkeypatch.undo()
    prepare_data(cfg, str(tmp_path / "cache"), log=lambda s: None)
    assert not left.exists() and running.exists()


def test_datasets_saved_to_disk_and_text_builder(tmp_path):
    import datasets

    dd = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"id": list(range(50)), "body": LINES[:50]}),
        "validation": datasets.Dataset.from_dict({"id": list(range(10)), "body": LINES[50:]}),
    })
    dd.save_to_disk(str(tmp_path / "saved"))
    cfg = {"dataset": {"path": str(tmp_path / "saved"), "text_column": "body"}, "block_size": 16}
    got = prepare_data(cfg, str(tmp_path / "cache"), log=lambda s: None)
    tok = got.tokenizer
    expected = group_texts({"input_ids": [tok.encode(t) for t in LINES[50:]]}, 16)["input_ids"]
    np.testing.assert_array_equal(got.validation, expected)
    assert got.tokenizer.source == "gpt2"

    # A packaged builder over a local file, no validation split: run_clm's 5% fallback.
    path = write_lines(tmp_path / "all.txt", LINES * 2)
    cfg = {"dataset": {"path": "text", "data_files": {"train": path}, "keep_linebreaks": True},
           "block_size": 16, "validation_split_percentage": 10,
           "cache_dir": str(tmp_path / "hf")}
    got = prepare_data(cfg, str(tmp_path / "cache"), log=lambda s: None)
    tok = got.tokenizer
    n_val = 12  # 10% of 120 rows
    for rows, blocks in (((LINES * 2)[:n_val], got.validation), ((LINES * 2)[n_val:], got.train)):
        expected = group_texts({"input_ids": [tok.encode(t) for t in rows]}, 16)["input_ids"]
        np.testing.assert_array_equal(blocks, expected)


def test_embedded_corpus_with_gpt2_tokenizer(embedded, tmp_path):
    cache, first, second, logs = embedded
    tok = first.tokenizer
    assert tok.source == "gpt2"
    assert tok.vocab_size == 50258 and tok.mask_token_id == 50257 and tok.eos_token_id == 50256
    assert "pydoc_data" in first.source
    # Real English text, not random tokens; train and validation are different topics.
    text = tok.decode(first.train[:4].reshape(-1))
    assert " the " in text and " of " in text
    assert len(first.train) > 10 * len(first.validation) > 0
    assert first.train.max() < tok.mask_token_id
    # Saved files load with transformers and tokenize the same way.
    from transformers import AutoTokenizer
    tok.save(str(tmp_path / "tok"), model_max_length=1024)
    assert {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"} <= set(os.listdir(tmp_path / "tok"))
    hf = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    sample = "Augmented assignment <|MASK|> is neat.<|endoftext|>"
    assert hf(sample)["input_ids"] == tok.encode(sample)
    assert hf.mask_token_id == tok.mask_token_id and len(hf) == tok.vocab_size


def test_pretrained_tokenizer_gets_mask_appended(tmp_path):
    raw = write_small_tokenizer(tmp_path / "gpt", LINES)
    tok = load_tokenizer(str(tmp_path / "gpt"))
    assert tok.source == str(tmp_path / "gpt")
    assert tok.mask_token_id == tok.vocab_size - 1 == raw.get_vocab_size()
    assert tok.encode("dog <|MASK|>")[-1] == tok.mask_token_id
    with pytest.raises(TokenizerError, match="no-such-tokenizer") as err:
        load_tokenizer("no-such-tokenizer")
    assert "\n" not in str(err.value)
    with pytest.raises(DataError, match="no-such-tokenizer"):
        prepare_data({"tokenizer_name": "no-such-tokenizer"}, str(tmp_path / "cache"))


def test_cache_hit_and_rebuild_after_corruption(embedded):
    cache, first, second, logs = embedded
    assert not first.cache_hit and second.cache_hit
    np.testing.assert_array_equal(first.train, second.train)
    assert isinstance(second.train, np.memmap)
    # Copies: the mapped file is about to be cut short under the mapping.
    want_train, want_val = np.array(first.train), np.array(first.validation)
    train_bin = os.path.join(second.cache_path, "train.bin")
    with open(train_bin, "r+b") as f:  # a run killed mid-write would leave a short file
        f.truncate(1000)
    with open(os.path.join(second.cache_path, "validation.json"), "w"):
        pass  # torn to zero bytes, as a power loss leaves a file written without fsync
    logs = []
    third = prepare_data({"block_size": 256}, cache, log=logs.append)
    assert not third.cache_hit
    assert sum("unusable" in line and "rebuilding" in line for line in logs) == 2
    # The identity a run records: the tokens' SHA-256, the same from the sidecar as from the arrays.
    assert data.tokens_identity(third) == data.tokens_identity(second)
    assert third.digests["train"] == hashlib.sha256(want_train).hexdigest()
    np.testing.assert_array_equal(third.train, want_train)
    np.testing.assert_array_equal(third.validation, want_val)
    # Another block size is another cache entry.
    other = prepare_data({"block_size": 128}, cache, log=lambda s: None)
    assert other.cache_path != third.cache_path and other.train.shape[1] == 128


def test_batch_schedule_order():
    s = BatchSchedule(num_blocks=103, global_batch=8, seed=3)
    assert s.steps_per_epoch == 12
    epoch0 = np.concatenate([s.indices(i) for i in range(12)])
    assert len(set(epoch0.tolist())) == 96 and epoch0.max() < 103
    epoch1 = np.concatenate([s.indices(i) for i in range(12, 24)])
    assert not np.array_equal(epoch0, epoch1)
    # Random access: a fresh schedule (a resumed run) gives the same step.
    fresh = BatchSchedule(num_blocks=103, global_batch=8, seed=3)
    np.testing.assert_array_equal(fresh.indices(17), s.indices(17))
    assert not np.array_equal(BatchSchedule(103, 8, seed=4).indices(0), s.indices(0))


def test_host_shards_are_disjoint_and_cover_the_global_batch():
    full = BatchSchedule(num_blocks=50, global_batch=8, seed=0)
    hosts = [BatchSchedule(50, 8, 0, process_index=p, process_count=4) for p in range(4)]
    for step in (0, 5, 6, 13):
        parts = [h.indices(step) for h in hosts]
        assert all(len(p) == 2 for p in parts)
        np.testing.assert_array_equal(np.concatenate(parts), full.indices(step))
    with pytest.raises(ValueError):
        BatchSchedule(50, 8, 0, process_count=3)


def test_causal_and_duo_batch_layout():
    blocks = np.arange(40, dtype=np.int32).reshape(5, 8)
    idx = np.array([3, 1])
    causal = make_batch(blocks, idx, load_config({"model_type": "gpt2"}))
    np.testing.assert_array_equal(causal["input_ids"], blocks[idx])
    np.testing.assert_array_equal(causal["targets"], np.asarray(ops.next_token_targets(blocks[idx])))
    assert causal["targets"][0, -1] == ops.IGNORE

    for loss in ("dual", "original"):
        cfg = load_config({"model_type": "duo-predict-gpt2", "duo_loss": loss, "vocab_size": 100})
        duo = make_batch(blocks, idx, cfg)
        ids, tgt = duo["input_ids"], duo["targets"]
        assert ids.shape == tgt.shape == (2, 15) and ids.dtype == tgt.dtype == np.int32
        np.testing.assert_array_equal(ids[:, ::2], blocks[idx])
        assert (ids[:, 1::2] == 99).all()
        np.testing.assert_array_equal(tgt, np.asarray(ops.duo_targets(blocks[idx], loss)))
    # "dual": index 2m predicts x_{m+1}, index 2m+1 predicts x_m.
    cfg = load_config({"model_type": "duo-predict-gpt2", "vocab_size": 100})
    tgt = make_batch(blocks, idx, cfg)["targets"]
    np.testing.assert_array_equal(tgt[0, 0:-1:2], blocks[3, 1:])
    np.testing.assert_array_equal(tgt[0, 1::2], blocks[3, :-1])


@pytest.mark.parametrize("model_type", ["gpt2", "duo-predict-gpt2"])
def test_eval_batches_pad_exactly(model_type):
    cfg = load_config({"model_type": model_type, "vocab_size": 100})
    blocks = np.arange(10 * 6, dtype=np.int32).reshape(10, 6)
    reference = make_batch(blocks, np.arange(10), cfg)
    per_block = (reference["targets"] != ops.IGNORE).sum(axis=1)
    seen = []
    for p in range(2):
        batches = list(eval_batches(blocks, 4, cfg, process_index=p, process_count=2))
        assert len(batches) == 3 and all(len(b["input_ids"]) == 2 for b in batches)
        for k, b in enumerate(batches):
            for r in range(2):
                i = 4 * k + 2 * p + r
                if i < 10:
                    np.testing.assert_array_equal(b["targets"][r], reference["targets"][i])
                    seen.append(i)
                else:
                    assert (b["targets"][r] == ops.IGNORE).all()
    assert sorted(seen) == list(range(10))
    assert per_block.sum() == sum(
        (b["targets"] != ops.IGNORE).sum() for p in range(2) for b in eval_batches(blocks, 4, cfg, p, 2))


def test_tfds_missing_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import fails
    cfg = {"dataset": {"source": "tfds", "name": "lm1b"}, "block_size": 16}
    with pytest.raises(DataError, match="tensorflow-datasets"):
        prepare_data(cfg, str(tmp_path), log=lambda s: None)


def test_unknown_dataset_offline_is_a_one_line_error(tmp_path):
    cfg = {"dataset": {"path": "no-such-org/no-such-dataset", "name": "v1"}, "block_size": 16}
    with pytest.raises(DataError) as err:
        prepare_data(cfg, str(tmp_path), log=lambda s: None)
    message = str(err.value)
    assert "no-such-org/no-such-dataset" in message and "\n" not in message
    with pytest.raises(DataError, match="both 'dataset' and 'train_file'"):
        prepare_data({"dataset": "wikitext", "train_file": "x.txt"}, str(tmp_path))


# Rows that are not text, in each format datasets reads: (file name, contents, the bad row).
BAD_ROWS = {
    "null.jsonl": ('{"text": "a b"}\n{"text": "c"}\n{"text": null}\n', 3),
    "number.jsonl": ('{"text": "a b"}\n{"text": 5}\n', 2),
    "array.json": ('[{"text": "a b"}, {"text": null}]', 2),
    "cell.csv": ('text,n\n"a b",1\n,2\n', 2),  # an empty cell; the header is not a row
    "null.parquet": (["a b", "c", None], 3),
    "number.parquet": ([1, 2], 1),
}


@pytest.mark.parametrize("streaming", [False, True])
def test_rows_that_are_not_text_are_named(streaming, tmp_path):
    """Every format, streaming and not: one DataError naming the file, the row and the column, raised
    while the rows are read (before a token of them is cached)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for name, (content, row) in BAD_ROWS.items():
        path = tmp_path / name
        if name.endswith(".parquet"):
            pq.write_table(pa.table({"text": content}), path)
        else:
            path.write_text(content)
        corpus = data.Corpus(data.DataSpec.from_config({"train_file": str(path), "validation_file": str(path),
                                                        "streaming": streaming}))
        with pytest.raises(DataError) as err:
            list(corpus.batches("train"))
        assert f"{path}: row {row}, column 'text': " in str(err.value) and "not text" in str(err.value)
    # Bytes that are not UTF-8 past the part checked up front (1 MiB): read by the stream as by datasets.
    path = tmp_path / "late.txt"
    path.write_bytes(b"some text\n" * 120000 + b"caf\xe9\n")
    corpus = data.Corpus(data.DataSpec.from_config({"train_file": str(path), "streaming": streaming}))
    with pytest.raises(DataError, match=f"cannot load {path}: UnicodeDecodeError"):
        list(corpus.batches("train"))
