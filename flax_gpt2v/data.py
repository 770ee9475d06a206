"""Training data: text source -> tokens -> fixed-size blocks cached on disk -> batches.

Sources (the training config's keys):
- `dataset: {path: wikitext, name: wikitext-103-raw-v1}`: Hugging Face `datasets`
  (a Hub name, a packaged builder such as `{path: text, data_files: ...}`, or a
  directory written by `save_to_disk`); other keys go to `load_dataset`.
- `train_file` / `validation_file`: local .txt/.json/.jsonl/.csv/.parquet files.
- `dataset: {source: tfds, name: ..., data_dir: ...}`: TensorFlow Datasets (tfds_data.py).
- nothing: CPython's bundled documentation (`pydoc_data.topics`), present
  wherever Python is, so a run needs no download.
Our own keys inside `dataset`: source, text_column, train_split,
validation_split.

The tokenizer is `tokenizer_name` (default gpt2-medium's, which is GPT-2's, built
offline: see tokenizer.py) with <|MASK|> appended.

As in the original (HF run_clm's `group_texts`), each split's texts are
tokenized without separators, concatenated, and cut into blocks of block_size;
the remainder that does not fill a block is dropped.
"""
from __future__ import annotations

import codecs
import hashlib
import itertools
import json
import os
import socket
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import jax
import numpy as np
from tqdm.auto import tqdm

from flax_gpt2v import ops
from flax_gpt2v.tokenizer import Tokenizer, TokenizerError, hub_reachable, load_tokenizer

DEFAULT_TOKENIZER = "gpt2-medium"
DEFAULT_BLOCK_SIZE = 1024
# Bump when the token file layout or the grouping changes, so old caches are ignored.
CACHE_FORMAT = 1
_OUR_DATASET_KEYS = {"source", "path", "name", "text_column", "train_split", "validation_split"}
_FILE_BUILDERS = {"txt": "text", "text": "text", "raw": "text", "json": "json", "jsonl": "json",
                  "csv": "csv", "parquet": "parquet"}
_ROWS_PER_BATCH = 1000


class DataError(RuntimeError):
    """The data cannot be loaded; the message says which and why, on one line."""


@dataclass(frozen=True)
class DataSpec:
    """What to read and how to cut it, from the training config."""

    source: str                     # "hf", "tfds" or "embedded"
    options: dict                   # for "hf": load_dataset / load_from_disk; for "tfds": tfds.load
    text_column: str | None
    train_split: str
    validation_split: str
    validation_split_percentage: int
    block_size: int
    seed: int
    data_seed: int | None
    tokenizer_name: str
    hf_cache_dir: str | None        # the config's cache_dir: where HF keeps downloads
    max_train_samples: int | None
    max_eval_samples: int | None
    local_paths: tuple[str, ...] = field(default=())  # files whose changes invalidate the cache

    @classmethod
    def from_config(cls, cfg: dict) -> "DataSpec":
        dataset = cfg.get("dataset")
        if isinstance(dataset, str):
            dataset = {"path": dataset}
        if dataset is not None and not isinstance(dataset, dict):
            raise DataError(f"config key 'dataset' must be a name or a mapping, got {dataset!r}")
        dataset = dict(dataset or {})
        train_file, validation_file = cfg.get("train_file"), cfg.get("validation_file")
        if train_file and dataset:
            raise DataError("config has both 'dataset' and 'train_file'; give one source")
        if validation_file and not train_file:
            raise DataError("config key 'validation_file' needs 'train_file' too")

        source = dataset.pop("source", "hf" if (dataset or train_file) else "embedded")
        if source not in ("hf", "tfds", "embedded"):
            raise DataError(f"dataset source must be hf, tfds or embedded, got {source!r}")
        local_paths: tuple[str, ...] = ()
        if train_file:
            ext = os.path.splitext(train_file)[1].lstrip(".").lower()
            if ext not in _FILE_BUILDERS:
                raise DataError(f"train_file {train_file!r}: unsupported extension {ext!r}; "
                                f"expected one of {', '.join(sorted(_FILE_BUILDERS))}")
            files = {"train": train_file, **({"validation": validation_file} if validation_file else {})}
            for split, path in files.items():
                _check_local_file(f"{split}_file", path, ext)
            dataset = {"path": _FILE_BUILDERS[ext], "data_files": files}
            # run_clm's default: text files keep their line breaks.
            if dataset["path"] == "text":
                dataset["keep_linebreaks"] = True
            local_paths = tuple(files.values())
        elif source == "hf":
            if "path" not in dataset:
                raise DataError("config key 'dataset' needs a 'path' (e.g. wikitext)")
            local_paths = tuple(_data_file_paths(dataset.get("data_files")))
            if os.path.exists(dataset["path"]):
                local_paths += (dataset["path"],)
        elif source == "tfds":
            if "name" not in dataset:
                raise DataError("config key 'dataset' with source tfds needs a 'name'")
            local_paths = (dataset["data_dir"],) if dataset.get("data_dir") else ()

        text_column = dataset.pop("text_column", None)
        train_split = dataset.pop("train_split", "train")
        validation_split = dataset.pop("validation_split", "validation")
        block_size = cfg.get("block_size") or cfg.get("max_seq_length") or DEFAULT_BLOCK_SIZE
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
            raise DataError(f"config key 'block_size' must be a positive integer, got {block_size!r}")
        tokenizer_name = cfg.get("tokenizer_name") or DEFAULT_TOKENIZER
        return cls(
            source=source,
            options=dataset,
            text_column=text_column,
            train_split=train_split,
            validation_split=validation_split,
            validation_split_percentage=int(cfg.get("validation_split_percentage") or 5),
            block_size=block_size,
            seed=int(cfg["seed"]) if cfg.get("seed") is not None else 42,
            data_seed=cfg.get("data_seed"),
            tokenizer_name=tokenizer_name,
            hf_cache_dir=cfg.get("cache_dir"),
            max_train_samples=cfg.get("max_train_samples"),
            max_eval_samples=cfg.get("max_eval_samples"),
            local_paths=local_paths,
        )

    @property
    def shuffle_seed(self) -> int:
        """The seed for batch order: data_seed if given (as in HF Trainer), else seed."""
        return self.seed if self.data_seed is None else int(self.data_seed)

    def describe(self) -> str:
        if self.source == "embedded":
            return "embedded corpus: CPython documentation (pydoc_data.topics)"
        if self.source == "tfds":
            return f"tfds {self.options['name']}"
        return f"datasets {json.dumps(self.options, sort_keys=True, default=str)}"

    def identity(self) -> dict:
        """Everything that decides the token arrays, except the tokenizer and block size."""
        ident = {"source": self.source, "options": self.options, "text_column": self.text_column,
                 "splits": [self.train_split, self.validation_split, self.validation_split_percentage],
                 "files": _path_stats(self.local_paths)}
        if self.source == "embedded":
            ident["text"] = hashlib.sha256(json.dumps(_embedded_splits()).encode()).hexdigest()
        return ident


@dataclass
class PreparedData:
    tokenizer: Tokenizer
    train: np.ndarray           # int32 [N_train_blocks, block_size], memory-mapped
    validation: np.ndarray      # int32 [N_val_blocks, block_size], memory-mapped
    source: str
    cache_hit: bool
    cache_path: str
    spec: DataSpec


def prepare_data(train_cfg: dict, cache_dir: str, log: Callable[[str], None] = print) -> PreparedData:
    """Tokenizer and block arrays for `train_cfg`, built once and then read from
    `cache_dir` (memory-mapped). The config's own `cache_dir` is where Hugging Face
    keeps downloads, as in the original."""
    spec = DataSpec.from_config(train_cfg)
    corpus = Corpus(spec)
    tokenizer = spec_tokenizer(spec)
    key_data = {"format": CACHE_FORMAT, "data": spec.identity(), "block_size": spec.block_size,
                "tokenizer": [tokenizer.source, tokenizer.fingerprint]}
    key = hashlib.sha256(json.dumps(key_data, sort_keys=True, default=str).encode()).hexdigest()[:20]
    directory = os.path.join(cache_dir, "data", key)
    os.makedirs(directory, exist_ok=True)

    arrays, cache_hit = {}, True
    for split in ("train", "validation"):
        base = os.path.join(directory, split)
        blocks, problem = open_blocks(base, key, spec.block_size)
        if blocks is None:
            if problem != "missing":
                log(f"[data] cache {base}.bin is unusable ({problem}); rebuilding it")
            name = spec.train_split if split == "train" else spec.validation_split
            build_blocks(base, key, corpus, name, tokenizer, spec.block_size, log)
            cache_hit = False
            blocks, problem = open_blocks(base, key, spec.block_size)
            if blocks is None:
                raise DataError(f"cache {base}.bin was just written but cannot be read back: {problem}")
        arrays[split] = blocks

    if len(arrays["train"]) == 0:
        raise DataError(f"{spec.describe()}: the training split has fewer tokens than one block "
                        f"of {spec.block_size}")
    if len(arrays["validation"]) == 0:
        log(f"[data] warning: the validation split has fewer tokens than one block of {spec.block_size}")
    train = arrays["train"][:spec.max_train_samples] if spec.max_train_samples else arrays["train"]
    validation = arrays["validation"][:spec.max_eval_samples] if spec.max_eval_samples else arrays["validation"]
    log(f"[data] {spec.describe()} | tokenizer {tokenizer.source} (vocab {tokenizer.vocab_size}) | "
        f"{len(train)} train / {len(validation)} validation blocks of {spec.block_size} | "
        f"{'cache hit' if cache_hit else 'built'}: {directory}")
    return PreparedData(tokenizer, train, validation, spec.describe(), cache_hit, directory, spec)


def spec_tokenizer(spec: DataSpec) -> Tokenizer:
    """The configured tokenizer, or one DataError line naming it."""
    try:
        return load_tokenizer(spec.tokenizer_name)
    except TokenizerError as e:
        raise DataError(str(e)) from None


class Corpus:
    """The source's texts, loaded on first use."""

    def __init__(self, spec: DataSpec):
        self.spec = spec
        self._splits: dict[str, Any] | None = None

    def _data(self, split: str):
        if self._splits is None:
            self._splits = _load_splits(self.spec)
        return self._splits[split]

    def batches(self, split: str) -> Iterator[list[str]]:
        """Lists of texts of `split` (a split name as configured)."""
        data = self._data(split)
        if isinstance(data, list):
            for i in range(0, len(data), _ROWS_PER_BATCH):
                yield data[i:i + _ROWS_PER_BATCH]
        else:
            yield from data()

    def num_rows(self, split: str) -> int | None:
        data = self._data(split)
        return len(data) if isinstance(data, list) else getattr(data, "num_rows", None)


def _load_splits(spec: DataSpec) -> dict:
    if spec.source == "embedded":
        train, validation = _embedded_splits()
        return {spec.train_split: train, spec.validation_split: validation}
    if spec.source == "tfds":
        from flax_gpt2v.tfds_data import load_tfds
        return load_tfds(spec)
    return _load_hf(spec)


def _embedded_splits() -> tuple[list[str], list[str]]:
    """CPython's bundled documentation, split by topic about 95/5.

    Topics are ordered by a hash of their name (stable across runs and Python
    versions) and moved to validation until it holds 5% of the characters. Each
    line is one text, like the rows of wikitext.
    """
    from pydoc_data.topics import topics

    total = sum(len(t) for t in topics.values())
    validation_topics, size = set(), 0
    for name in sorted(topics, key=lambda n: hashlib.sha256(n.encode()).hexdigest()):
        if size >= 0.05 * total:
            break
        validation_topics.add(name)
        size += len(topics[name])

    def lines(names):
        return [line for n in sorted(names) for line in topics[n].splitlines(keepends=True)]

    return lines(set(topics) - validation_topics), lines(validation_topics)


def _load_hf(spec: DataSpec) -> dict:
    import datasets
    from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES
    from huggingface_hub import constants

    opts = dict(spec.options)
    path = opts.pop("path")
    what = f"dataset {path!r}" + (f" ({opts['name']})" if opts.get("name") else "")
    if path in _FILE_BUILDERS.values() and spec.local_paths:
        what = " and ".join(spec.local_paths)
    is_saved = os.path.isdir(path) and any(
        os.path.exists(os.path.join(path, f)) for f in ("dataset_dict.json", "state.json"))
    needs_hub = not os.path.exists(path) and path not in _PACKAGED_DATASETS_MODULES
    if needs_hub and not constants.HF_HUB_OFFLINE and not hub_reachable():
        raise DataError(f"cannot load {what}: the Hugging Face Hub cannot be reached. Download it on a "
                        "machine with internet (then run with HF_HUB_OFFLINE=1 to use the cache), "
                        "or give a local path, train_file/validation_file, or no dataset at all "
                        "(the embedded corpus)")
    try:
        if is_saved:
            loaded = datasets.load_from_disk(path)
        else:
            loaded = datasets.load_dataset(path, cache_dir=spec.hf_cache_dir, **opts)
    except Exception as e:  # datasets raises many kinds; all mean the same to the user
        # DatasetGenerationError says only "An error occurred"; its cause says which.
        e = e.__cause__ or e if type(e).__name__.startswith("DatasetGeneration") else e
        first_line = (str(e).strip().splitlines() or [""])[0]
        raise DataError(f"cannot load {what}: {type(e).__name__}: {first_line}") from e
    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict({spec.train_split: loaded})
    if spec.train_split not in loaded:
        raise DataError(f"{what} has no split {spec.train_split!r} (it has {', '.join(loaded)})")
    train = loaded[spec.train_split]
    if spec.validation_split in loaded:
        validation = loaded[spec.validation_split]
    else:
        # run_clm's fallback: the first validation_split_percentage % of train.
        n_val = int(round(len(train) * spec.validation_split_percentage / 100))
        validation = train.select(range(n_val))
        train = train.select(range(n_val, len(train)))
    column = spec.text_column or ("text" if "text" in train.column_names else train.column_names[0])
    if column not in train.column_names:
        raise DataError(f"{what} has no column {column!r} (it has {', '.join(train.column_names)})")

    def reader(ds):
        def batches():
            for batch in ds.select_columns([column]).iter(batch_size=_ROWS_PER_BATCH):
                yield batch[column]
        batches.num_rows = len(ds)
        return batches

    return {spec.train_split: reader(train), spec.validation_split: reader(validation)}


def build_blocks(base: str, key: str, corpus: Corpus, split: str, tokenizer: Tokenizer,
                  block_size: int, log) -> None:
    """Tokenize `split`, concatenate, drop the remainder, write base.bin + base.json.

    Both files are written under temporary names and renamed, the sidecar last:
    a killed run leaves either no cache or a complete one.
    """
    tmp_suffix = f".tmp-{socket.gethostname()}-{os.getpid()}"
    n_tokens = 0
    batches = corpus.batches(split)
    with open(base + ".bin" + tmp_suffix, "wb") as f, \
            tqdm(total=corpus.num_rows(split), unit=" texts", desc=f"tokenizing {split}") as bar:
        for texts in batches:
            ids = np.fromiter(itertools.chain.from_iterable(tokenizer.encode_batch(texts)), dtype=np.int32)
            f.write(ids.tobytes())
            n_tokens += ids.size
            bar.update(len(texts))
        n_blocks = n_tokens // block_size
        f.truncate(n_blocks * block_size * 4)
        f.flush()
        os.fsync(f.fileno())
    os.replace(base + ".bin" + tmp_suffix, base + ".bin")
    meta = {"key": key, "dtype": "int32", "block_size": block_size, "n_blocks": n_blocks,
            "n_tokens": n_tokens, "bytes": n_blocks * block_size * 4}
    with open(base + ".json" + tmp_suffix, "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(base + ".json" + tmp_suffix, base + ".json")
    log(f"[data] {split}: {n_tokens} tokens -> {n_blocks} blocks of {block_size} "
        f"({n_tokens - n_blocks * block_size} dropped) -> {base}.bin")


def open_blocks(base: str, key: str, block_size: int) -> tuple[np.ndarray | None, str | None]:
    """(memory-mapped blocks, None), or (None, why the cache cannot be used)."""
    if not os.path.exists(base + ".json"):
        return None, "missing"
    try:
        with open(base + ".json") as f:
            meta = json.load(f)
        expected = {"key": key, "dtype": "int32", "block_size": block_size}
        wrong = [k for k, v in expected.items() if meta.get(k) != v]
        if wrong:
            return None, f"sidecar field(s) {', '.join(wrong)} do not match"
        n_blocks = int(meta["n_blocks"])
        size = os.path.getsize(base + ".bin")
    except (OSError, ValueError, KeyError, TypeError) as e:
        return None, f"{type(e).__name__}: {e}"
    if size != n_blocks * block_size * 4 or meta.get("bytes") != size:
        return None, f"file has {size} bytes, sidecar says {n_blocks} blocks of {block_size} int32"
    if n_blocks == 0:  # np.memmap cannot map an empty file
        return np.zeros((0, block_size), np.int32), None
    return np.memmap(base + ".bin", dtype=np.int32, mode="r", shape=(n_blocks, block_size)), None


def _check_local_file(key: str, path: str, ext: str) -> None:
    """A DataError naming `path` unless it is a readable, non-empty file whose start is UTF-8 text
    (parquet aside); what lies further is checked as datasets reads it."""
    if not os.path.exists(path):
        raise DataError(f"config key '{key}': {path} does not exist")
    if not os.path.isfile(path):
        raise DataError(f"config key '{key}': {path} is not a file")
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 20)
    except OSError as e:
        raise DataError(f"config key '{key}': cannot read {path}: {e.strerror}") from None
    if not head:
        raise DataError(f"config key '{key}': {path} is empty")
    if ext == "parquet":
        return
    if b"\0" in head:
        raise DataError(f"config key '{key}': {path} is binary, not text (it holds NUL bytes)")
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError as e:
        raise DataError(f"config key '{key}': {path} is not UTF-8 text (byte {head[e.start]:#04x} at offset "
                        f"{e.start}); convert it, e.g. iconv -t utf-8") from None


def _data_file_paths(data_files) -> list[str]:
    if data_files is None:
        return []
    if isinstance(data_files, str):
        return [data_files]
    if isinstance(data_files, dict):
        return [p for v in data_files.values() for p in _data_file_paths(v)]
    return [p for v in data_files for p in _data_file_paths(v)]


def _path_stats(paths) -> list:
    """(path, size, mtime) of each file (directories walked), so edits invalidate the cache."""
    stats = []
    for path in paths:
        files = [path] if not os.path.isdir(path) else sorted(
            os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs)
        for p in files:
            st = os.stat(p) if os.path.exists(p) else None
            stats.append([os.path.abspath(p), st and st.st_size, st and st.st_mtime_ns])
    return stats


class BatchSchedule:
    """Which blocks form each global step: a fresh permutation per epoch, computed
    from (seed, epoch) alone, so any step can be produced without state (resume)."""

    def __init__(self, num_blocks: int, global_batch: int, seed: int, process_index: int = 0,
                 process_count: int = 1):
        if global_batch % process_count:
            raise ValueError(f"global batch {global_batch} is not divisible by {process_count} processes")
        if num_blocks < global_batch:
            raise ValueError(f"{num_blocks} blocks are fewer than one global batch of {global_batch}")
        if not 0 <= process_index < process_count:
            raise ValueError(f"process index {process_index} is outside 0..{process_count - 1}")
        self.num_blocks, self.global_batch, self.seed = num_blocks, global_batch, seed
        self.per_process = global_batch // process_count
        self.offset = process_index * self.per_process
        self.steps_per_epoch = num_blocks // global_batch
        self._epoch, self._perm = None, None

    def permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._epoch = epoch
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_blocks)
        return self._perm

    def indices(self, step: int) -> np.ndarray:
        epoch, i = divmod(step, self.steps_per_epoch)
        start = i * self.global_batch + self.offset
        return self.permutation(epoch)[start:start + self.per_process]


def make_batch(blocks: np.ndarray, indices: np.ndarray, model_cfg: dict) -> dict:
    """Numpy batch of the blocks at `indices`: input_ids and targets (IGNORE where none)."""
    rows = np.asarray(blocks[np.asarray(indices)], dtype=np.int32)
    # The layout functions are the models' own (ops); run them on the host CPU so
    # data preparation never touches (or waits for) the accelerator.
    with jax.default_device(_host_device()):
        if model_cfg.get("model_type", "gpt2") == "duo-predict-gpt2":
            inputs = ops.interleave(rows, model_cfg["mask_token_id"])
            targets = ops.duo_targets(rows, model_cfg.get("duo_loss", "dual"))
        else:
            inputs, targets = rows, ops.next_token_targets(rows)
        return {"input_ids": np.array(inputs, dtype=np.int32), "targets": np.array(targets, dtype=np.int32)}


def _host_device():
    try:
        return jax.local_devices(backend="cpu")[0]
    except RuntimeError:  # JAX_PLATFORMS excludes cpu: use the default device
        return None


def eval_batches(blocks: np.ndarray, batch_size: int, model_cfg: dict, process_index: int = 0,
                 process_count: int = 1) -> Iterator[dict]:
    """Every block once, in order, as this process's part of global batches of
    `batch_size`. The last batch is padded with rows whose targets are all IGNORE,
    so summed metrics count each real token exactly once."""
    if batch_size % process_count:
        raise ValueError(f"eval batch {batch_size} is not divisible by {process_count} processes")
    per_process = batch_size // process_count
    for start in range(0, len(blocks), batch_size):
        idx = np.arange(per_process) + start + process_index * per_process
        real = idx < len(blocks)
        batch = make_batch(blocks, np.where(real, idx, 0), model_cfg)
        batch["targets"][~real] = ops.IGNORE
        yield batch
