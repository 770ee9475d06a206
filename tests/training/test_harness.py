"""lm-evaluation-harness on the JAX model (training/harness.py, eval_jax.py --tasks, eval_harness_tasks):
on local tasks of all three request kinds, every variant's results equal lm-eval's own `hf` model on the
variant's HF export; the command's errors; a training run logging eval/<task>/<metric>. Offline."""
import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest

pytest.importorskip("lm_eval")

from flax_gpt2v.data.tokenizer import load_tokenizer  # noqa: E402
from flax_gpt2v.hf import checkpoint  # noqa: E402
from flax_gpt2v.training import harness  # noqa: E402

from helpers import (ROOT, read_metrics, shaped_random_lm, simulated_devices_env, tiny_config,
                     write_small_tokenizer)  # noqa: E402

# lm-eval and datasets must never reach for the network: the tasks are local files.
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
# Chosen once: lm-eval's `hf` model (torch) and ours (JAX) sum the same log-probabilities in float32.
NATS = 1e-3
# The models' positions: every request then fits the harness's smallest bucket (harness.MIN_BUCKET), so a
# variant compiles one scoring shape and one decoder; texts longer than that span several rolling windows
# and generation prompts are left-truncated, both as lm-eval's own model does.
POSITIONS = 16

ANIMALS = ["fox", "dog", "cat", "owl", "bee", "cow"]
TEXT = "".join(f"The {a} {v} the {b} at dawn. Q: who {v}? A: the {a}.\n"
               for i, (a, b, v) in enumerate((ANIMALS[i % 6], ANIMALS[(i + 2) % 6], ["sees", "naps by", "jumps over"][i % 3])
                                             for i in range(60)))
# A task of each request kind: multiple choice (loglikelihood), perplexity (loglikelihood_rolling) and
# generation (generate_until with stop strings), as lm-eval reads a task: dataset_path json + data_files.
TASKS = {
    "tiny_mc": ("""output_type: multiple_choice
test_split: test
doc_to_text: "The {{a}} {{v}} the"
doc_to_choice: "{{choices}}"
doc_to_target: "{{label}}"
metric_list:
  - {metric: acc, aggregation: mean, higher_is_better: true}
  - {metric: acc_norm, aggregation: mean, higher_is_better: true}
""", [{"a": a, "v": v, "choices": [f" {c}" for c in ANIMALS[:4]], "label": i % 4}
      for i, (a, v) in enumerate((ANIMALS[i % 6], ["sees", "naps by"][i % 2]) for i in range(6))]),
    "tiny_ppl": ("""output_type: loglikelihood_rolling
test_split: test
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - {metric: word_perplexity, aggregation: weighted_perplexity, higher_is_better: false}
  - {metric: byte_perplexity, aggregation: weighted_perplexity, higher_is_better: false}
  - {metric: bits_per_byte, aggregation: bits_per_byte, higher_is_better: false}
""", [{"text": line} for line in TEXT.splitlines()[:4]] + [{"text": TEXT[:400]}]),  # the last: several windows
    "tiny_gen": ("""output_type: generate_until
test_split: test
doc_to_text: "Q: who {{v}}? A:"
doc_to_target: " the {{a}}"
generation_kwargs:
  until: [".", "?"]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - {metric: exact_match, aggregation: mean, higher_is_better: true}
""", [{"a": a, "v": v} for a, v in zip(ANIMALS, ["sees", "naps by", "jumps over", "sees the cow", "naps", "x"])]),
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("harness")
    write_small_tokenizer(root / "tok0", TEXT.splitlines(keepends=True))
    tok = load_tokenizer(str(root / "tok0"))
    tok.save(str(root / "tok"), model_max_length=POSITIONS)
    tasks = root / "tasks"
    tasks.mkdir()
    for name, (yaml, rows) in TASKS.items():
        data = tasks / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        (tasks / f"{name}.yaml").write_text(f"task: {name}\ndataset_path: json\n"
                                             f"dataset_kwargs:\n  data_files:\n    test: {data}\n" + yaml)
    return types.SimpleNamespace(root=root, tok=tok, tasks=str(tasks))


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    for k, v in OFFLINE.items():
        monkeypatch.setenv(k, v)


def _samples(output_path) -> dict:
    """{task: [sample, ...] by doc_id} from the samples files lm-eval's EvaluationTracker wrote."""
    out = {}
    for directory, _, files in os.walk(output_path):
        for name in files:
            if name.startswith("samples_"):
                task = name[len("samples_"):].rsplit("_", 1)[0]
                with open(os.path.join(directory, name)) as f:
                    out[task] = sorted((json.loads(line) for line in f), key=lambda s: s["doc_id"])
    return out


def _same_responses(ours, theirs):
    """Numbers (log-likelihoods) within NATS; flags and generated text exactly."""
    if isinstance(ours, (list, tuple)):  # JSON lists on our side, tuples in lm-eval's results
        assert isinstance(theirs, (list, tuple)) and len(ours) == len(theirs)
        for a, b in zip(ours, theirs):
            _same_responses(a, b)
    elif isinstance(theirs, (bool, str)):
        assert str(ours) == str(theirs)  # the samples file holds lm-eval's str() of each response
    else:
        assert abs(float(ours) - float(theirs)) <= NATS, (ours, theirs)


@pytest.mark.parametrize("variant", ["gpt2", "dd-both", "parallel-concat", "duo-predict", "rotating-lr-norm"])
def test_results_equal_lm_eval_hf_model_on_the_export(setup, variant, tmp_path):
    """eval_jax.py --tasks on a native checkpoint = lm-eval's `hf` model (trust_remote_code) on its HF
    export: each log-likelihood within NATS, the same greedy flags and generations, the same metrics."""
    from lm_eval import evaluator
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    import eval_jax

    tok = setup.tok
    extra = {"mask_token_id": tok.mask_token_id} if variant == "duo-predict" else {}
    lm = shaped_random_lm(variant, seed=1, vocab_size=tok.vocab_size, n_positions=POSITIONS,
                          eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id, **extra)
    lm.tokenizer_dir = str(setup.root / "tok")
    native, hf, out = tmp_path / "native", tmp_path / "hf", tmp_path / "results"
    lm.save(native)
    checkpoint.export_hf(native, hf)

    argv = ["--checkpoint", str(native), "--tasks", ",".join(TASKS), "--include_path", setup.tasks,
            "--batch_size", "4", "--output_path", str(out), "--log_samples", "--no_progress"]
    if variant == "duo-predict":
        # One variant as a real process on 2 devices: each batch of 4 requests split over both.
        p = subprocess.run([sys.executable, os.path.join(ROOT, "eval_jax.py"), *argv], capture_output=True, text=True,
                           cwd=ROOT, env=simulated_devices_env(2, **OFFLINE))
        assert p.returncode == 0, p.stderr
        assert "tiny_mc" in p.stdout and "acc_norm" in p.stdout  # lm-eval's table
    else:
        assert eval_jax.main(argv) == 0
    ours = _samples(out)
    [results_file] = [os.path.join(d, f) for d, _, fs in os.walk(out) for f in fs if f.startswith("results_")]
    with open(results_file) as f:
        ours_results = json.load(f)["results"]

    reference = HFLM(pretrained=str(hf), trust_remote_code=True, batch_size=1, device="cpu")
    theirs = evaluator.simple_evaluate(model=reference, tasks=list(TASKS), log_samples=True,
                                       task_manager=TaskManager(include_path=setup.tasks, include_defaults=False))
    assert set(ours) == set(TASKS)
    # The generations compared below are text, not empty strings cut at once by a stop string.
    assert sum(bool(s["resps"][0][0].strip()) for s in ours["tiny_gen"]) >= 3
    for task in TASKS:
        their_samples = sorted(theirs["samples"][task], key=lambda s: s["doc_id"])
        assert len(ours[task]) == len(their_samples) == len(TASKS[task][1])
        for a, b in zip(ours[task], their_samples):
            _same_responses(a["resps"], b["resps"])
        for key, value in theirs["results"][task].items():
            if isinstance(value, float) and "stderr" not in key:
                assert ours_results[task][key] == pytest.approx(value, rel=1e-3), (task, key)


def test_errors_are_one_line(setup, tmp_path):
    """A task the harness does not know, and lm-eval not installed: one `error:` line, exit status 2."""
    lm = shaped_random_lm("gpt2", vocab_size=setup.tok.vocab_size, n_positions=POSITIONS)
    lm.tokenizer_dir = str(setup.root / "tok")
    lm.save(tmp_path / "native")
    argv = ["--checkpoint", str(tmp_path / "native"), "--tasks", "tiny_mc,no_such_task_anywhere"]
    without_lm_eval = "import sys; sys.modules['lm_eval'] = None; import eval_jax; sys.exit(eval_jax.main(sys.argv[1:]))"
    for command, message in (([os.path.join(ROOT, "eval_jax.py"), *argv, "--include_path", setup.tasks],
                              "unknown task 'no_such_task_anywhere'"),
                             (["-c", without_lm_eval, *argv], "pip install '.[eval]'")):
        p = subprocess.run([sys.executable, *command], capture_output=True, text=True, cwd=ROOT,
                           env={**os.environ, **OFFLINE})
        assert p.returncode == 2, p.stderr
        last = p.stderr.strip().splitlines()[-1]
        assert last.startswith("error: ") and message in last, p.stderr


def test_metric_record_and_tags():
    from flax_gpt2v.training.reporting import hf_tags

    results = {"results": {"lambada_openai": {"alias": "lambada_openai", "acc,none": 0.5, "acc_stderr,none": 0.1,
                                              "perplexity,none": 12.0},
                           "gsm8k": {"exact_match,strict-match": 0.25, "exact_match_stderr,strict-match": "N/A"}}}
    record = harness.metric_record(results)
    assert record == {"eval/lambada_openai/acc": 0.5, "eval/lambada_openai/perplexity": 12.0,
                      "eval/gsm8k/exact_match/strict-match": 0.25}
    assert hf_tags({"step": 3, "eval_loss": 2.0, **record}) == {"eval/loss": 2.0, **record}


def test_bucket_and_cut():
    assert [harness.bucket(n, 64) for n in (1, 16, 17, 33, 64)] == [16, 16, 32, 64, 64]
    assert harness.bucket(40, 48) == 48
    assert harness.cut_generation([5, 6, 0, 7], {0}) == [5, 6] and harness.cut_generation([5, 6], {0}) == [5, 6]


def test_training_logs_harness_metrics(setup, tmp_path):
    """eval_harness_tasks (task YAML files here) at each evaluation: eval/<task>/<metric> in metrics.jsonl."""
    from flax_gpt2v.training import trainer

    ids = np.asarray(setup.tok.encode(TEXT), np.int32)
    blocks = ids[: len(ids) // 32 * 32].reshape(-1, 32)
    prepared = types.SimpleNamespace(tokenizer=setup.tok, train=blocks[:-4], validation=blocks[-4:],
                                     source="harness test text")
    out = tmp_path / "run"
    trainer.train(tiny_config("gpt2", out, max_steps=2, warmup_steps=1, eval_steps=2, save_steps=2, logging_steps=2,
                              per_device_train_batch_size=4, eval_harness_tasks=[os.path.join(setup.tasks, "tiny_mc.yaml")],
                              eval_harness_limit=2), prepared=prepared, log=print)
    [record] = [r for r in read_metrics(out) if "eval_loss" in r]
    assert record["step"] == 2 and 0.0 <= record["eval/tiny_mc/acc"] <= 1.0
