"""benchmark.py runs end to end on a tiny model and records every figure (no timing assertions)."""
import json
import math

import pytest

from flax_gpt2v.evaluation.benchmark import main

SIDE_FIELDS = ("device", "first_step_s", "train_tokens_per_s", "train_rounds_tokens_per_s", "peak_flops", "mfu",
               "peak_memory_bytes", "peak_memory_source", "forward_tokens_per_s", "forward_rounds_tokens_per_s",
               "loss_first", "loss_last")
TINY = ["--size", "tiny", "--seq", "32", "--batch", "2", "--steps", "1", "--rounds", "1", "--warmup", "0",
        "--dtype", "fp32"]


def positive(x):
    return isinstance(x, float) and math.isfinite(x) and x > 0


def test_benchmark_records_every_figure(tmp_path, capsys):
    output = tmp_path / "bench.json"
    profile = tmp_path / "profile"
    assert main(["--config", "duo-predict", "configs/parallel-mean.json", *TINY, "--output", str(output),
                 "--profile", str(profile)]) == 0
    report = json.loads(output.read_text())
    assert report["command"].startswith("python benchmark.py --config duo-predict")
    assert {"jax", "torch", "transformers", "jax_device", "torch_device"} <= report["environment"].keys()
    assert report["date"] and report["settings"]["seq"] == 32
    duo, parallel = report["results"]
    assert (duo["variant"], parallel["variant"]) == ("duo-predict", "parallel-mean")
    # duo-predict: 16 text tokens per sequence, interleaved to 31 inputs.
    assert duo["input_length"] == 31 and duo["tokens_per_step"] == 62 and duo["text_tokens_per_step"] == 32
    assert parallel["input_length"] == 32 and parallel["tokens_per_step"] == 64
    for result in report["results"]:
        assert result["num_params"] > 0 and result["flops_per_token"] > 0
        assert result["jax"]["compile_s"] > 0 and result["jax"]["forward_compile_s"] > 0
        assert result["torch"]["attn_implementation"] == "sdpa" and result["torch"]["gradient_checkpointing"]
        # The second torch side: transformers' own GPT-2 of the same sizes, at its best.
        hf = result["hf"]
        assert hf["model"] == "transformers.models.gpt2.modeling_gpt2.GPT2LMHeadModel"
        assert hf["attn_implementation"] == "sdpa" and not hf["gradient_checkpointing"]
        # The configs' attention dropout 0.1 keeps JAX training on the explicit path; it is said so.
        assert (result["jax"]["attention"], result["jax"]["train_attention"]) == ("xla", "explicit")
        for side in ("jax", "torch", "hf"):
            figures = result[side]
            assert set(SIDE_FIELDS) <= figures.keys()
            for key in ("first_step_s", "train_tokens_per_s", "forward_tokens_per_s", "loss_first", "loss_last"):
                assert positive(figures[key]), (side, key, figures[key])
            rounds = figures["train_rounds_tokens_per_s"] + figures["forward_rounds_tokens_per_s"]
            assert rounds and all(positive(x) for x in rounds)
            top = figures["profile"]["top_ops"]
            assert top and all(positive(o["ms_per_step"]) and 0 < o["share"] <= 1 for o in top)
            assert [o["share"] for o in top] == sorted((o["share"] for o in top), reverse=True)
            assert any((profile / result["variant"] / side).rglob("*.json*"))
        # JAX top ops are traced back to the JAX ops they came from (XLA's own copies have none).
        top = result["jax"]["profile"]["top_ops"]
        assert sum(bool(o["source"]) for o in top) > len(top) // 2
        assert all(positive(result[r][k]) for r in ("ratio", "ratio_hf") for k in ("train", "forward"))
        # Same model, same batch, same targets: both start near ln(vocab).
        assert abs(result["jax"]["loss_first"] - result["torch"]["loss_first"]) < 0.5
        assert abs(result["jax"]["loss_first"] - result["hf"]["loss_first"]) < 0.5
    table = capsys.readouterr().out
    assert "| variant | tokens/s JAX | tokens/s torch | JAX/torch | tokens/s HF | JAX/HF |" in table
    assert "| duo-predict * |" in table
    assert "JAX trains with explicit attention at attn_pdrop 0.1" in table
    assert all(f"parallel-mean, {side}: top ops by self time" in table for side in ("jax", "torch", "hf"))


@pytest.mark.parametrize("args, message", [
    (["--config", "no-such-variant"], "config 'no-such-variant' not found"),
    (["--config", "dd-both", "--seq", "2048"], "--seq 2048 is longer than the 1024 positions of dd-both"),
    (["--config", "duo-predict", "--seq", "2048"], "1024 text tokens, more than the 512 positions"),
    (["--config", "parallel-mean", "--layers", "3"], "parallel-gpt2 needs an even number of layers, got 3"),
    (["--config", "dd-both", "--attn-pdrop", "1.5"], "config key 'attn_pdrop': dropout must be in [0, 1), got 1.5"),
])
def test_bad_input_is_one_line_error(args, message, capsys, tmp_path):
    assert main([*args, "--output", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "x.json").exists()
