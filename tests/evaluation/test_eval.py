"""eval_jax.py: perplexity equal to transformers' on a converted model, --compare, --output, duo, errors."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

import flax_gpt2v as fg
from flax_gpt2v.hf import checkpoint
from flax_gpt2v.data.tokenizer import load_tokenizer

from helpers import ROOT, off_default, perturbed_lm, small_config, write_small_tokenizer

sys.path.insert(0, ROOT)
import eval_jax  # noqa: E402
from flax_gpt2v.evaluation import evaluate as ev  # noqa: E402

TEXT = "".join(f"Line {i}: the quick brown fox {'jumps over' if i % 3 else 'naps by'} the lazy dog {i * 7}.\n"
               for i in range(120))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    write_small_tokenizer(root / "tok0", TEXT.splitlines(keepends=True))
    tok = load_tokenizer(str(root / "tok0"))
    tok_dir = root / "tok"
    tok.save(str(tok_dir), model_max_length=1024)
    text_file = root / "val.txt"
    text_file.write_text(TEXT)

    def make(variant, name, **extra):
        if variant == "duo-predict":
            extra["mask_token_id"] = tok.mask_token_id
        lm = perturbed_lm(variant, seed=1, scale=0.1, vocab_size=tok.vocab_size, n_positions=64, **extra)
        lm.tokenizer_dir = str(tok_dir)
        lm.save(str(root / name))
        return str(root / name)

    # Compared with transformers below: every field that reaches both sides off its default.
    native = make("rotating-gp", "native", **off_default("rotating-gp"))
    hf = str(root / "hf")
    checkpoint.export_hf(native, hf)
    duo = make("duo-predict", "duo")
    return dict(root=root, tok=tok, text=str(text_file), native=native, hf=hf, duo=duo)


def run(*argv):
    assert eval_jax.main(list(argv)) == 0


def test_perplexity_matches_transformers(setup, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "eval.json"
    run("--hf", setup["hf"], "--validation_file", setup["text"], "--block_size", "32", "--batch_size", "4",
        "--cache_dir", str(tmp_path / "cache"), "--output", str(out), "--no_progress")
    res = json.loads(out.read_text())
    assert {"loss", "perplexity", "accuracy", "tokens"} <= set(res)

    # Independently: the same text, tokenized line by line (as run_clm does), cut into blocks of 32.
    tok = AutoTokenizer.from_pretrained(setup["hf"])
    ids = [i for line in TEXT.splitlines(keepends=True) for i in tok(line, add_special_tokens=False).input_ids]
    blocks = torch.tensor(np.asarray(ids[:len(ids) // 32 * 32]).reshape(-1, 32))
    model = AutoModelForCausalLM.from_pretrained(setup["hf"], trust_remote_code=True).eval()
    with torch.no_grad():
        loss = model(input_ids=blocks, labels=blocks).loss.item()  # mean over every block's 31 targets
    assert res["tokens"] == blocks.shape[0] * 31
    assert res["perplexity"] == pytest.approx(math.exp(loss), rel=1e-3)
    assert 0.0 <= res["accuracy"] <= 1.0

    # The native checkpoint gives the same numbers.
    out2 = tmp_path / "eval2.json"
    run("--checkpoint", setup["native"], "--validation_file", setup["text"], "--block_size", "32",
        "--cache_dir", str(tmp_path / "cache"), "--output", str(out2), "--no_progress")
    assert json.loads(out2.read_text())["perplexity"] == pytest.approx(res["perplexity"], rel=1e-5)


def test_duo_fill_in_metrics(setup, tmp_path):
    out = tmp_path / "duo.json"
    run("--checkpoint", setup["duo"], "--validation_file", setup["text"], "--block_size", "16",
        "--duo_loss", "original", "--cache_dir", str(tmp_path / "cache"), "--output", str(out), "--no_progress")
    res = json.loads(out.read_text())
    for prefix in ("", "fill_", "dual_", "original_"):
        for key in ("loss", "perplexity", "accuracy", "tokens"):
            assert f"{prefix}{key}" in res, f"{prefix}{key}"
    assert res["tokens"] == res["fill_tokens"] and res["dual_tokens"] == 2 * res["tokens"]
    assert res["dual_loss"] == pytest.approx((res["loss"] + res["fill_loss"]) / 2, rel=1e-5)


def _write_run(d, name, losses, tps=None):
    os.makedirs(d)
    with open(os.path.join(d, "run_config.json"), "w") as f:
        json.dump({"model": small_config("gpt2"), "train": {"run_name": name}}, f)
    with open(os.path.join(d, "metrics.jsonl"), "w") as f:
        for i, loss in enumerate(losses, 1):
            f.write(json.dumps({"step": 10 * i, "loss": loss + 0.1}) + "\n")
            f.write(json.dumps({"step": 10 * i, "eval_loss": loss, "eval_perplexity": math.exp(loss),
                                "eval_accuracy": 0.1 * i}) + "\n")
    if tps:  # the trainer's summary.json, written at the end of a run
        with open(os.path.join(d, "summary.json"), "w") as f:
            json.dump({"tokens_per_s": tps}, f)


def test_compare(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    _write_run(a, "run-a", [5.0, 4.0, 4.5], tps=1234.0)
    _write_run(b, "run-b", [6.0, 5.5])
    md, plots = tmp_path / "cmp.md", tmp_path / "plots"
    run("--compare", a, b, "--output", str(md), "--plot_dir", str(plots))
    table = md.read_text()
    assert "| run-a |" in table and "| run-b |" in table
    assert "4.0000 (20)" in table and "4.5000" in table and "1234" in table
    params = sum(int(np.prod(x.shape)) for x in __import__("jax").tree.leaves(fg.init(small_config("gpt2")).params))
    assert f"{params / 1e6:.2f}M" in table
    for name in ("eval_perplexity.png", "eval_accuracy.png"):
        with open(plots / name, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("data, text", [
    ({"dataset": {"path": "wikitext", "name": "wikitext-103-raw-v1"}, "validation_split_percentage": "1"},
     "wikitext-103-raw-v1 (train[1%:])"),
    ({"dataset": {"path": "wikitext", "name": "wikitext-103-raw-v1"}, "validation_split_percentage": "1",
      "max_train_samples": 1000}, "wikitext-103-raw-v1 (train[:1000])"),
    ({"dataset": "roneneldan/TinyStories"}, "roneneldan/TinyStories"),
    ({"dataset": {"source": "tfds", "name": "lm1b"}}, "tfds: lm1b"),
    ({"dataset": {"path": "text", "data_files": {"train": "/d/x.txt"}}}, "local: x.txt"),
    ({"train_file": "/data/a.txt", "validation_split_percentage": 5}, "local: a.txt (train[5%:])"),
    ({"train_file": "a.txt", "validation_file": "/v/b.txt"}, "local: a.txt, validation b.txt"),
    ({"train_files": ["a.txt", "sub/c.txt"], "validation_split_percentage": "1"}, "local: a.txt, c.txt (train[1%:])"),
    ({}, "embedded: CPython documentation"),
    (None, None),
])
def test_describe_data(data, text):
    assert ev.describe_data(data) == text


def test_compare_names_variant_and_data_in_table_and_plots(tmp_path, monkeypatch):
    import matplotlib.figure
    import helpers as t
    from flax_gpt2v.training import trainer as tr

    runs = {"wiki-dd": ("dd-gpt2", dict(apply_diffusion=False, dataset={"path": "wikitext", "name": "wikitext-103-raw-v1"},
                                        validation_split_percentage="1")),
            "local-gpt2": ("gpt2", dict(train_file=str(tmp_path / "a.txt")))}
    dirs = []
    for name, (model_type, extra) in runs.items():
        dirs.append(str(tmp_path / name))
        tr.train(t.tiny_config(model_type, dirs[-1], run_name=name, max_steps=4, eval_steps=2, save_steps=4, **extra),
                 prepared=t.corpus(), log=lambda m: None)
    figures = []
    savefig = matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                        lambda fig, *a, **k: (figures.append(fig), savefig(fig, *a, **k))[1])
    md, plots = tmp_path / "cmp.md", tmp_path / "plots"
    run("--compare", *dirs, "--output", str(md), "--plot_dir", str(plots))
    table = md.read_text()
    assert table.splitlines()[0].startswith("| run | model_type | data | params |")
    assert "| wiki-dd | dd-gpt2 (apply_diffusion=False) | wikitext-103-raw-v1 (train[1%:]) |" in table
    assert "| local-gpt2 | gpt2 | local: a.txt |" in table
    assert len(figures) == 2
    for fig, name, what in zip(figures, ("eval_perplexity.png", "eval_accuracy.png"), ("perplexity", "accuracy")):
        with open(plots / name, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        ax = fig.axes[0]
        assert what in ax.get_title() and "different data" in ax.get_title()
        assert [text.get_text() for text in ax.get_legend().get_texts()] == [
            "wiki-dd | dd-gpt2 (apply_diffusion=False) | wikitext-103-raw-v1 (train[1%:])",
            "local-gpt2 | gpt2 | local: a.txt"]


@pytest.mark.parametrize("argv, message", [
    (["--checkpoint", "/no/such/dir"], "no such directory"),
    (["--compare", "/"], "no metrics.jsonl"),
])
def test_errors(argv, message, capsys):
    assert eval_jax.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


def test_errors_cli(setup):
    # A real process: a directory that is not a checkpoint, and a block longer than the model's positions.
    for argv, message in ((["--checkpoint", setup["hf"]], "not a flax-gpt2v checkpoint"),
                          (["--checkpoint", setup["native"], "--validation_file", setup["text"],
                            "--block_size", "65"], "sequence too long")):
        p = subprocess.run([sys.executable, os.path.join(ROOT, "eval_jax.py"), *argv], capture_output=True,
                           text=True, cwd=ROOT)
        assert p.returncode == 2
        assert p.stderr.strip().splitlines()[-1].startswith("error: ") and message in p.stderr


def test_evaluation_does_not_import_the_trainer():
    # eval_jax.py and benchmark.py run the trainer's steps (training.steps), never its loop.
    script = ("import sys, eval_jax, benchmark, flax_gpt2v.evaluation.evaluate, flax_gpt2v.evaluation.benchmark; "
              "print(sorted(m for m in sys.modules if m == 'flax_gpt2v.training.trainer'))")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stderr
