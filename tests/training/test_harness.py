"""lm-evaluation-harness on the JAX model (training/harness.py, eval_jax.py --tasks, eval_harness_tasks):
on local tasks of all three request kinds, every variant's results equal lm-eval's own `hf` model on the
variant's HF export; the command's errors; a training run logging eval/<task>/<metric>. Offline."""
import json
import os
import subprocess
import sys
import time
import types

import numpy as np
import pytest

pytest.importorskip("lm_eval")

from flax_gpt2v.data.tokenizer import load_tokenizer  # noqa: E402
from flax_gpt2v.hf import checkpoint  # noqa: E402
from flax_gpt2v.training import harness  # noqa: E402

from helpers import ROOT, TINY, perturbed_lm, read_metrics, tiny_config, write_small_tokenizer  # noqa: E402

# lm-eval and datasets must never reach for the network: the tasks are local files.
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
# Chosen once: lm-eval's `hf` model (torch) and ours (JAX) sum the same log-probabilities in float32.
NATS = 1e-3

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
    tok.save(str(root / "tok"), model_max_length=64)
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
    lm = perturbed_lm(variant, seed=1, vocab_size=tok.vocab_size, n_positions=64, eos_token_id=tok.eos_token_id,
                      bos_token_id=tok.eos_token_id, **extra)
    lm.tokenizer_dir = str(setup.root / "tok")
    native, hf, out = tmp_path / "native", tmp_path / "hf", tmp_path / "results"
    lm.save(native)
    checkpoint.export_hf(native, hf)

    start = time.perf_counter()
    assert eval_jax.main(["--checkpoint", str(native), "--tasks", ",".join(TASKS), "--include_path", setup.tasks,
                          "--batch_size", "4", "--output_path", str(out), "--log_samples", "--no_progress"]) == 0
    print(f"{variant}: JAX harness {time.perf_counter() - start:.1f} s")
    ours = _samples(out)
    [results_file] = [os.path.join(d, f) for d, _, fs in os.walk(out) for f in fs if f.startswith("results_")]
    with open(results_file) as f:
        ours_results = json.load(f)["results"]

    reference = HFLM(pretrained=str(hf), trust_remote_code=True, batch_size=1, device="cpu")
    theirs = evaluator.simple_evaluate(model=reference, tasks=list(TASKS), log_samples=True,
                                       task_manager=TaskManager(include_path=setup.tasks, include_defaults=False))
    assert set(ours) == set(TASKS)
    for task in TASKS:
        their_samples = sorted(theirs["samples"][task], key=lambda s: s["doc_id"])
        assert len(ours[task]) == len(their_samples) == len(TASKS[task][1])
        for a, b in zip(ours[task], their_samples):
            _same_responses(a["resps"], b["resps"])
        for key, value in theirs["results"][task].items():
            if isinstance(value, float) and "stderr" not in key:
                assert ours_results[task][key] == pytest.approx(value, rel=1e-3), (task, key)
