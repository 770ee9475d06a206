"""Tokenizer for training: the GPT-2 tokenizer plus <|MASK|>, or a byte-level BPE
trained on the training text when GPT-2's cannot be had offline.

Both are wrapped in `Tokenizer`, which saves standard Hugging Face tokenizer
files so that `transformers.AutoTokenizer.from_pretrained(dir)` loads them.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import socket
import tempfile
import urllib.parse
from typing import Callable, Iterable

from flax_gpt2v.config import MASK_TOKEN

EOS_TOKEN = "<|endoftext|>"
# Bump when the BPE recipe below changes, so old cached tokenizers are not reused.
BPE_RECIPE = 1


class Tokenizer:
    """A Hugging Face fast tokenizer with the few things training needs."""

    def __init__(self, hf, source: str, cache_hit: bool = False):
        self.hf = hf
        self.source = source
        self.cache_hit = cache_hit
        self.vocab_size = len(hf)
        self.mask_token_id = hf.convert_tokens_to_ids(MASK_TOKEN)
        self.eos_token_id = hf.convert_tokens_to_ids(EOS_TOKEN)
        # Identity of the exact vocabulary and rules, for cache keys of tokenized data.
        self.fingerprint = hashlib.sha256(hf.backend_tokenizer.to_str().encode()).hexdigest()[:16]

    def encode(self, text: str) -> list[int]:
        return self.hf.backend_tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.backend_tokenizer.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self.hf.decode(list(ids))

    def save(self, directory: str) -> None:
        self.hf.save_pretrained(directory)
        # Newer transformers fold this file into tokenizer_config.json; older
        # loaders (and people) still look for it.
        path = os.path.join(directory, "special_tokens_map.json")
        if not os.path.exists(path):
            specials = {"bos_token": EOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN,
                        "mask_token": MASK_TOKEN}
            with open(path, "w") as f:
                json.dump(specials, f, indent=2)

    def __repr__(self) -> str:
        return f"Tokenizer(source={self.source!r}, vocab_size={self.vocab_size}, mask_token_id={self.mask_token_id})"


@functools.lru_cache(maxsize=None)
def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face Hub answers at all. Checked once, because the Hub
    clients retry a dead network for tens of seconds per file."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    host = urllib.parse.urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def load_tokenizer(name_or_path: str | None, train_texts: Iterable[str] | None, cache_dir: str,
                   vocab_size: int = 8192, *, corpus: str = "text",
                   log: Callable[[str], None] = print) -> Tokenizer:
    """The pretrained tokenizer `name_or_path` (+ <|MASK|>) if it can be loaded,
    else a byte-level BPE of `vocab_size` tokens trained on `train_texts`.

    `name_or_path=None` asks for the BPE directly. `corpus` names the training
    text in the BPE's `source` ("bpe-trained-on-<corpus>").
    """
    if name_or_path is not None:
        hf, why = _load_pretrained(name_or_path, cache_dir)
        if hf is not None:
            return Tokenizer(hf, source=name_or_path)
        if train_texts is None:
            raise RuntimeError(f"cannot load tokenizer {name_or_path!r} ({why}) and no training text "
                               "was given to train a replacement")
        log(f"[tokenizer] {name_or_path!r} is not available offline ({why}); using a byte-level "
            f"BPE tokenizer (vocab {vocab_size}) trained on the {corpus} training text instead. "
            "Perplexities are not comparable with GPT-2's.")
    elif train_texts is None:
        raise ValueError("load_tokenizer needs a tokenizer name or training text")
    return _bpe_tokenizer(list(train_texts), cache_dir, vocab_size, corpus, log)


def _load_pretrained(name: str, cache_dir: str):
    """(tokenizer with <|MASK|> added, None) or (None, reason it failed)."""
    from transformers import AutoTokenizer

    try:
        hf = AutoTokenizer.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError) as local_error:
        if os.path.isdir(name):
            return None, f"{type(local_error).__name__}: {local_error}"
        if not hub_reachable():
            return None, "not in the local Hugging Face cache and the Hub cannot be reached"
        try:
            hf = AutoTokenizer.from_pretrained(name)
        except (OSError, ValueError) as e:
            return None, f"{type(e).__name__}: {str(e).splitlines()[0]}"
    if not hf.is_fast:
        return None, "only fast (tokenizers-backed) tokenizers are supported"
    if MASK_TOKEN not in hf.get_vocab():
        hf.add_special_tokens({"mask_token": MASK_TOKEN})
    elif hf.mask_token is None:
        hf.mask_token = MASK_TOKEN
    return hf, None


def _bpe_tokenizer(texts: list[str], cache_dir: str, vocab_size: int, corpus: str, log) -> Tokenizer:
    from transformers import AutoTokenizer

    digest = hashlib.sha256(json.dumps([BPE_RECIPE, vocab_size]).encode())
    for text in texts:
        digest.update(text.encode())
        digest.update(b"\0")  # so that ["ab", "c"] and ["a", "bc"] differ
    directory = os.path.join(cache_dir, "tokenizers", f"bpe-{vocab_size}-{digest.hexdigest()[:16]}")
    source = f"bpe-trained-on-{corpus}"
    if os.path.exists(os.path.join(directory, "tokenizer.json")):
        log(f"[tokenizer] loaded cached BPE tokenizer from {directory}")
        return Tokenizer(AutoTokenizer.from_pretrained(directory), source, cache_hit=True)

    tokenizer = Tokenizer(_train_bpe(texts, vocab_size), source)
    # Save into a temp dir and rename, so a killed run never leaves half a tokenizer.
    os.makedirs(os.path.dirname(directory), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=os.path.dirname(directory))
    tokenizer.save(tmp)
    try:
        os.rename(tmp, directory)
    except OSError:  # another process finished the same tokenizer first
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"[tokenizer] trained BPE tokenizer ({tokenizer.vocab_size} tokens) on {len(texts)} texts; "
        f"cached in {directory}")
    return tokenizer


def _train_bpe(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer as RawTokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    raw = RawTokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.post_processor = processors.ByteLevel(trim_offsets=False)
    # The specials are added after training so that, as in GPT-2 + <|MASK|>, they
    # are the last two ids: eos = V-2, mask = V-1 (the config's default mask id).
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    raw.train_from_iterator(texts, trainer)
    raw.add_special_tokens([EOS_TOKEN, MASK_TOKEN])
    return PreTrainedTokenizerFast(tokenizer_object=raw, bos_token=EOS_TOKEN, eos_token=EOS_TOKEN,
                                   unk_token=EOS_TOKEN, mask_token=MASK_TOKEN,
                                   model_max_length=1024)
