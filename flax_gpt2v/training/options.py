"""The trainer's and the data pipeline's options, each described once, and reading them from a run's config.

Each option is a field of a frozen dataclass carrying its default, its help line and, for the
trainer's, its check: `TrainOptions` (validated here, kept in run_config.json), `AcceptedOptions`
(read but never kept: the Hub token, and HF Trainer keys accepted with one value only) and
`DataOptions` (read and validated by flax_gpt2v.data; described here). `train_jax.py --help`, the
README's option table (`python -m flax_gpt2v.training.options --markdown`), the defaults and the
validation all come from these fields; `TRAINER_KEYS` is every key the trainer takes, which
config.TRAINING_KEYS must equal (config sits below training, so a test holds the two together).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from typing import Any, Callable, Mapping

from flax_gpt2v.config import ConfigError, block_length, read_json
from flax_gpt2v.models import ATTENTION_IMPLEMENTATIONS, split_config, variant_of
from flax_gpt2v.training import original_experiments, pretrained, reporting
from flax_gpt2v.training.schedule import SCHEDULES

Check = Callable[[Any], "str | None"]  # value -> what is wrong with it (after "config key 'k': "), or None


def option(default: Any, help: str, check: Check | None = None, *, shown: str | None = None, kind: type | None = None):
    """A described option: `shown` replaces json.dumps(default) in --help and the README table (what a
    null default means); `kind` is the type checked when the default (None) gives none."""
    meta = {"help": help, "check": check, "shown": shown, "kind": kind}
    if isinstance(default, (dict, list)):
        return dataclasses.field(default_factory=lambda: json.loads(json.dumps(default)), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def positive_int(v) -> str | None:
    if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v <= 0):
        return f"must be a positive integer, got {v!r}"
    return None


def bounded(ok: Callable[[Any], bool], want: str) -> Check:
    # `not ok(v)` rather than a negated comparison, so that NaN fails too.
    return lambda v: None if ok(v) else f"must be {want}, got {v!r}"


def one_of(choices) -> Check:
    return lambda v: None if v in choices else f"must be one of {', '.join(choices)}, got {v!r}"


@dataclasses.dataclass(frozen=True)
class TrainOptions:
    """The validated trainer options: the original's recipe (docs/training.md) on HF Trainer defaults."""
    run_name: str | None = option(None, "name of the run in the logs, TensorBoard and wandb")
    output_dir: str = option("runs/default", "run directory (checkpoints/, best/, metrics.jsonl, tb/, the final "
                                             "model); rerun to resume")
    per_device_train_batch_size: int = option(64, "blocks per device in a micro-batch", positive_int)
    per_device_eval_batch_size: int | None = option(
        None, "blocks per device in an evaluation batch (null: the training one)", positive_int)
    gradient_accumulation_steps: int = option(1, "micro-batches summed into one optimizer step", positive_int)
    learning_rate: float = option(1e-4, "peak AdamW learning rate, >= 0", bounded(lambda v: v >= 0, ">= 0"))
    num_train_epochs: float = option(5.0, "epochs to train when max_steps is not set, > 0")
    max_steps: int = option(-1, "optimizer steps to train; when > 0 it replaces num_train_epochs")
    warmup_ratio: float = option(0.1, "fraction of the steps with a linear warmup, in [0, 1] (when warmup_steps is 0)",
                                 lambda v: None if 0.0 <= v <= 1.0 else f"must be in [0, 1], got {v}")
    warmup_steps: int = option(0, "warmup steps when > 0 (instead of warmup_ratio); at most the run's steps",
                               bounded(lambda v: v >= 0, ">= 0"))
    weight_decay: float = option(0.01, "AdamW decoupled weight decay, >= 0", bounded(lambda v: v >= 0, ">= 0"))
    lr_scheduler_type: str = option("linear", f"learning rate after warmup: {', '.join(SCHEDULES)}",
                                    one_of(SCHEDULES))
    adam_beta1: float = option(0.9, "AdamW beta1, in [0, 1)", bounded(lambda v: 0 <= v < 1, "in [0, 1)"))
    adam_beta2: float = option(0.999, "AdamW beta2, in [0, 1)", bounded(lambda v: 0 <= v < 1, "in [0, 1)"))
    adam_epsilon: float = option(1e-8, "AdamW epsilon, > 0", bounded(lambda v: v > 0, "> 0"))
    max_grad_norm: float = option(1.0, "clip the global gradient norm to this, > 0", bounded(lambda v: v > 0, "> 0"))
    bf16: bool = option(True, "compute in bfloat16 (parameters and optimizer state stay float32)")
    gradient_checkpointing: bool = option(True, "recompute activations in the backward pass to save memory")
    block_size: int | None = option(None, "tokens per block, the shorter of block_size and max_seq_length (null: "
                                          "the variant's: 1024, 512 for duo-predict; at most n_positions)", positive_int)
    remat_policy: str = option("dots", "what gradient checkpointing keeps: dots (matmul outputs) or full (nothing)",
                               lambda v: None if v in ("full", "dots") else f"must be 'full' or 'dots', got {v!r}")
    scan_layers: bool = option(True, "run the layers as one lax.scan (compile time flat in depth)")
    attention_implementation: str = option(
        "auto", "attention kernel: auto (cuDNN's fused one on a GPU in bf16, else xla), xla, cudnn, or flash (a "
                "Pallas kernel with the attention dropout inside: never holds the [B, H, T, T] scores; opt-in, "
                "README: Flash attention)", one_of(ATTENTION_IMPLEMENTATIONS))
    logging_steps: int = option(500, "write training metrics every N steps", positive_int)
    eval_steps: int = option(500, "evaluate on the validation blocks every N steps (and keep the best in best/)",
                             positive_int)
    eval_harness_tasks: list = option(
        [], "lm-evaluation-harness tasks run at each evaluation, logged as eval/<task>/<metric>: names (e.g. "
            "lambada_openai) or task YAML files; needs pip install '.[eval]'",
        lambda v: None if all(isinstance(t, str) and t for t in v) else f"must be a list of task names, got {v!r}")
    eval_harness_limit: float | None = option(
        None, "examples per harness task at each evaluation: a count, or a fraction (< 1) of the task (null: all)",
        bounded(lambda v: v is None or v > 0, "> 0 or null"), kind=float)
    save_steps: int = option(500, "write a checkpoint every N steps", positive_int)
    save_total_limit: int | None = option(None, "keep the last N checkpoints (null: all)", positive_int)
    early_stopping_patience: int | None = option(2, "stop after N evaluations without improvement (null: never)",
                                                 bounded(lambda v: v is None or v >= 0, ">= 0 or null"))
    early_stopping_threshold: float = option(0.0, "smallest eval loss decrease that counts as an improvement")
    max_nonfinite_steps: int = option(5, "stop after N steps in a row whose loss or gradient is not finite (their "
                                         "updates are skipped); 0: never stop", bounded(lambda v: v >= 0, ">= 0"))
    seed: int = option(42, "seed of the initialization and dropout (and of the batch order without data_seed), "
                           "in [0, 2**32)", bounded(lambda v: 0 <= v < 2**32, "in [0, 2**32)"))
    data_seed: int | None = option(None, "seed of the batch order (null: seed), in [0, 2**32)",
                                   bounded(lambda v: v is None or 0 <= v < 2**32, "in [0, 2**32) or null"), kind=int)
    mesh: dict = option({"data": -1, "fsdp": 1, "tensor": 1},
                        "devices per mesh axis: data, fsdp, tensor (-1: the devices left)")
    distributed: dict | None = option(
        None, "multi-host: {coordinator_address, num_processes, process_id, local_device_ids}, each key when set "
              "replacing the JAX_* variable's or the launcher's (null: JAX_* variables, else srun's or mpirun's "
              "environment, else one process; README, Multi-host and clusters)",
        lambda v: None if v is None or isinstance(v, dict) else
        "must be an object {coordinator_address, num_processes, process_id, local_device_ids}")
    distributed_timeout: int = option(300, "seconds a multi-host process waits for the coordinator and the other "
                                           "processes before it stops with one error line naming the coordinator",
                                      positive_int)
    export_hf: bool = option(True, "write a Hugging Face export to output_dir/hf at the end")
    report_to: list = option(["tensorboard"], "where metrics go besides metrics.jsonl: tensorboard, wandb, all, "
                                              "none (a name or a list)")
    push_to_hub: bool = option(False, "upload the HF export to the Hub at each save and at the end "
                                      "(flax_gpt2v/hf/hub.py)")
    hub_model_id: str | None = option(None, "Hub repo to push to (null: the output_dir's name under the token's user)")
    hub_private_repo: bool | None = option(None, "create the Hub repo private (null: the Hub's default)")
    hub_strategy: str = option("every_save", "what is pushed: every_save, end, all_checkpoints (each save to "
                                             "checkpoint-<step>/)")


@dataclasses.dataclass(frozen=True)
class AcceptedOptions:
    """Keys the trainer reads but never keeps in run_config.json. hub_token is read by hub.HubPush, so
    that no file ever holds it; accept_data_change by run_files.check_same_tokens, for the one resume
    it allows; the HF Trainer keys of the original's files are checked for the one value this trainer
    does (original_experiments.ONLY_VALUES, checked by resolve_options)."""
    hub_token: str | None = option(None, "Hub token (null: HF_TOKEN or `hf auth login`); never written to a file")
    eval_strategy: str | None = option(None, 'accepted as "steps" only: evaluation runs every eval_steps')
    evaluation_strategy: str | None = option(None, 'the older name of eval_strategy: "steps" only')
    save_strategy: str | None = option(None, 'accepted as "steps" only: checkpoints every save_steps')
    logging_strategy: str | None = option(None, 'accepted as "steps" only: metrics every logging_steps')
    metric_for_best_model: str | None = option(
        None, 'accepted as "eval_loss" (or "loss") only: best/ and early stopping use the eval loss')
    greater_is_better: bool | None = option(None, "accepted as false only (a lower eval loss is better)")
    accept_data_change: bool | None = option(
        None, "resume although the data's tokens changed since the run was checkpointed (refused otherwise); "
              "the change is kept in run_config.json's history")


@dataclasses.dataclass(frozen=True)
class DataOptions:
    """The data keys, read by the data pipeline (prepare_data gets the whole training config), which
    validates them. `batch_size` is the original's datasets.map batch size for grouping texts into
    blocks, not a training batch (docs/experiments.md); max_seq_length shortens the blocks."""
    dataset: Any = option(None, "a Hugging Face dataset: a name or {path, name, ...}; {source: tfds, name} for TFDS",
                          shown="null: the embedded corpus")
    train_file: str | None = option(None, "local training text (.txt, .json, .jsonl, .csv, .parquet) instead of "
                                          "dataset", shown="null")
    validation_file: str | None = option(None, "local validation text (with train_file)", shown="null")
    train_files: list = option([], "the original's list of local training files; when not empty they replace "
                                   "dataset", shown="[]")
    validation_split_percentage: Any = option(
        None, "validation = the first P% of the training split, training = the rest (the original's; a "
              "validation_file wins); null: the dataset's validation split, else 5%", shown="null")
    tokenizer_name: str | None = option(None, "tokenizer (+ <|MASK|>): a GPT-2 name (built offline), a directory "
                                              "or a Hub name", shown="gpt2-medium")
    model_name_or_path: str | None = option(
        None, "checkpoint to start from: a local directory (native or HF) or a Hub id; its sizes and, without "
              "tokenizer_name, its tokenizer (README: Start from GPT-2)", shown="null: from scratch")
    config_name: str | None = option(None, "size preset of a model trained from scratch: gpt2, gpt2-medium, "
                                           "gpt2-large, gpt2-xl", shown="null: gpt2-medium")
    model_name: str | None = option(None, "the original's name of the model; not read", shown="null")
    max_train_samples: int | None = option(None, "training AND validation are the first N rows of the training "
                                                 "split (the original's rule)", shown="null: all")
    max_eval_samples: int | None = option(None, "use the first N validation blocks", shown="null: all")
    cache_dir: str | None = option(None, "where Hugging Face keeps downloads (tokenized blocks: "
                                         "~/.cache/flax_gpt2v)", shown="null")
    batch_size: int | None = option(
        None, "rows per datasets.map batch when grouping texts into blocks, each batch's remainder dropped (the "
              "original's 40000; dataset.num_proc shards as map did); not a training batch",
        shown="null: the whole split")
    max_seq_length: int | None = option(None, "block length = min(block_size, max_seq_length), as the original",
                                        shown="null")
    streaming: bool = option(False, "read the text as a stream while the token cache is built (same tokens)",
                             shown="false")
    overwrite_cache: bool | None = option(
        None, "false: read the original's pre-tokenized blocks (BluebrainAI/{name}-seq{max_seq_length}"
              "-tokenized-grouped, or dataset.pretokenized) when they can be had, else build them", shown="null")


def _names(cls) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


DATA_KEYS = frozenset(_names(DataOptions))
# Accepted so the original's files run, changing nothing here: named once in the log, with why.
IGNORED_KEYS = frozenset(original_experiments.NO_EFFECT_KEYS)
TRAINER_KEYS = frozenset(_names(TrainOptions) + _names(AcceptedOptions)) | DATA_KEYS | IGNORED_KEYS


def default_of(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def _type_problem(f: dataclasses.Field, v: Any) -> str | None:
    """What is wrong with v's type for field f (the type of its default, or its `kind`), or None."""
    expected = f.metadata["kind"] or (None if default_of(f) is None else type(default_of(f)))
    if v is None or expected is None:
        return None
    ok = (isinstance(v, bool) if expected is bool else
          isinstance(v, int) and not isinstance(v, bool) if expected is int else
          isinstance(v, (int, float)) and not isinstance(v, bool) if expected is float else
          isinstance(v, expected))
    if not ok:
        return f"expected {expected.__name__}, got {v!r}"
    # JSON's NaN and Infinity (and --key NaN) parse as floats; no option means anything by them.
    return None if expected is not float or math.isfinite(v) else f"must be a finite number, got {v!r}"


def resolve_options(train: Mapping[str, Any], model_cfg: Mapping[str, Any]) -> TrainOptions:
    """Typed trainer options with defaults filled in; the message of any error names the key."""
    fields = dataclasses.fields(TrainOptions)
    values = {f.name: train.get(f.name, default_of(f)) for f in fields}
    problem = original_experiments.check_values(train)
    if problem:
        raise ConfigError(problem)
    # Block length = min(block_size, max_seq_length), as the original's run_clm (both checked in config).
    values["block_size"] = block_length(train)
    values["report_to"] = reporting.resolve_report_to(values["report_to"])
    # Every type first, so that the checks compare values of the right type.
    for check in (_type_problem, lambda f, v: f.metadata["check"] and f.metadata["check"](v)):
        for f in fields:
            problem = check(f, values[f.name])
            if problem:
                raise ConfigError(f"config key '{f.name}': {problem}")
    if 0 < values["max_steps"] < values["warmup_steps"]:
        raise ConfigError(f"config key 'warmup_steps': {values['warmup_steps']} is longer than the run "
                          f"(max_steps {values['max_steps']})")
    if os.path.exists(values["output_dir"]) and not os.path.isdir(values["output_dir"]):
        raise ConfigError(f"config key 'output_dir': {values['output_dir']} is a file, not a directory")
    if values["max_steps"] <= 0 and values["num_train_epochs"] <= 0:
        raise ConfigError("config key 'num_train_epochs': must be > 0 when max_steps is not set")
    if values["block_size"] is None:
        # The original's blocks for the variant, never beyond the positions.
        values["block_size"] = min(variant_of(model_cfg).default_block_size, model_cfg["n_positions"])
    return TrainOptions(**values)


# ---------------------------------------------------------------- reading a run's config

def parse_cli(argv: list[str]) -> tuple[str, dict]:
    """`--config PATH --key value --a.b value ...` -> (config path, {dotted key: value}).

    Values are JSON when they parse as JSON (numbers, true, null, lists), else strings;
    `--key null` removes the key from the config (apply_overrides).
    """
    config, overrides, i = None, {}, 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(f"expected --key value, got {arg!r}")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(argv):
                raise ConfigError(f"--{key} needs a value")
            value, i = argv[i + 1], i + 1
        i += 1
        if key == "config":
            config = value
            continue
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    if config is None:
        raise ConfigError("--config PATH is required")
    return config, overrides


def apply_overrides(raw: dict, overrides: Mapping[str, Any]) -> dict:
    """`raw` with each dotted key set; a None value removes the key (so `--dataset null` takes an
    original file off its Hub dataset, and every key falls back to its default)."""
    raw = json.loads(json.dumps(raw))  # deep copy: nested dicts get edited
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        node = raw
        for p in parents:
            if value is None and not isinstance(node.get(p), dict):
                node = None  # removing a key under an absent parent: nothing to remove
                break
            if not isinstance(node.setdefault(p, {}), dict):
                raise ConfigError(f"config key '{dotted}': '{p}' is not a nested object")
            node = node[p]
        if value is None:
            if node is not None:
                node.pop(leaf, None)
        else:
            node[leaf] = value
    return raw


def load_run_config(config: Mapping[str, Any] | str | os.PathLike, overrides: Mapping[str, Any] | None = None,
                    notes: list | None = None) -> tuple[dict, dict, TrainOptions, dict]:
    """(model-key dict as written, validated model config, options, raw training keys).
    Lines for the log (settings supplied for a recognised original experiment) go to `notes`."""
    raw = dict(config) if isinstance(config, Mapping) else read_json(config)
    raw = apply_overrides(raw, overrides or {})
    raw, note = original_experiments.complete(raw)
    if note and notes is not None:
        notes.append(note)
    model_raw = {k: v for k, v in raw.items() if k not in TRAINER_KEYS}
    train = {k: v for k, v in raw.items() if k in TRAINER_KEYS}
    if train.get("model_name_or_path"):
        model_raw, train = pretrained.merge_config(model_raw, train)
    # A variant whose positions follow its blocks (duo-predict, as the original's code set them).
    if variant_of(model_raw).positions_follow_block and block_length(train) is not None:
        model_raw.setdefault("n_positions", block_length(train))
    model_cfg = split_config({**model_raw, **train})[0]
    return model_raw, model_cfg, resolve_options(train, model_cfg), train


def fit_to_tokenizer(model_raw: dict, train: dict, tokenizer) -> dict:
    """The model config completed from the tokenizer (vocab, mask and eos ids the file leaves out)."""
    raw = dict(model_raw)
    raw.setdefault("vocab_size", tokenizer.vocab_size)
    if raw["vocab_size"] < tokenizer.vocab_size:
        raise ConfigError(f"config key 'vocab_size': {raw['vocab_size']} is smaller than the tokenizer's "
                          f"vocabulary of {tokenizer.vocab_size}")
    if tokenizer.eos_token_id is not None:
        raw.setdefault("eos_token_id", tokenizer.eos_token_id)
        raw.setdefault("bos_token_id", tokenizer.eos_token_id)
    if "mask_token_id" in variant_of(raw).defaults and tokenizer.mask_token_id is not None:
        raw.setdefault("mask_token_id", tokenizer.mask_token_id)
    return split_config({**raw, **train})[0]


# ---------------------------------------------------------------- the option list, for people

def described(cls) -> list[tuple[str, str, str]]:
    """(key, default as shown, help) of each option of a description class, in its order."""
    return [(f.name, f.metadata["shown"] or json.dumps(default_of(f)), f.metadata["help"])
            for f in dataclasses.fields(cls)]


SECTIONS = (("trainer options", described(TrainOptions) + described(AcceptedOptions)),
            ("data options", described(DataOptions)))


def markdown_table() -> str:
    """The README's option table."""
    def cell(text):
        return text.replace("|", "\\|")

    lines = ["| key | default | meaning |", "|---|---|---|"]
    for section, rows in SECTIONS:
        lines.append(f"| **{section}** | | |")
        lines += [f"| `{key}` | `{cell(shown)}` | {cell(meaning)} |" for key, shown, meaning in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1:] != ["--markdown"]:
        sys.exit("usage: python -m flax_gpt2v.training.options --markdown")
    print(markdown_table())
