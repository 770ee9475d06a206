"""Training data: text source -> tokens -> fixed-size blocks cached on disk -> batches.

Sources (the training config's keys):
- `dataset: {path: wikitext, name: wikitext-103-raw-v1}`: Hugging Face `datasets`
  (a Hub name, a packaged builder such as `{path: text, data_files: ...}`, or a
  directory written by `save_to_disk`); other keys go to `load_dataset`.
- `train_file` / `validation_file`: local .txt/.json/.jsonl/.csv/.parquet files.
- `dataset: {source: tfds, name: ..., data_dir: ...}`: TensorFlow Datasets (data/tfds.py).
- nothing: CPython's bundled documentation (`pydoc_data.topics`), present
  wherever Python is, so a run needs no download.
- `train_files` (the original's key): a list of local files; empty: use `dataset`.
Our own keys inside `dataset`: source, text_column, train_split,
validation_split, pretokenized (where `overwrite_cache: false` reads grouped blocks; see below).

The tokenizer is `tokenizer_name` (default gpt2-medium's, which is GPT-2's, built
offline: see tokenizer.py) with <|MASK|> appended.

The splits, as the original prepared them (docs/training.md, 9): with
`validation_split_percentage` P (and no validation_file), validation is the
train split's first P% of rows (`train[:P%]`, datasets' rounding) and training
the rest; without it, the source's validation split (else 5%, as run_clm). With
`max_train_samples` N, training AND validation are the first N rows.
As in the original (HF run_clm's `group_texts` under `datasets.map`), texts are
tokenized without separators, concatenated per map batch of `batch_size` rows
(each of `dataset.num_proc` contiguous shards batched on its own, as map does)
and cut into blocks; each map batch's remainder is dropped. Without `batch_size`
the whole split is one map batch. `streaming: true` reads the text as a stream
while the token cache is built: the same tokens, nothing held in memory.
`overwrite_cache: false` reads the original's tokenized, grouped blocks from the
Hub (`pretokenized_source`) when they can be had, else builds them, saying so.
"""
from __future__ import annotations

import codecs
import contextlib
import errno
import glob
import hashlib
import itertools
import json
import os
import socket
from dataclasses import dataclass, field
from typing import Callable, Iterator

import jax
import numpy as np
from tqdm.auto import tqdm

from flax_gpt2v import durable
from flax_gpt2v.models import ops, variant_of
from flax_gpt2v.config import block_length
from flax_gpt2v.data.common import ROWS_PER_BATCH, DataError, check_texts, process_alive
from flax_gpt2v.data.tfds import load_tfds
from flax_gpt2v.data.tokenizer import Tokenizer, TokenizerError, hub_reachable, load_tokenizer
from flax_gpt2v.errors import first_line

DEFAULT_TOKENIZER = "gpt2-medium"
DEFAULT_BLOCK_SIZE = 1024
# Bump when the token file layout or the grouping changes, so old caches are ignored.
# 3: the sidecar holds the tokens' SHA-256.
CACHE_FORMAT = 3
_FILE_BUILDERS = {"txt": "text", "text": "text", "raw": "text", "json": "json", "jsonl": "json",
                  "csv": "csv", "parquet": "parquet"}


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
    max_train_samples: int | None   # rows of the train split used for training AND validation
    max_eval_samples: int | None    # validation blocks
    local_paths: tuple[str, ...] = field(default=())  # files whose changes invalidate the cache
    pretokenized: str | None = None     # our dataset.pretokenized: where the grouped blocks are
    map_batch_size: int | None = None   # the original's `batch_size`: rows per grouping batch
    num_proc: int | None = None         # the original's `dataset.num_proc`: shards of the grouping map
    streaming: bool = False
    validation_file: bool = False       # the validation split is a file of its own

    @classmethod
    def from_config(cls, cfg: dict) -> "DataSpec":
        dataset, train_file, train_files = _text_source(cfg)
        # How to group and where pre-tokenized blocks are, whatever the text source.
        num_proc = dataset.pop("num_proc", None)
        pretokenized = dataset.pop("pretokenized", None)
        if train_file and dataset:
            raise DataError("config has both 'dataset' and 'train_file'; give one source")
        if train_files:  # the original's rule: local files replace the dataset
            train_file, dataset = list(train_files), {}
        validation_file = cfg.get("validation_file")
        if validation_file and not train_file:
            raise DataError("config key 'validation_file' needs 'train_file' too")
        source = dataset.pop("source", "hf" if (dataset or train_file) else "embedded")
        if source not in ("hf", "tfds", "embedded"):
            raise DataError(f"dataset source must be hf, tfds or embedded, got {source!r}")
        if train_file:
            dataset, local_paths = _local_files(train_file, validation_file, bool(train_files))
        else:
            local_paths = _dataset_paths(source, dataset)
        percentage = _check_numbers(cfg, num_proc, source)
        return cls(
            source=source,
            text_column=dataset.pop("text_column", None),
            train_split=dataset.pop("train_split", "train"),
            validation_split=dataset.pop("validation_split", "validation"),
            options=dataset,
            validation_split_percentage=percentage,
            block_size=block_length(cfg) or DEFAULT_BLOCK_SIZE,
            seed=int(cfg["seed"]) if cfg.get("seed") is not None else 42,
            data_seed=cfg.get("data_seed"),
            tokenizer_name=cfg.get("tokenizer_name") or DEFAULT_TOKENIZER,
            hf_cache_dir=cfg.get("cache_dir"),
            max_train_samples=cfg.get("max_train_samples"),
            max_eval_samples=cfg.get("max_eval_samples"),
            local_paths=local_paths,
            map_batch_size=cfg.get("batch_size"),
            pretokenized=pretokenized,
            num_proc=num_proc,
            streaming=bool(cfg.get("streaming")),
            validation_file=bool(validation_file),
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
                 "splits": [self.train_split, self.validation_split, self.validation_split_percentage,
                            self.max_train_samples, self.validation_file],
                 "grouping": [self.map_batch_size, self.num_proc],
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
    digests: dict               # {split: SHA-256 of its cached tokens}, the data's identity (tokens_identity)


def prepare_data(train_cfg: dict, cache_dir: str, log: Callable[[str], None] = print) -> PreparedData:
    """Tokenizer and block arrays for `train_cfg`, built once and then read from
    `cache_dir` (memory-mapped). The config's own `cache_dir` is where Hugging Face
    keeps downloads, as in the original."""
    spec = DataSpec.from_config(train_cfg)
    corpus = Corpus(spec)
    tokenizer = spec_tokenizer(spec)
    found = None
    hub = pretokenized_source(spec, train_cfg, tokenizer)
    if hub is not None:
        found = _pretokenized_blocks(hub, spec, tokenizer, cache_dir, log)

    def build(split, base, key):
        name = spec.train_split if split == "train" else spec.validation_split
        build_blocks(base, key, corpus, name, tokenizer, spec.block_size, log)

    arrays, digests, cache_hit, directory = found or _cached_blocks(spec, tokenizer, cache_dir, {}, build, log)
    if len(arrays["train"]) == 0:
        raise DataError(f"{spec.describe()}: the training split has fewer tokens than one block "
                        f"of {spec.block_size}")
    if len(arrays["validation"]) == 0:
        log(f"[data] warning: the validation split has fewer tokens than one block of {spec.block_size}")
    train = arrays["train"]
    validation = arrays["validation"][:spec.max_eval_samples] if spec.max_eval_samples else arrays["validation"]
    log(f"[data] {spec.describe()} | tokenizer {tokenizer.source} (vocab {tokenizer.vocab_size}) | "
        f"{len(train)} train / {len(validation)} validation blocks of {spec.block_size} | "
        f"{'cache hit' if cache_hit else 'built'}: {directory}")
    return PreparedData(tokenizer, train, validation, spec.describe(), cache_hit, directory, spec, digests)


def spec_tokenizer(spec: DataSpec) -> Tokenizer:
    """The configured tokenizer, or one DataError line naming it."""
    try:
        return load_tokenizer(spec.tokenizer_name)
    except TokenizerError as e:
        raise DataError(str(e)) from None


def _remove_dead_builds(base: str) -> None:
    """The temporary files of builds of `base` whose process died on this host: a stop during data
    preparation exits at once (run_guard), with no cleanup, and these can be as large as the data."""
    host = socket.gethostname()
    directory, name = os.path.split(base)
    for path in glob.glob(os.path.join(glob.escape(directory), f".{glob.escape(name)}.*.partial-*")):
        writer = durable.partial_writer(path)
        if writer is not None and writer[0] == host and not process_alive(writer[1]):
            os.remove(path)


@contextlib.contextmanager
def _naming_full_disk(cache: str):
    """A full disk (or quota) while the token cache is written: one line naming the cache and what to do,
    not the OS's "No space left on device" alone (a write names no file)."""
    try:
        yield
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        file = "" if e.filename is None else f" ({e.filename})"
        raise DataError(f"disk full while writing the token cache {cache}{file}: {e.strerror}; free space there "
                        "or set cache_dir to a disk with room, then run the same command") from None


def _cached_blocks(spec: DataSpec, tokenizer: Tokenizer, cache_dir: str, extra_key: dict, build, log):
    """({split: blocks}, {split: their SHA-256}, cache hit, directory): each split read from the cache,
    or made by `build(split, base, key)` first."""
    key_data = {"format": CACHE_FORMAT, "data": spec.identity(), "block_size": spec.block_size,
                "tokenizer": [tokenizer.source, tokenizer.fingerprint], **extra_key}
    key = hashlib.sha256(json.dumps(key_data, sort_keys=True, default=str).encode()).hexdigest()[:20]
    directory = os.path.join(cache_dir, "data", key)
    with _naming_full_disk(directory):
        os.makedirs(directory, exist_ok=True)
    arrays, digests, cache_hit = {}, {}, True
    for split in ("train", "validation"):
        base = os.path.join(directory, split)
        arrays[split], digests[split], hit = cached_split(
            base, key, spec.block_size, lambda: build(split, base, key), log)  # noqa: B023 (called at once)
        cache_hit = cache_hit and hit
    return arrays, digests, cache_hit, directory


def cached_split(base: str, key: str, block_size: int, build: Callable[[], None], log) -> tuple[np.ndarray, str, bool]:
    """(blocks, their SHA-256, whether the cache had them) of base.bin: read from the cache, or made by
    build() first; a damaged cache (a torn or empty file, a sidecar that does not match) is named in
    one line and rebuilt."""
    blocks, digest = open_blocks(base, key, block_size)
    if blocks is not None:
        return blocks, digest, True
    if digest != "missing":
        log(f"[data] cache {base}.bin is unusable ({digest}); rebuilding it")
    _remove_dead_builds(base)
    with _naming_full_disk(os.path.dirname(base)):
        build()
    blocks, digest = open_blocks(base, key, block_size)
    if blocks is None:
        raise DataError(f"cache {base}.bin was just written but cannot be read back: {digest}")
    return blocks, digest, False


def pretokenized_source(spec: DataSpec, train_cfg: dict, tokenizer: Tokenizer) -> str | None:
    """Where the original read its tokenized, grouped blocks (`overwrite_cache: false`): the Hub
    dataset BluebrainAI/{name}-seq{max_seq_length}-tokenized-grouped, or `dataset.pretokenized`
    (a Hub id or a local `save_to_disk` directory of the same shape); None when it does not apply."""
    if train_cfg.get("overwrite_cache") is not False or spec.source != "hf" or spec.max_train_samples:
        return None
    if spec.pretokenized:
        return spec.pretokenized
    if spec.local_paths or not spec.options.get("name"):
        return None
    seq = train_cfg.get("max_seq_length") or spec.block_size
    return f"BluebrainAI/{spec.options['name']}-seq{seq}-tokenized-grouped"


class _Unavailable(Exception):
    pass


def _pretokenized_blocks(hub: str, spec: DataSpec, tokenizer: Tokenizer, cache_dir: str, log):
    """The original's pre-tokenized blocks, cached like built ones; None (and one log line) when
    they cannot be had, so that the caller builds them from the raw text."""
    loaded = {}

    def build(split, base, key):
        if not loaded:
            loaded.update(_load_pretokenized(hub, spec))
        rows = loaded[split].select_columns(["input_ids"])

        def pieces():
            for batch in rows.iter(batch_size=ROWS_PER_BATCH):
                ids = np.asarray(batch["input_ids"], dtype=np.int64)
                if ids.ndim != 2 or ids.shape[1] != spec.block_size:
                    raise _Unavailable(f"its {split} rows are not blocks of {spec.block_size} tokens")
                if ids.size and (ids.min() < 0 or ids.max() >= tokenizer.vocab_size):
                    raise _Unavailable(f"its {split} ids are outside the tokenizer's {tokenizer.vocab_size}")
                yield ids.astype(np.int32)

        n_blocks = write_blocks(base, key, spec.block_size, pieces())
        log(f"[data] {split}: {n_blocks} blocks of {spec.block_size} read from the original's "
            f"pre-tokenized {hub} -> {base}.bin")

    try:
        return _cached_blocks(spec, tokenizer, cache_dir, {"pretokenized": hub}, build, log)
    except _Unavailable as e:
        log(f"[data] overwrite_cache false: the original's pre-tokenized blocks {hub} cannot be read ({e}); "
            "building them from the raw text instead (same tokenizer and grouping)")
        return None


def _load_pretokenized(hub: str, spec: DataSpec) -> dict:
    import datasets
    from huggingface_hub import constants

    try:
        if os.path.isdir(hub):
            ds = datasets.load_from_disk(hub)
        elif not constants.HF_HUB_OFFLINE and not hub_reachable():  # offline mode reads the HF cache
            raise _Unavailable("the Hugging Face Hub is unreachable")
        else:
            ds = datasets.load_dataset(hub, cache_dir=spec.hf_cache_dir)
    except _Unavailable:
        raise
    except Exception as e:  # a missing repo, no access, a damaged download: all mean "build it here"
        raise _Unavailable(first_line(e, with_type=True)) from None
    for split in ("train", "validation"):
        if split not in ds or "input_ids" not in ds[split].column_names:
            raise _Unavailable(f"it has no {split} split with an input_ids column")
    return {split: ds[split] for split in ("train", "validation")}


class Rows:
    """The texts of one split, read in order as lists of up to ROWS_PER_BATCH texts."""

    def __init__(self, read: Callable[[], Iterator[list[str]]], n_rows: int | None):
        self.read, self.n_rows = read, n_rows


class Corpus:
    """The source's texts, loaded on first use."""

    def __init__(self, spec: DataSpec):
        self.spec = spec
        self._splits: dict[str, Rows] | None = None

    def _data(self, split: str) -> Rows:
        if self._splits is None:
            self._splits = _load_splits(self.spec)
        return self._splits[split]

    def batches(self, split: str) -> Iterator[list[str]]:
        """Lists of texts of `split` (a split name as configured)."""
        yield from self._data(split).read()

    def num_rows(self, split: str) -> int | None:
        return self._data(split).n_rows

    def map_batches(self, split: str) -> Iterator[tuple[bool, list[str]]]:
        """(begins a new map batch, texts): the split's texts in order, cut where the original's
        `datasets.map(group_texts, batched=True, batch_size, num_proc)` began a batch."""
        rows = self._data(split)
        n = rows.n_rows
        if n is None and (self.spec.map_batch_size or (self.spec.num_proc or 1) > 1):
            n = sum(len(t) for t in rows.read())  # a source that does not know its length: count once
        starts = map_batch_starts(n or 0, self.spec.map_batch_size, self.spec.num_proc)
        cuts = iter(starts[1:] + [None])
        cut, row, new = next(cuts), 0, False
        for texts in rows.read():
            while texts:
                if row == cut:
                    cut, new = next(cuts), True
                    continue
                take = len(texts) if cut is None else min(len(texts), cut - row)
                yield new, texts[:take]
                new, row, texts = False, row + take, texts[take:]


def map_batch_starts(n_rows: int, batch_size: int | None, num_proc: int | None) -> list[int]:
    """First row of each batch that `datasets.map(batched=True, batch_size, num_proc)` hands to its
    function: num_proc contiguous shards (as `Dataset.shard(contiguous=True)`, num_proc capped at
    the row count), each batched from its own start; batch_size None: a shard is one batch."""
    shards = max(1, min(num_proc or 1, n_rows))
    div, mod = divmod(n_rows, shards)
    starts = []
    for i in range(shards):
        lo = div * i + min(i, mod)
        hi = lo + div + (1 if i < mod else 0)
        starts.extend(range(lo, hi, batch_size or max(1, hi - lo)))
    return starts or [0]


def percent_rows(n_rows: int, percentage: int, split: str = "train") -> int:
    """Rows in `split[:percentage%]`, by datasets' own rounding."""
    import datasets

    return datasets.ReadInstruction(split, to=percentage, unit="%").to_absolute({split: n_rows})[0].to


def _load_splits(spec: DataSpec) -> dict[str, Rows]:
    if spec.source == "embedded":
        train, validation = _embedded_splits()
        return {spec.train_split: _list_rows(train), spec.validation_split: _list_rows(validation)}
    if spec.source == "tfds":
        return {split: Rows(read, getattr(read, "num_rows", None)) for split, read in load_tfds(spec).items()}
    return _load_hf(spec)


def _list_rows(texts: list[str]) -> Rows:
    return Rows(lambda: (texts[i:i + ROWS_PER_BATCH] for i in range(0, len(texts), ROWS_PER_BATCH)), len(texts))


def _dataset_rows(ds, column: str, start: int, stop: int, where: str) -> Rows:
    """Rows [start, stop) of a datasets Dataset, or of an IterableDataset (streaming: read in order,
    nothing kept); each row checked to be text (rows counted in `where`, the split's files)."""
    import datasets

    ds = ds.select_columns([column])
    if isinstance(ds, datasets.Dataset):
        def read():
            for i in range(start, stop, ROWS_PER_BATCH):
                yield check_texts(ds[i:min(i + ROWS_PER_BATCH, stop)][column], where, i, column)
    else:
        def read():
            rows, i = itertools.islice(iter(ds), start, stop), start
            while True:
                with _loading(where):
                    batch = list(itertools.islice(rows, ROWS_PER_BATCH))
                if not batch:
                    return
                yield check_texts([r[column] for r in batch], where, i, column)
                i += len(batch)
    return Rows(read, stop - start)


@contextlib.contextmanager
def _loading(what: str):
    """Loading `what` with datasets, or reading its stream (which reads and decodes the files where a
    Dataset did at load): whatever datasets raises becomes one line."""
    try:
        yield
    except Exception as e:  # datasets raises many kinds; all mean the same to the user
        # DatasetGenerationError says only "An error occurred"; its cause says which.
        e = e.__cause__ or e if type(e).__name__.startswith("DatasetGeneration") else e
        raise DataError(f"cannot load {what}: {first_line(e, with_type=True)}") from e


def _num_rows(ds, what: str) -> int:
    import datasets

    if isinstance(ds, datasets.Dataset):
        return len(ds)
    known = (ds.info.splits or {}).get(str(ds.split)) if ds.split else None
    if known and known.num_examples:
        return known.num_examples
    with _loading(what):
        return sum(1 for _ in ds)


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


def _offline_message(what: str, reason: str) -> str:
    return (f"{what} {reason}; run once online, or point the file at local text: "
            "--dataset null --train_file a.txt --validation_file b.txt")


def _load_hf(spec: DataSpec) -> dict[str, Rows]:
    import datasets
    from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES
    from huggingface_hub import constants

    opts = dict(spec.options)
    path = opts.pop("path")
    what = f"dataset {path}" + (f"/{opts['name']}" if opts.get("name") else "")
    if path in _FILE_BUILDERS.values() and spec.local_paths:
        what = " and ".join(spec.local_paths)
    is_saved = os.path.isdir(path) and any(
        os.path.exists(os.path.join(path, f)) for f in ("dataset_dict.json", "state.json"))
    needs_hub = not os.path.exists(path) and path not in _PACKAGED_DATASETS_MODULES
    if needs_hub and not constants.HF_HUB_OFFLINE and not hub_reachable():
        raise DataError(_offline_message(what, "cannot be loaded: the Hugging Face Hub is unreachable "
                                               "(if it is cached, run with HF_HUB_OFFLINE=1)"))
    try:
        with _loading(what):
            if is_saved:  # memory-mapped arrow files: streaming would hold no less
                loaded = datasets.load_from_disk(path)
            else:
                loaded = datasets.load_dataset(path, cache_dir=spec.hf_cache_dir, streaming=spec.streaming, **opts)
    except DataError:
        if needs_hub and constants.HF_HUB_OFFLINE:
            raise DataError(_offline_message(what, "is not cached and HF_HUB_OFFLINE is set")) from None
        raise
    if isinstance(loaded, (datasets.Dataset, datasets.IterableDataset)):
        loaded = {spec.train_split: loaded}
    if spec.train_split not in loaded:
        raise DataError(f"{what} has no split {spec.train_split!r} (it has {', '.join(loaded)})")
    train = loaded[spec.train_split]
    columns = train.column_names or []
    column = spec.text_column or ("text" if "text" in columns or not columns else columns[0])
    if columns and column not in columns:
        raise DataError(f"{what} has no column {column!r} (it has {', '.join(columns)})")
    n = _num_rows(train, what)
    files = spec.options.get("data_files") if isinstance(spec.options.get("data_files"), dict) else {}

    def where(split):  # rows are counted in the split's files together (a CSV's header is not a row)
        paths = _data_file_paths(files.get(split))
        return ", ".join(paths) if paths else f"{what} split {split!r}"

    if spec.max_train_samples:  # the original's rule: training AND validation are train[:N]
        n = min(n, spec.max_train_samples)
        return {spec.train_split: _dataset_rows(train, column, 0, n, where(spec.train_split)),
                spec.validation_split: _dataset_rows(train, column, 0, n, where(spec.train_split))}
    if spec.validation_file or (spec.validation_split_percentage is None and spec.validation_split in loaded):
        validation = loaded[spec.validation_split]
        return {spec.train_split: _dataset_rows(train, column, 0, n, where(spec.train_split)),
                spec.validation_split: _dataset_rows(validation, column, 0, _num_rows(validation, what),
                                                     where(spec.validation_split))}
    # validation = train[:P%], training = train[P%:] (the original; run_clm's fallback with P = 5).
    n_val = percent_rows(n, spec.validation_split_percentage or 5)
    return {spec.train_split: _dataset_rows(train, column, n_val, n, where(spec.train_split)),
            spec.validation_split: _dataset_rows(train, column, 0, n_val, where(spec.train_split))}


def build_blocks(base: str, key: str, corpus: Corpus, split: str, tokenizer: Tokenizer,
                  block_size: int, log) -> None:
    """Tokenize `split` and cut each map batch's concatenated tokens into blocks, dropping each
    batch's remainder (the original's grouping); write base.bin + base.json."""
    stats = {"tokens": 0, "dropped": 0, "groups": 1}

    def pieces():
        carry = np.zeros(0, np.int32)
        with tqdm(total=corpus.num_rows(split), unit=" texts", desc=f"tokenizing {split}") as bar:
            for new_group, texts in corpus.map_batches(split):
                if new_group:
                    stats["groups"] += 1
                    stats["dropped"] += carry.size
                    carry = carry[:0]
                ids = np.fromiter(itertools.chain.from_iterable(tokenizer.encode_batch(texts)), dtype=np.int32)
                stats["tokens"] += ids.size
                tokens = np.concatenate([carry, ids])
                full = tokens.size // block_size * block_size
                carry = tokens[full:]
                bar.update(len(texts))
                yield tokens[:full]
        stats["dropped"] += carry.size

    n_blocks = write_blocks(base, key, block_size, pieces())
    log(f"[data] {split}: {stats['tokens']} tokens in {stats['groups']} map batch(es) -> {n_blocks} blocks "
        f"of {block_size} ({stats['dropped']} dropped) -> {base}.bin")


def write_blocks(base: str, key: str, block_size: int, pieces: Iterator[np.ndarray]) -> int:
    """Write the int32 token arrays (whole blocks) to base.bin and the sidecar base.json (with the
    tokens' SHA-256, the data's identity in a run's record); the number of blocks. Each file is
    written durably under a temporary name and renamed, the sidecar last: a killed run (or a power
    loss) leaves either no cache or a complete one."""
    n_tokens, digest = 0, hashlib.sha256()

    def write(f):
        nonlocal n_tokens
        for ids in pieces:
            data = np.ascontiguousarray(ids, dtype=np.int32).tobytes()
            f.write(data)
            digest.update(data)
            n_tokens += ids.size

    durable.write_file(base + ".bin", write, binary=True)
    n_blocks = n_tokens // block_size
    meta = {"key": key, "dtype": "int32", "block_size": block_size, "n_blocks": n_blocks,
            "bytes": n_blocks * block_size * 4, "sha256": digest.hexdigest()}
    durable.write_json(base + ".json", meta, indent=1)
    return n_blocks


def open_blocks(base: str, key: str, block_size: int) -> tuple[np.ndarray | None, str]:
    """(memory-mapped blocks, their SHA-256), or (None, why the cache cannot be used)."""
    if not os.path.exists(base + ".json"):
        return None, "missing"
    meta = durable.read_derived_json(base + ".json")
    if meta is None:
        return None, "its sidecar .json is damaged"
    expected = {"key": key, "dtype": "int32", "block_size": block_size}
    wrong = [k for k, v in expected.items() if meta.get(k) != v]
    if wrong:
        return None, f"sidecar field(s) {', '.join(wrong)} do not match"
    try:
        n_blocks, digest = int(meta["n_blocks"]), str(meta["sha256"])
        size = os.path.getsize(base + ".bin")
    except (OSError, ValueError, KeyError, TypeError) as e:
        return None, f"{type(e).__name__}: {e}"
    if size != n_blocks * block_size * 4 or meta.get("bytes") != size:
        return None, f"file has {size} bytes, sidecar says {n_blocks} blocks of {block_size} int32"
    if n_blocks == 0:  # np.memmap cannot map an empty file
        return np.zeros((0, block_size), np.int32), digest
    return np.memmap(base + ".bin", dtype=np.int32, mode="r", shape=(n_blocks, block_size)), digest


def tokens_identity(prepared) -> dict:
    """{split: {sha256, blocks}}: the tokens a run trains and evaluates on, kept in its run_config.json;
    the digests of the cache's sidecars (of the whole split), or, for data handed over in memory
    (train(prepared=...)), computed here. `blocks` counts those used (max_eval_samples applied)."""
    digests = getattr(prepared, "digests", None) or {}
    identity = {}
    for split in ("train", "validation"):
        blocks = getattr(prepared, split)
        blocks = np.zeros((0, 0), np.int32) if blocks is None else np.ascontiguousarray(blocks, np.int32)
        identity[split] = {"sha256": digests.get(split) or hashlib.sha256(blocks).hexdigest(), "blocks": len(blocks)}
    return identity


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


def _text_source(cfg: dict) -> tuple[dict, object, list]:
    """(dataset options as a new dict, train_file, train_files) of the config, their types checked."""
    dataset = cfg.get("dataset")
    if isinstance(dataset, str):
        dataset = {"path": dataset}
    if dataset is not None and not isinstance(dataset, dict):
        raise DataError(f"config key 'dataset' must be a name or a mapping, got {dataset!r}")
    train_file, train_files = cfg.get("train_file"), cfg.get("train_files") or []
    if isinstance(train_files, str) or not all(isinstance(f, str) for f in train_files):
        raise DataError(f"config key 'train_files' must be a list of file names, got {train_files!r}")
    if train_file and train_files:
        raise DataError("config has both 'train_file' and 'train_files'; give one")
    return dict(dataset or {}), train_file, train_files


def _local_files(train_file, validation_file, from_train_files: bool) -> tuple[dict, tuple[str, ...]]:
    """(load_dataset options, the files whose changes invalidate the cache) of local text files."""
    first = train_file if isinstance(train_file, str) else train_file[0]
    ext = os.path.splitext(first)[1].lstrip(".").lower()
    if ext not in _FILE_BUILDERS:
        raise DataError(f"train_file {first!r}: unsupported extension {ext!r}; "
                        f"expected one of {', '.join(sorted(_FILE_BUILDERS))}")
    files = {"train": train_file, **({"validation": validation_file} if validation_file else {})}
    for split, paths in files.items():
        for path in [paths] if isinstance(paths, str) else paths:
            _check_local_file("train_files" if from_train_files else f"{split}_file", path, ext)
    dataset = {"path": _FILE_BUILDERS[ext], "data_files": files}
    if dataset["path"] == "text":  # run_clm's default: text files keep their line breaks
        dataset["keep_linebreaks"] = True
    return dataset, tuple(_data_file_paths(files))


def _dataset_paths(source: str, dataset: dict) -> tuple[str, ...]:
    """The local files of a dataset source whose changes invalidate the cache."""
    if source == "hf":
        if "path" not in dataset:
            raise DataError("config key 'dataset' needs a 'path' (e.g. wikitext)")
        paths = tuple(_data_file_paths(dataset.get("data_files")))
        return paths + ((dataset["path"],) if os.path.exists(dataset["path"]) else ())
    if source == "tfds":
        if "name" not in dataset:
            raise DataError("config key 'dataset' with source tfds needs a 'name'")
        # The named dataset's own files (every version, config and split under data_dir/<name>),
        # not the whole data_dir: a shared TFDS directory holds other datasets too.
        if dataset.get("data_dir"):
            return (os.path.join(dataset["data_dir"], dataset["name"].split(":")[0].split("/")[0]),)
    return ()


def _check_numbers(cfg: dict, num_proc, source: str) -> int | None:
    """Checks the counts and sizes of the data keys; returns validation_split_percentage as an int."""
    for key, n in (("block_size", cfg.get("block_size")), ("max_seq_length", cfg.get("max_seq_length")),
                   ("batch_size", cfg.get("batch_size")),
                   ("dataset.num_proc", num_proc), ("max_train_samples", cfg.get("max_train_samples")),
                   ("max_eval_samples", cfg.get("max_eval_samples"))):
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n <= 0):
            raise DataError(f"config key '{key}' must be a positive integer, got {n!r}")
    percentage = cfg.get("validation_split_percentage")
    if percentage is not None:  # the original's files give it as a string, "1"
        try:
            percentage = int(percentage)
        except (TypeError, ValueError, OverflowError):  # OverflowError: Infinity
            percentage = None
        if percentage is None or not 0 < percentage < 100:
            raise DataError("config key 'validation_split_percentage' must be a whole number "
                            f"from 1 to 99, got {cfg.get('validation_split_percentage')!r}")
    if source == "embedded":
        # The embedded corpus has its own fixed split; these keys would otherwise be silently dropped.
        for key in ("max_train_samples", "validation_split_percentage"):
            if cfg.get(key) is not None:
                raise DataError(f"config key '{key}' applies to a dataset or train_file, not to the "
                                f"embedded corpus; give a data source or remove it (--{key} null)")
    return percentage


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
    # The layout is the variant's own (its spec's batch); run it on the host CPU so
    # data preparation never touches (or waits for) the accelerator.
    with jax.default_device(_host_device()):
        inputs, targets = variant_of(model_cfg).batch(rows, model_cfg)
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
