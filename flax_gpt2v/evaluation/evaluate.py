"""Evaluation: metrics of a checkpoint on validation text, comparison of runs, and sampling.

`evaluate_lm(lm, blocks, batch_size)` runs the trainer's own eval step and eval loop
(`training.steps.make_eval_step`, `eval_loop`) over `data.eval_batches` and turns the summed
(nll, count, correct) into metrics with `steps.eval_metrics`, so the numbers are
the ones training logs. `compare_runs(dirs)` reads each run's metrics.jsonl.
The CLI is `eval_jax.py`.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from flax_gpt2v import durable
from flax_gpt2v.hf import checkpoint
from flax_gpt2v.data import pipeline as data
from flax_gpt2v.config import ConfigError, read_json
from flax_gpt2v.lm import LM, load
from flax_gpt2v.models import VARIANTS, variant_of
from flax_gpt2v.data.tokenizer import Tokenizer
from flax_gpt2v.training.run_files import RUN_CONFIG, SUMMARY
from flax_gpt2v.training.steps import eval_loop, eval_metrics, make_eval_step

METRICS = "metrics.jsonl"


class EvalError(ValueError):
    """Anything the user has to fix; the CLI prints it as one `error:` line."""


# ---------------------------------------------------------------- loading

def find_run_config(path: str) -> dict | None:
    """run_config.json of the run `path` belongs to: in it, or in its parent (for `hf/`, `best/`)."""
    for d in (path, os.path.dirname(os.path.abspath(path))):
        f = os.path.join(d, RUN_CONFIG)
        if os.path.isfile(f):
            run = read_json(f)
            bad = [k for k in ("model", "train", "data") if not isinstance(run.get(k, {}), dict)]
            if bad:
                raise EvalError(f"{f}: '{bad[0]}' is not an object, so the trainer did not write this file")
            return run
    return None


def load_model(checkpoint_dir: str | None = None, hf_dir: str | None = None, dtype=None) -> tuple[LM, str]:
    """(model, directory it came from). A run directory without a final model falls back to best/."""
    path = checkpoint_dir or hf_dir
    if not os.path.isdir(path):
        raise EvalError(f"{path}: no such directory")
    if checkpoint_dir is not None:
        if not checkpoint.is_native(path) and checkpoint.is_native(os.path.join(path, "best")):
            path = os.path.join(path, "best")
        if not checkpoint.is_native(path):
            raise EvalError(f"{path}: not a flax-gpt2v checkpoint (needs config.json + flax_params.safetensors)"
                            + ("; it is an HF directory, use --hf" if checkpoint.is_hf(path) else ""))
    elif not checkpoint.is_hf(path):
        raise EvalError(f"{path}: not an HF checkpoint (needs config.json + weights)"
                        + ("; it is a native checkpoint, use --checkpoint" if checkpoint.is_native(path) else ""))
    return load(path, dtype=dtype), path


def tokenizer_from_dir(directory: str) -> Tokenizer | None:
    if not checkpoint.has_tokenizer(directory):
        return None
    # The concrete class reads only the tokenizer files: AutoTokenizer would also open config.json,
    # and with remote code there it asks whether to trust it.
    from transformers import PreTrainedTokenizerFast
    return Tokenizer(PreTrainedTokenizerFast.from_pretrained(directory), source=os.path.abspath(directory))


def data_config(model_dir: str, validation_file: str | None, block_size: int | None, model_cfg: dict) -> dict:
    """The data keys of the evaluation: the run's (run_config.json) or --validation_file's."""
    run = find_run_config(model_dir)
    if validation_file is not None:
        if not os.path.isfile(validation_file):
            raise EvalError(f"{validation_file}: no such file")
        cfg = {"train_file": validation_file, "validation_file": validation_file}
        if run is not None and run.get("train", {}).get("tokenizer_name"):
            cfg["tokenizer_name"] = run["train"]["tokenizer_name"]
    elif run is not None:
        cfg = {k: v for k, v in {**run.get("train", {}), **run.get("data", {})}.items() if k in DATA_KEYS_ALL}
    else:
        raise EvalError(f"{model_dir}: no {RUN_CONFIG} here or in its parent, so no configured validation "
                        "data; give --validation_file FILE")
    run_block = (run or {}).get("train", {}).get("block_size")
    default = min(variant_of(model_cfg).default_block_size, model_cfg["n_positions"])
    cfg["block_size"] = block_size or run_block or default
    if cfg["block_size"] > model_cfg["n_positions"]:
        raise EvalError(f"sequence too long: block_size {cfg['block_size']} exceeds the model's "
                        f"{model_cfg['n_positions']} positions (n_positions)")
    return cfg


# The keys data.DataSpec reads (the trainer's DATA_KEYS plus block and seed keys).
DATA_KEYS_ALL = {"dataset", "train_file", "validation_file", "tokenizer_name", "max_eval_samples",
                 "validation_split_percentage", "cache_dir", "seed", "data_seed", "block_size",
                 "train_files", "max_train_samples", "batch_size", "streaming"}


def validation_blocks(cfg: dict, tokenizer: Tokenizer | None, cache_dir: str,
                      log: Callable[[str], None] = print) -> tuple[np.ndarray, Tokenizer]:
    """(int32 blocks [N, block_size] of the validation split, tokenizer). Only the validation split is
    tokenized; the blocks are cached under `cache_dir` like the trainer's."""
    try:
        spec = data.DataSpec.from_config(cfg)
    except data.DataError as e:
        raise EvalError(str(e)) from None
    corpus = data.Corpus(spec)
    if tokenizer is None:
        tokenizer = data.spec_tokenizer(spec)
    key_data = {"format": data.CACHE_FORMAT, "data": spec.identity(), "block_size": spec.block_size,
                "tokenizer": tokenizer.fingerprint, "split": "validation-only"}
    key = hashlib.sha256(json.dumps(key_data, sort_keys=True, default=str).encode()).hexdigest()[:20]
    directory = os.path.join(cache_dir, "eval", key)
    os.makedirs(directory, exist_ok=True)
    base = os.path.join(directory, "validation")
    blocks = data.cached_split(base, key, spec.block_size, lambda: data.build_blocks(
        base, key, corpus, spec.validation_split, tokenizer, spec.block_size, log), log)[0]
    if spec.max_eval_samples:
        blocks = blocks[:spec.max_eval_samples]
    if len(blocks) == 0:
        raise EvalError(f"{spec.describe()}: the validation text has fewer tokens than one block of "
                        f"{spec.block_size}; lower --block_size")
    return blocks, tokenizer


# ---------------------------------------------------------------- evaluation

def _sums(step, params, blocks, batch_size: int, model_cfg: dict, progress: bool, desc: str) -> dict:
    batches = ({k: jnp.asarray(v) for k, v in batch.items()}
               for batch in data.eval_batches(blocks, batch_size, model_cfg))
    return eval_loop(step, params, batches, total=math.ceil(len(blocks) / batch_size), progress=progress, desc=desc)


def _named(metrics: dict, sums: dict, group: str, prefix: str) -> dict:
    return {f"{prefix}loss": metrics[f"eval_{group}loss"], f"{prefix}perplexity": metrics[f"eval_{group}perplexity"],
            f"{prefix}accuracy": metrics[f"eval_{group}accuracy"], f"{prefix}tokens": int(sums[group][1])}


def evaluate_lm(lm: LM, blocks: np.ndarray, batch_size: int = 8, *, duo_loss: str | None = None,
                progress: bool = True) -> dict:
    """Metrics of `lm` on token blocks: loss, perplexity, accuracy, tokens (next-token prediction).

    duo-predict: the top-level metrics are next-token ones on the real positions (dual targets),
    `fill_*` are on the mask positions, `dual_*` both together; with duo_loss "original" also
    `original_*`, the original's combined objective (its shifted targets).
    """
    if batch_size <= 0:
        raise EvalError(f"--batch_size must be positive, got {batch_size}")
    cfg = lm.config
    if blocks.shape[1] > cfg["n_positions"]:
        raise EvalError(f"sequence too long: blocks of {blocks.shape[1]} tokens, the model has "
                        f"{cfg['n_positions']} positions")
    if blocks.size and int(np.max(blocks)) >= cfg["vocab_size"]:
        raise EvalError(f"token id {int(np.max(blocks))} is outside the model's vocabulary of "
                        f"{cfg['vocab_size']}: tokenizer and model do not match")
    interleaved = variant_of(cfg).interleaved
    step = jax.jit(make_eval_step(lm.module, interleaved=interleaved))
    if not interleaved:
        sums = _sums(step, lm.params, blocks, batch_size, cfg, progress, "eval")
        return _named(eval_metrics(sums), sums, "", "")
    duo_loss = duo_loss or cfg.get("duo_loss", "dual")
    if duo_loss not in ("dual", "original"):
        raise EvalError(f"--duo_loss must be dual or original, got {duo_loss!r}")
    sums = _sums(step, lm.params, blocks, batch_size, {**cfg, "duo_loss": "dual"}, progress, "eval")
    m = eval_metrics(sums)
    out = {**_named(m, sums, "next_", ""), **_named(m, sums, "fill_", "fill_"), **_named(m, sums, "", "dual_")}
    if duo_loss == "original":
        sums = _sums(step, lm.params, blocks, batch_size, {**cfg, "duo_loss": "original"}, progress,
                     "eval (original loss)")
        out.update(_named(eval_metrics(sums), sums, "", "original_"))
    return out


def generate_text(lm: LM, tokenizer: Tokenizer, prompt: str, max_new_tokens: int = 50, temperature: float = 0.0,
                  top_k: int | None = None, seed: int = 0) -> str:
    ids = tokenizer.encode(prompt)
    if not ids:
        raise EvalError("--generate: the prompt is empty")
    try:
        out = lm.generate(np.asarray([ids], np.int32), max_new_tokens=max_new_tokens, temperature=temperature,
                          top_k=top_k, seed=seed)
    except ValueError as e:
        raise EvalError(str(e)) from None
    return tokenizer.decode(np.asarray(out[0]).tolist())


# ---------------------------------------------------------------- comparing runs

def read_metrics(run_dir: str, log: Callable[[str], None] = lambda msg: None) -> list[dict]:
    """The records of a run's metrics.jsonl. A last line that does not parse was torn by a crash while
    being written (the run's resume drops it): it is left out, in one line to `log`."""
    path = os.path.join(run_dir, METRICS)
    if not os.path.isdir(run_dir):
        raise EvalError(f"{run_dir}: no such directory")
    if not os.path.isfile(path):
        raise EvalError(f"{run_dir}: no {METRICS} (not a training run directory)")
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = [(n, line) for n, line in enumerate(f, 1) if line.strip()]
    records = []
    for n, line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if n != lines[-1][0]:
                raise EvalError(f"{path} line {n}: not JSON ({e.msg})") from None
            log(f"{path}: its last line (line {n}) is torn; leaving it out")
    return records


def count_params(run_dir: str) -> int | None:
    """Parameters from the run's checkpoint (safetensors header only) or, failing that, its config."""
    for d in (run_dir, os.path.join(run_dir, "best")):
        f = os.path.join(d, checkpoint.NATIVE_WEIGHTS)
        if os.path.isfile(f):
            try:
                with open(f, "rb") as fh:
                    n = int.from_bytes(fh.read(8), "little")
                    header = json.loads(fh.read(n))
                return sum(int(np.prod(v["shape"])) for k, v in header.items() if k != "__metadata__")
            except (ValueError, TypeError, KeyError, AttributeError):  # damaged: the config still counts them
                continue
    run = find_run_config(run_dir)
    cfg = (run or {}).get("model") or (read_json(os.path.join(run_dir, "config.json"))
                                        if os.path.isfile(os.path.join(run_dir, "config.json")) else None)
    if not cfg:
        return None
    from flax_gpt2v.models import load_config
    from flax_gpt2v.models import build_model
    shapes = jax.eval_shape(build_model(load_config(cfg)).init, jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))


def describe_variant(cfg: dict | None) -> str | None:
    """model_type plus the variant keys that differ from its defaults, e.g. `<model_type> (<key>=<value>, ...)`."""
    if not cfg or "model_type" not in cfg:
        return None
    if cfg["model_type"] not in VARIANTS:
        return cfg["model_type"]
    variant = VARIANTS[cfg["model_type"]]
    changed = [f"{k}={cfg[k]}" for k in variant.describing_keys if k in cfg and cfg[k] != variant.defaults[k]]
    return cfg["model_type"] + (f" ({', '.join(changed)})" if changed else "")


def describe_data(data: dict | None) -> str | None:
    """The training data a run's data keys name (run_config.json), with the part of the train split used
    (docs/experiments.md), so that a run on other data never reads as the original's experiment:
    `wikitext-103-raw-v1 (train[1%:])`, `local: a.txt`."""
    if data is None:
        return None
    files = data.get("train_files") or ([data["train_file"]] if data.get("train_file") else [])
    dataset = {"path": data["dataset"]} if isinstance(data.get("dataset"), str) else data.get("dataset") or {}
    if files:
        text = "local: " + ", ".join(os.path.basename(str(f)) for f in files)
        if data.get("validation_file"):
            text += f", validation {os.path.basename(str(data['validation_file']))}"
    elif dataset.get("data_files"):  # a packaged builder (text, json, ...) over local files
        paths = dataset["data_files"].values() if isinstance(dataset["data_files"], dict) else [dataset["data_files"]]
        text = "local: " + ", ".join(os.path.basename(str(p)) for p in paths)
    elif dataset:
        text = ("tfds: " if dataset.get("source") == "tfds" else "") + str(dataset.get("name") or dataset.get("path"))
    else:
        text = "embedded: CPython documentation"
    if data.get("max_train_samples"):
        return f"{text} (train[:{data['max_train_samples']}])"
    if data.get("validation_split_percentage") and not data.get("validation_file"):
        return f"{text} (train[{data['validation_split_percentage']}%:])"
    return text


def summarize_run(run_dir: str, log: Callable[[str], None] = lambda msg: None) -> dict:
    """A run's row of the comparison; what is damaged in its files is named in one line each to `log`."""
    records = read_metrics(run_dir, log)
    evals = [r for r in records if "eval_loss" in r]
    # A damaged summary.json (a power loss) only lacks tokens/s here; the next run of the same command rewrites it.
    tps = (durable.read_derived_json(os.path.join(run_dir, SUMMARY), log) or {}).get("tokens_per_s")
    try:
        run = (find_run_config(run_dir) if os.path.isfile(os.path.join(run_dir, RUN_CONFIG)) else None) or {}
    except (ConfigError, EvalError) as e:  # the run's description only: compared without it
        log(f"{e}; comparing {run_dir} without it")
        run = {}
    row = {"run": run.get("train", {}).get("run_name") or os.path.basename(os.path.normpath(run_dir)),
           "dir": run_dir, "params": count_params(run_dir),
           "model_type": describe_variant(run.get("model")), "data": describe_data(run.get("data")),
           "steps": max((r["step"] for r in records), default=None), "tokens_per_s": tps,
           "evals": [(r["step"], r.get("eval_perplexity"), r.get("eval_accuracy")) for r in evals]}
    if evals:
        best = min(evals, key=lambda r: r["eval_loss"])
        final = evals[-1]
        row.update(best_eval_loss=best["eval_loss"], best_step=best["step"], final_eval_loss=final["eval_loss"],
                   final_perplexity=final.get("eval_perplexity", math.exp(min(final["eval_loss"], 700))),
                   final_accuracy=final.get("eval_accuracy"))
    return row


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _labels(rows: list[dict]) -> list[str]:
    """Run names, with the directory added where two runs share a name."""
    names = [r["run"] for r in rows]
    return [n if names.count(n) == 1 else f"{n} ({r['dir']})" for n, r in zip(names, rows)]


def markdown_table(rows: list[dict]) -> str:
    head = ["run", "model_type", "data", "params", "steps", "best eval loss (step)", "final eval loss",
            "final perplexity", "final accuracy", "tokens/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, r in zip(_labels(rows), rows):
        params = "-" if r["params"] is None else f"{r['params'] / 1e6:.2f}M"
        best = "-" if r.get("best_eval_loss") is None else f"{r['best_eval_loss']:.4f} ({r['best_step']})"
        cells = [label, r["model_type"] or "-", r["data"] or "-", params, _fmt(r["steps"], "d"), best,
                 _fmt(r.get("final_eval_loss"), ".4f"), _fmt(r.get("final_perplexity"), ".2f"),
                 _fmt(r.get("final_accuracy"), ".4f"), _fmt(r["tokens_per_s"], ".0f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_runs(rows: list[dict], plot_dir: str) -> list[str]:
    """eval_perplexity.png and eval_accuracy.png: one line per run against the step, each legend entry
    naming the run, its variant and its data; the title names the data when all runs share it."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(plot_dir, exist_ok=True)
    labels = [" | ".join((label, r["model_type"] or "model_type unknown", r["data"] or "data unknown"))
              for label, r in zip(_labels(rows), rows)]
    known = {r["data"] for r in rows if r["data"]}
    on = ("(runs on different data: not comparable)" if len(known) > 1 else
          f"on {known.pop()}" if known and all(r["data"] for r in rows) else "")
    written = []
    for index, name, ylabel, log_y in ((1, "eval_perplexity", "eval perplexity", True),
                                       (2, "eval_accuracy", "eval next-token accuracy", False)):
        fig, ax = plt.subplots(figsize=(8, 5))
        for label, r in zip(labels, rows):
            pts = [(e[0], e[index]) for e in r["evals"] if e[index] is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", markersize=3, label=label)
        ax.set_title(f"{ylabel[0].upper()}{ylabel[1:]} {on}".strip(), fontsize="medium")
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        if log_y and ax.has_data():
            ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        if ax.has_data():
            ax.legend(title="run | model_type | data", fontsize="small", loc="upper center",
                      bbox_to_anchor=(0.5, -0.14))
        path = os.path.join(plot_dir, f"{name}.png")
        # "tight" keeps the legend below the axes
        durable.write_file(path, lambda f: fig.savefig(f, format="png", dpi=120, bbox_inches="tight"), binary=True)
        plt.close(fig)
        written.append(path)
    return written


def format_results(results: dict[str, Any]) -> str:
    width = max(len(k) for k in results)
    lines = []
    for k, v in results.items():
        if isinstance(v, float):
            v = f"{v:.6g}"
        lines.append(f"{k:<{width}}  {v}")
    return "\n".join(lines)
