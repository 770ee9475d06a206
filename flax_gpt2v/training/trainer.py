"""The trainer: the original's recipe (docs/training.md) as one jitted step over a device mesh.

`train(config)` reads an experiment file (the original's keys), prepares the
data, and trains with AdamW + warmup/decay, gradient clipping, accumulation,
periodic evaluation with early stopping, asynchronous Orbax checkpoints and
automatic resumption from `<output_dir>/checkpoints`. The global step is the
whole training position: batches (BatchSchedule) and dropout keys are pure
functions of it, so a resumed run repeats an uninterrupted one exactly.
What a run survives (signals, non-finite steps, damaged checkpoints, a second
run, a full disk) lives in run_guard.py and run_checkpoints.py; README has the table.

Layout of `<output_dir>`: checkpoints/ (Orbax, the last `save_total_limit`, each
step with its sha256.json), best/ (native checkpoint with the lowest eval loss),
metrics.jsonl, tb/ (TensorBoard), run_config.json, .lock while a run holds it, and
at the end the final native checkpoint (config.json + flax_params.safetensors +
tokenizer files) and hf/ (HF export).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import time
import uuid
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from flax_gpt2v.hf import checkpoint
from flax_gpt2v.models import ops
from flax_gpt2v.training import original_experiments, pretrained, reporting, run_guard, sharding
from flax_gpt2v.config import TRAINING_KEYS, ConfigError, block_length, read_json
from flax_gpt2v.models import split_config
from flax_gpt2v.hf.hub import HubPush
from flax_gpt2v.hf.keymap import num_params as count_params
from flax_gpt2v.models import ATTENTION_IMPLEMENTATIONS, build_model, init_params, param_axes, variant_of
from flax_gpt2v.training.run_checkpoints import RunCheckpoints, quiet_orbax
from flax_gpt2v.training.schedule import SCHEDULES, adamw, lr_schedule

# Trainer options and their defaults: the original's recipe (docs/training.md) on HF Trainer defaults.
DEFAULTS: dict[str, Any] = dict(
    run_name=None, output_dir="runs/default",
    per_device_train_batch_size=64, per_device_eval_batch_size=None, gradient_accumulation_steps=1,
    learning_rate=1e-4, num_train_epochs=5.0, max_steps=-1, warmup_ratio=0.1, warmup_steps=0,
    weight_decay=0.01, lr_scheduler_type="linear", adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
    max_grad_norm=1.0, bf16=True, gradient_checkpointing=True, block_size=None,
    remat_policy="dots", scan_layers=True, attention_implementation="auto",
    logging_steps=500, eval_steps=500, save_steps=500, save_total_limit=None,
    early_stopping_patience=2, early_stopping_threshold=0.0, max_nonfinite_steps=5, seed=42, data_seed=None,
    mesh={"data": -1, "fsdp": 1, "tensor": 1}, distributed=None, export_hf=True, report_to=["tensorboard"],
    push_to_hub=False, hub_model_id=None, hub_private_repo=None, hub_strategy="every_save",
)
# One line per option for `train_jax.py --help` (defaults from DEFAULTS; hub_token has none there).
OPTION_HELP = dict(
    run_name="name of the run in the logs, TensorBoard and wandb",
    output_dir="run directory (checkpoints/, best/, metrics.jsonl, tb/, the final model); rerun to resume",
    per_device_train_batch_size="blocks per device in a micro-batch",
    per_device_eval_batch_size="blocks per device in an evaluation batch (null: the training one)",
    gradient_accumulation_steps="micro-batches summed into one optimizer step",
    learning_rate="peak AdamW learning rate, >= 0",
    num_train_epochs="epochs to train when max_steps is not set, > 0",
    max_steps="optimizer steps to train; when > 0 it replaces num_train_epochs",
    warmup_ratio="fraction of the steps with a linear warmup, in [0, 1] (when warmup_steps is 0)",
    warmup_steps="warmup steps when > 0 (instead of warmup_ratio); at most the run's steps",
    weight_decay="AdamW decoupled weight decay, >= 0",
    lr_scheduler_type=f"learning rate after warmup: {', '.join(SCHEDULES)}",
    adam_beta1="AdamW beta1, in [0, 1)",
    adam_beta2="AdamW beta2, in [0, 1)",
    adam_epsilon="AdamW epsilon, > 0",
    max_grad_norm="clip the global gradient norm to this, > 0",
    bf16="compute in bfloat16 (parameters and optimizer state stay float32)",
    gradient_checkpointing="recompute activations in the backward pass to save memory",
    block_size="tokens per block, the shorter of block_size and max_seq_length (null: 1024, 512 for duo-predict, "
               "at most n_positions)",
    remat_policy="what gradient checkpointing keeps: dots (matmul outputs) or full (nothing)",
    scan_layers="run the layers as one lax.scan (compile time flat in depth)",
    attention_implementation=f"attention kernel: {', '.join(ATTENTION_IMPLEMENTATIONS)}",
    logging_steps="write training metrics every N steps",
    eval_steps="evaluate on the validation blocks every N steps (and keep the best in best/)",
    save_steps="write a checkpoint every N steps",
    save_total_limit="keep the last N checkpoints (null: all)",
    early_stopping_patience="stop after N evaluations without improvement (null: never)",
    early_stopping_threshold="smallest eval loss decrease that counts as an improvement",
    max_nonfinite_steps="stop after N steps in a row whose loss or gradient is not finite (their updates are "
                        "skipped); 0: never stop",
    seed="seed of the initialization and dropout (and of the batch order without data_seed)",
    data_seed="seed of the batch order (null: seed)",
    mesh="devices per mesh axis: data, fsdp, tensor (-1: the devices left)",
    distributed="multi-host: {coordinator_address, num_processes, process_id} (null: JAX_* environment)",
    export_hf="write a Hugging Face export to output_dir/hf at the end",
    report_to="where metrics go besides metrics.jsonl: tensorboard, wandb, all, none (a name or a list)",
    push_to_hub="upload the HF export to the Hub at each save and at the end (flax_gpt2v/hub.py)",
    hub_model_id="Hub repo to push to (null: the output_dir's name under the token's user)",
    hub_private_repo="create the Hub repo private (null: the Hub's default)",
    hub_strategy="what is pushed: every_save, end, all_checkpoints (each save to checkpoint-<step>/)",
    hub_token="Hub token (null: HF_TOKEN or `hf auth login`); never written to a file",
    # HF Trainer keys of the original's files checked for the one value this trainer does.
    eval_strategy='accepted as "steps" only: evaluation runs every eval_steps',
    evaluation_strategy='the older name of eval_strategy: "steps" only',
    save_strategy='accepted as "steps" only: checkpoints every save_steps',
    logging_strategy='accepted as "steps" only: metrics every logging_steps',
    metric_for_best_model='accepted as "eval_loss" (or "loss") only: best/ and early stopping use the eval loss',
    greater_is_better="accepted as false only (a lower eval loss is better)",
)
# Read by the data pipeline (prepare_data gets the whole training config). `batch_size` is the
# original's datasets.map batch size for grouping texts into blocks, not a training batch (docs/experiments.md);
# max_seq_length shortens the blocks (block length = min(block_size, max_seq_length)).
DATA_KEYS = {"dataset", "train_file", "validation_file", "tokenizer_name", "model_name_or_path", "config_name",
             "model_name", "max_train_samples", "max_eval_samples", "validation_split_percentage", "cache_dir",
             "streaming", "batch_size", "max_seq_length", "train_files", "overwrite_cache"}
# For `train_jax.py --help`: (default, meaning) of each data key.
DATA_HELP = dict(
    dataset=("null: the embedded corpus", "a Hugging Face dataset: a name or {path, name, ...}; "
             "{source: tfds, name} for TFDS"),
    train_file=("null", "local training text (.txt, .json, .jsonl, .csv, .parquet) instead of dataset"),
    validation_file=("null", "local validation text (with train_file)"),
    train_files=("[]", "the original's list of local training files; when not empty they replace dataset"),
    validation_split_percentage=("null", "validation = the first P% of the training split, training = the rest "
                                 "(the original's; a validation_file wins); null: the dataset's validation split, "
                                 "else 5%"),
    tokenizer_name=("gpt2-medium", "tokenizer (+ <|MASK|>): a GPT-2 name (built offline), a directory "
                    "or a Hub name"),
    model_name_or_path=("null: from scratch", "checkpoint to start from: a local directory (native or HF) or a Hub "
                        "id; its sizes and, without tokenizer_name, its tokenizer (README: Start from GPT-2)"),
    config_name=("null: gpt2-medium", "size preset of a model trained from scratch: gpt2, gpt2-medium, gpt2-large, "
                 "gpt2-xl"),
    model_name=("null", "the original's name of the model; not read"),
    max_train_samples=("null: all", "training AND validation are the first N rows of the training split "
                       "(the original's rule)"),
    max_eval_samples=("null: all", "use the first N validation blocks"),
    cache_dir=("null", "where Hugging Face keeps downloads (tokenized blocks: ~/.cache/flax_gpt2v)"),
    batch_size=("null: the whole split", "rows per datasets.map batch when grouping texts into blocks, each "
                "batch's remainder dropped (the original's 40000; dataset.num_proc shards as map did); "
                "not a training batch"),
    max_seq_length=("null", "block length = min(block_size, max_seq_length), as the original"),
    streaming=("false", "read the text as a stream while the token cache is built (same tokens)"),
    overwrite_cache=("null", "false: read the original's pre-tokenized blocks (BluebrainAI/{name}-seq{max_seq_length}"
                     "-tokenized-grouped, or dataset.pretokenized) when they can be had, else build them"),
)
# Accepted so the original's files run, changing nothing here: named once in the log, with why
# (original_experiments.NO_EFFECT). hub_token is read by hub.HubPush and kept out of Options, so that
# no file ever holds it.
IGNORED_KEYS = original_experiments.NO_EFFECT_KEYS
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # bf16 dense, per device
# Tokens per device whose fp32 logits exist at once in the loss (8192 x 50k x 4 B = 1.6 GB).
LOGIT_CHUNK_TOKENS = 8192
CHECKPOINTS = "checkpoints"
SUMMARY = "summary.json"


@dataclasses.dataclass(frozen=True)
class Options:
    """The validated trainer options; one field per DEFAULTS key."""
    run_name: str | None
    output_dir: str
    per_device_train_batch_size: int
    per_device_eval_batch_size: int | None
    gradient_accumulation_steps: int
    learning_rate: float
    num_train_epochs: float
    max_steps: int
    warmup_ratio: float
    warmup_steps: int
    weight_decay: float
    lr_scheduler_type: str
    adam_beta1: float
    adam_beta2: float
    adam_epsilon: float
    max_grad_norm: float
    bf16: bool
    gradient_checkpointing: bool
    block_size: int | None
    remat_policy: str
    scan_layers: bool
    attention_implementation: str
    logging_steps: int
    eval_steps: int
    save_steps: int
    save_total_limit: int | None
    early_stopping_patience: int | None
    early_stopping_threshold: float
    max_nonfinite_steps: int
    seed: int
    data_seed: int | None
    mesh: dict
    distributed: dict | None
    export_hf: bool
    report_to: list
    push_to_hub: bool
    hub_model_id: str | None
    hub_private_repo: bool | None
    hub_strategy: str


# ---------------------------------------------------------------- configuration

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


def resolve_options(train: Mapping[str, Any], model_cfg: Mapping[str, Any]) -> Options:
    """Typed trainer options with defaults filled in; the message of any error names the key."""
    values = dict(DEFAULTS)
    values.update({k: v for k, v in train.items() if k in DEFAULTS})
    problem = original_experiments.check_values(train)
    if problem:
        raise ConfigError(problem)
    # Block length = min(block_size, max_seq_length), as the original's run_clm (both checked in config).
    values["block_size"] = block_length(train)
    values["report_to"] = reporting.resolve_report_to(values["report_to"])
    for key, default in DEFAULTS.items():
        v = values[key]
        if v is None or default is None:
            continue
        ok = (isinstance(v, bool) if isinstance(default, bool) else
              isinstance(v, int) and not isinstance(v, bool) if isinstance(default, int) else
              isinstance(v, (int, float)) and not isinstance(v, bool) if isinstance(default, float) else
              isinstance(v, type(default)))
        if not ok:
            raise ConfigError(f"config key '{key}': expected {type(default).__name__}, got {v!r}")
    for key in ("per_device_train_batch_size", "gradient_accumulation_steps", "logging_steps", "eval_steps",
                "save_steps", "per_device_eval_batch_size", "save_total_limit", "block_size"):
        if values[key] is not None and (not isinstance(values[key], int) or values[key] <= 0):
            raise ConfigError(f"config key '{key}': must be a positive integer, got {values[key]!r}")
    if values["data_seed"] is not None and (isinstance(values["data_seed"], bool) or not isinstance(values["data_seed"], int)):
        raise ConfigError(f"config key 'data_seed': expected int, got {values['data_seed']!r}")
    if values["lr_scheduler_type"] not in SCHEDULES:
        raise ConfigError(f"config key 'lr_scheduler_type': must be one of {', '.join(SCHEDULES)}, "
                          f"got {values['lr_scheduler_type']!r}")
    if values["remat_policy"] not in ("full", "dots"):
        raise ConfigError(f"config key 'remat_policy': must be 'full' or 'dots', got {values['remat_policy']!r}")
    if values["attention_implementation"] not in ATTENTION_IMPLEMENTATIONS:
        raise ConfigError(f"config key 'attention_implementation': must be one of "
                          f"{', '.join(ATTENTION_IMPLEMENTATIONS)}, got {values['attention_implementation']!r}")
    if not 0.0 <= values["warmup_ratio"] <= 1.0:
        raise ConfigError(f"config key 'warmup_ratio': must be in [0, 1], got {values['warmup_ratio']}")
    for key, ok, want in (("learning_rate", lambda v: v >= 0, ">= 0"), ("weight_decay", lambda v: v >= 0, ">= 0"),
                          ("adam_beta1", lambda v: 0 <= v < 1, "in [0, 1)"),
                          ("adam_beta2", lambda v: 0 <= v < 1, "in [0, 1)"),
                          ("adam_epsilon", lambda v: v > 0, "> 0"), ("max_grad_norm", lambda v: v > 0, "> 0"),
                          ("warmup_steps", lambda v: v >= 0, ">= 0"), ("max_nonfinite_steps", lambda v: v >= 0, ">= 0")):
        if not ok(values[key]):  # also false for NaN
            raise ConfigError(f"config key '{key}': must be {want}, got {values[key]!r}")
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
    if values["distributed"] is not None and not isinstance(values["distributed"], dict):
        raise ConfigError("config key 'distributed': must be an object "
                          "{coordinator_address, num_processes, process_id}")
    return Options(**values)


def load_run_config(config: Mapping[str, Any] | str | os.PathLike, overrides: Mapping[str, Any] | None = None,
                    notes: list | None = None) -> tuple[dict, dict, Options, dict]:
    """(model-key dict as written, validated model config, options, raw training keys).
    Lines for the log (settings supplied for a recognised original experiment) go to `notes`."""
    raw = dict(config) if isinstance(config, Mapping) else read_json(config)
    raw = apply_overrides(raw, overrides or {})
    raw, note = original_experiments.complete(raw)
    if note and notes is not None:
        notes.append(note)
    model_raw = {k: v for k, v in raw.items() if k not in TRAINING_KEYS}
    train = {k: v for k, v in raw.items() if k in TRAINING_KEYS}
    if train.get("model_name_or_path"):
        model_raw, train = pretrained.merge_config(model_raw, train)
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


# ---------------------------------------------------------------- the jitted steps

def split_micro(x, accum: int):
    """[G, ...] -> [accum, G/accum, ...] taking every accum-th row, so that each device's
    contiguous slice of the batch holds rows of every micro-batch (no data movement)."""
    return jnp.swapaxes(x.reshape(x.shape[0] // accum, accum, *x.shape[1:]), 0, 1)


def lm_loss_sums(module, params, hidden, targets, batch_devices: int = 1):
    """(nll sum, token count, correct count) of the tied head on hidden states [B, T, d],
    in chunks of about LOGIT_CHUNK_TOKENS tokens per device."""
    rows = max(1, hidden.shape[0] // batch_devices)
    chunk_len = max(1, min(hidden.shape[1], LOGIT_CHUNK_TOKENS // rows))
    return ops.chunked_cross_entropy(hidden, params["transformer"]["wte"]["embedding"], targets,
                                     module.cfg["vocab_size"], chunk_len)


def make_train_step(module, tx, schedule, mesh, param_shardings, *, accum: int, seed: int, interleaved: bool):
    """(state, batch) -> (state, metrics). The loss is the token mean over the whole global batch,
    computed from sums so it is exact under accumulation and any sharding."""
    micro_sharding = NamedSharding(mesh, P(None, sharding.BATCH_AXES))
    batch_devices = sharding.batch_size_multiple(mesh)

    def loss_sums(params, batch, key):
        k_dropout, k_diffusion = jax.random.split(key)
        hidden = module.apply({"params": params}, batch["input_ids"], interleaved=interleaved, deterministic=False,
                              return_hidden=True, rngs={"dropout": k_dropout, "diffusion": k_diffusion})
        nll, count, correct = lm_loss_sums(module, params, hidden, batch["targets"], batch_devices)
        return nll, (count, correct)

    grad_sums = jax.value_and_grad(loss_sums, has_aux=True)

    def step(state, batch):
        params = state["params"]
        # Separate stream from the init key; per step (and micro-batch) so a resume replays it.
        key = jax.random.fold_in(jax.random.split(jax.random.PRNGKey(seed))[1], state["step"])
        micro = jax.lax.with_sharding_constraint(jax.tree.map(lambda x: split_micro(x, accum), batch),
                                                 micro_sharding)

        def accumulate(carry, xs):
            grads, nll, count, correct = carry
            i, mb = xs
            (n, (c, k)), g = grad_sums(params, mb, jax.random.fold_in(key, i))
            grads = jax.lax.with_sharding_constraint(jax.tree.map(jnp.add, grads, g), param_shardings)
            return (grads, nll + n, count + c, correct + k), None

        zeros = jax.lax.with_sharding_constraint(jax.tree.map(jnp.zeros_like, params), param_shardings)
        init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))
        (grads, nll, count, correct), _ = jax.lax.scan(accumulate, init, (jnp.arange(accum), micro))
        denom = jnp.maximum(count, 1).astype(jnp.float32)
        grads = jax.tree.map(lambda g: g / denom, grads)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        loss, grad_norm = nll / denom, optax.global_norm(grads)
        # A non-finite loss or gradient never reaches the parameters: the update is skipped
        # (parameters and moments kept) and counted; the trainer stops after too many in a row.
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        def keep(new, old):
            return jnp.where(finite, new, old)

        bad = jnp.where(finite, 0, state["bad_steps"] + 1)
        new_state = {"step": state["step"] + 1,
                     "params": jax.tree.map(keep, optax.apply_updates(params, updates), params),
                     "opt_state": jax.tree.map(keep, opt_state, state["opt_state"]),
                     "bad_steps": bad, "skipped_steps": state["skipped_steps"] + (~finite).astype(jnp.int32)}
        metrics = {"loss": loss, "accuracy": correct / denom, "grad_norm": grad_norm,
                   "learning_rate": schedule(state["step"]), "tokens": count, "bad_steps": bad,
                   "skipped_steps": new_state["skipped_steps"]}
        return new_state, metrics


    return step


def jit_train_step(module, tx, schedule, mesh, state_shardings, **kw):
    """make_train_step compiled for the mesh; the old state's buffers are donated to the new one."""
    return jax.jit(make_train_step(module, tx, schedule, mesh, state_shardings["params"], **kw),
                   in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
                   out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=0)


def make_eval_step(module, *, interleaved: bool, batch_devices: int = 1):
    """(params, batch) -> {group: (nll sum, token count, correct count)}; duo-predict adds its
    next-token (even indices) and fill-in (odd indices) groups."""
    def step(params, batch):
        hidden = module.apply({"params": params}, batch["input_ids"], interleaved=interleaved, return_hidden=True)
        t = batch["targets"]

        def sums(h, t):
            return lm_loss_sums(module, params, h, t, batch_devices)

        if not interleaved:
            return {"": sums(hidden, t)}
        # The whole sequence's sums are the two groups' sums: the head runs once per position.
        groups = {"next_": sums(hidden[:, 0::2], t[:, 0::2]), "fill_": sums(hidden[:, 1::2], t[:, 1::2])}
        return {"": jax.tree.map(jnp.add, groups["next_"], groups["fill_"]), **groups}
    return step


def eval_metrics(sums: Mapping[str, np.ndarray]) -> dict:
    out = {}
    for group, (nll, count, correct) in sums.items():
        loss = float(nll / max(count, 1))
        out[f"eval_{group}loss"] = loss
        out[f"eval_{group}perplexity"] = math.exp(min(loss, 700.0))
        out[f"eval_{group}accuracy"] = float(correct / max(count, 1))
    return out


# ---------------------------------------------------------------- state

def init_state(module, tx, mesh, seed: int):
    """(state, state shardings): fp32 parameters initialised like `flax_gpt2v.init(cfg, seed)`,
    created directly in their shards."""
    def create(key):
        params = init_params(module, key)
        # bad_steps: non-finite steps in a row up to this one; skipped_steps: all of them.
        return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params),
                "bad_steps": jnp.zeros((), jnp.int32), "skipped_steps": jnp.zeros((), jnp.int32)}

    shapes = jax.eval_shape(create, jax.random.PRNGKey(seed))
    axes = param_axes(module)
    shardings = {"step": sharding.replicated(mesh), "bad_steps": sharding.replicated(mesh),
                 "skipped_steps": sharding.replicated(mesh),
                 "params": sharding.tree_shardings(shapes["params"], axes, mesh),
                 "opt_state": sharding.tree_shardings(shapes["opt_state"], axes, mesh, optimizer=True)}
    state = jax.jit(create, out_shardings=shardings)(jax.random.PRNGKey(seed))
    return state, shardings


def abstract_state(state, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


def host_params(params):
    """The full parameters as numpy on every host (a collective when several hosts share them)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        return multihost_utils.process_allgather(params, tiled=True)
    return jax.device_get(params)


def global_batch(local: Mapping[str, np.ndarray], batch_sharding) -> dict:
    """This host's rows -> arrays over the whole mesh."""
    n = jax.process_count()
    return {k: jax.make_array_from_process_local_data(batch_sharding, np.asarray(v),
                                                      (v.shape[0] * n, *v.shape[1:]))
            for k, v in local.items()}


# ---------------------------------------------------------------- logging

class MetricsLog:
    """metrics.jsonl (+ the `report_to` backends); written by process 0 only."""

    def __init__(self, opts: Options, restored_step: int, run_config: dict, log: Callable[[str], None]):
        self.active = jax.process_index() == 0
        self.path = os.path.join(opts.output_dir, "metrics.jsonl")
        self.backends = []
        if not self.active:
            return
        if os.path.exists(self.path):
            # Lines past the restored step were written by the lost part of an interrupted run;
            # a line that does not parse was torn by a crash or a full disk while being written.
            keep, torn = [], 0
            with open(self.path) as f:
                for line in f:
                    try:
                        record = json.loads(line) if line.strip() else None
                    except json.JSONDecodeError:
                        torn += 1
                        continue
                    if record is not None and record["step"] <= restored_step:
                        keep.append(line if line.endswith("\n") else line + "\n")
            if torn:
                log(f"{self.path}: dropped {torn} unreadable (torn) line{'s' * (torn > 1)}")
            tmp = self.path + ".tmp"
            with open(tmp, "w") as f:
                f.writelines(keep)
            os.replace(tmp, self.path)
        self.file = open(self.path, "a")
        self.backends = reporting.open_backends(opts.report_to, opts.output_dir, run_config, log, restored_step)

    def write(self, record: dict) -> None:
        if not self.active:
            return
        record = strict_json(record)
        self.file.write(json.dumps(record, allow_nan=False) + "\n")
        self.file.flush()
        for backend in self.backends:
            backend.log(record)

    def close(self) -> None:
        if self.active:
            self.file.close()
            for backend in self.backends:
                backend.close()


def strict_json(record: Mapping[str, Any]) -> dict:
    """The record with NaN and infinities as null: metrics.jsonl and summary.json stay strict JSON."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}


def flops_per_token(cfg: Mapping[str, Any], num_params: int, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the matmuls forward and backward, plus attention
    scores and values (12 L T d; PaLM's appendix B)."""
    return 6.0 * num_params + 12.0 * cfg["n_layer"] * seq_len * cfg["n_embd"]


def peak_flops(device) -> float | None:
    kind = getattr(device, "device_kind", "")
    return next((v for k, v in PEAK_FLOPS.items() if k in kind), None)


# ---------------------------------------------------------------- the run

def init_distributed(opts: Options) -> None:
    """Join a multi-host run when the config or the JAX_COORDINATOR_ADDRESS environment asks."""
    dist = dict(opts.distributed or {})
    env = {"coordinator_address": "JAX_COORDINATOR_ADDRESS", "num_processes": "JAX_NUM_PROCESSES",
           "process_id": "JAX_PROCESS_ID"}
    for key, var in env.items():
        if key not in dist and var in os.environ:
            dist[key] = os.environ[var] if key == "coordinator_address" else int(os.environ[var])
    if not dist:
        return
    unknown = set(dist) - set(env)
    if unknown:
        raise ConfigError(f"config key 'distributed.{sorted(unknown)[0]}': unknown; expected {', '.join(env)}")
    jax.distributed.initialize(**dist)


def _check_output_dir(opts: Options, model_cfg: dict) -> dict | None:
    """The saved run_config ({} if none) when output_dir holds a run to resume, else None. Refuses a
    directory whose model it would replace, and resuming with another model (model_type named first)."""
    out = opts.output_dir
    resuming = os.path.isdir(os.path.join(out, CHECKPOINTS)) and bool(os.listdir(os.path.join(out, CHECKPOINTS)))
    saved = os.path.join(out, "run_config.json")
    if resuming and os.path.exists(saved):
        saved_run = read_json(saved)
        before = saved_run.get("model")
        if not isinstance(before, dict):
            raise ConfigError(f"{saved} has no 'model' object, so it was not written by this trainer; "
                              "restore it or use another output_dir")
        changed = sorted(k for k in set(before) | set(model_cfg) if before.get(k) != model_cfg.get(k))
        if changed:
            key = "model_type" if "model_type" in changed else changed[0]
            raise ConfigError(f"config key '{key}': differs from the run in {out} being resumed "
                              f"({before.get(key)!r} there); use another output_dir")
        return saved_run
    if checkpoint.is_native(out) and not os.path.exists(saved):
        raise ConfigError(f"config key 'output_dir': {out} holds a model that is not from a training run; "
                          "refusing to overwrite it")
    return {} if resuming else None


def _record_changes(before: dict, run_config: dict, step: int, log) -> dict:
    """run_config with `history` carried on from `before` plus, when trainer or data options
    changed since, an entry {step, changed: {key: [old, new]}}; each change is announced."""
    if not before:  # checkpoints without a run_config.json: nothing to compare with
        return run_config
    history = list(before.get("history", []))
    changed = {}
    for section in ("train", "data"):
        old, new = before.get(section, {}), run_config[section]
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key):
                changed[key] = [old.get(key), new.get(key)]
                log(f"resuming at step {step} with {key} changed: {old.get(key)!r} -> {new.get(key)!r}")
    if changed:
        history.append({"step": step, "changed": changed})
    return {**run_config, "history": history} if history else run_config


def train(config: Mapping[str, Any] | str | os.PathLike, overrides: Mapping[str, Any] | None = None, *,
          prepared=None, log: Callable[[str], None] | None = None) -> dict:
    """Train (or resume) the run a config describes; returns the summary (steps, metrics, tokens/s, MFU).

    `prepared` (a PreparedData) skips `data.prepare_data`, e.g. for in-memory corpora. Holds the
    output_dir's lock while it runs; raises run_guard.RunStopped when a signal or divergence stops it.
    """
    from tqdm import tqdm

    notes = []
    model_raw, model_cfg, opts, train_keys = load_run_config(config, overrides, notes)
    init_distributed(opts)
    is_main = jax.process_index() == 0
    log = log or (lambda msg: tqdm.write(msg) if is_main else None)
    lock = run_guard.RunLock(opts.output_dir)
    signals = run_guard.StopSignals()
    signals.install()
    try:
        with quiet_orbax():
            return _run(model_raw, model_cfg, opts, train_keys, prepared, log, signals, lock, notes)
    finally:
        lock.release()
        signals.restore()


def _take_lock(lock: run_guard.RunLock, opts: Options, log) -> None:
    """Process 0 locks output_dir; every process refuses together, so none waits for the others."""
    failure = None
    if jax.process_index() == 0:
        try:
            lock.acquire(log)
        except ConfigError as e:
            failure = e
    if run_guard.agree(int(failure is not None)):
        raise failure or ConfigError(f"config key 'output_dir': {opts.output_dir} is in use by another run")


def _run(model_raw, model_cfg, opts: Options, train_keys, prepared, log, signals, lock, notes) -> dict:
    from tqdm import tqdm

    from flax_gpt2v.data import pipeline as data

    is_main = jax.process_index() == 0
    hub = HubPush(opts, train_keys.get("hub_token"), log, active=is_main)
    notes.append(original_experiments.no_effect_line(k for k in train_keys if k in IGNORED_KEYS))
    for note in filter(None, notes):
        log(note)

    mesh = sharding.make_mesh(opts.mesh)
    shards = sharding.batch_size_multiple(mesh)
    micro_batch = opts.per_device_train_batch_size * shards
    batch_size = micro_batch * opts.gradient_accumulation_steps
    eval_batch_size = (opts.per_device_eval_batch_size or opts.per_device_train_batch_size) * shards
    for name, size in (("per_device_train_batch_size", batch_size), ("per_device_eval_batch_size", eval_batch_size)):
        if size % jax.process_count():
            raise ConfigError(f"config key '{name}': global batch {size} is not divisible by "
                              f"{jax.process_count()} hosts")

    if prepared is None:
        cache_dir = train_keys.get("cache_dir") or os.path.join(os.path.expanduser("~"), ".cache", "flax_gpt2v")
        prepared = data.prepare_data({**train_keys, "block_size": opts.block_size, "model_type": model_cfg["model_type"]},
                                     cache_dir, log=log)
    model_cfg = fit_to_tokenizer(model_raw, train_keys, prepared.tokenizer)
    _take_lock(lock, opts, log)  # before the first read or write of output_dir
    saved_run = _check_output_dir(opts, model_cfg)
    os.makedirs(opts.output_dir, exist_ok=True)
    # The data keys too, so that eval_jax.py measures a run on the data it was trained for.
    run_config = {"model": model_cfg, "train": dataclasses.asdict(opts),
                  "data": {k: v for k, v in train_keys.items() if k in DATA_KEYS}}
    if is_main:
        prepared.tokenizer.save(opts.output_dir)

    tokenizer_dir = opts.output_dir if checkpoint.has_tokenizer(opts.output_dir) else None
    num_blocks = len(prepared.train)
    if num_blocks < batch_size:
        raise ConfigError(f"config key 'per_device_train_batch_size': a step needs {batch_size} blocks, "
                          f"the training set has {num_blocks}")
    batches = data.BatchSchedule(num_blocks, batch_size, opts.seed if opts.data_seed is None else opts.data_seed,
                                 jax.process_index(), jax.process_count())
    total = opts.max_steps if opts.max_steps > 0 else math.ceil(opts.num_train_epochs * batches.steps_per_epoch)
    if opts.warmup_steps > total:  # max_steps was checked in resolve_options; the epochs' steps are known here
        raise ConfigError(f"config key 'warmup_steps': {opts.warmup_steps} is longer than the run ({total} steps)")
    warmup = opts.warmup_steps if opts.warmup_steps > 0 else math.ceil(opts.warmup_ratio * total)
    schedule = lr_schedule(opts.lr_scheduler_type, opts.learning_rate, warmup, total)
    tx = adamw(schedule, opts.weight_decay, opts.adam_beta1, opts.adam_beta2, opts.adam_epsilon, opts.max_grad_norm)

    interleaved = variant_of(model_cfg).interleaved
    module = build_model(model_cfg, dtype=jnp.bfloat16 if opts.bf16 else jnp.float32,
                         remat=opts.remat_policy if opts.gradient_checkpointing else "none",
                         scan=opts.scan_layers, attention=opts.attention_implementation)
    state, state_shardings = init_state(build_model(model_cfg), tx, mesh, opts.seed)
    num_params = count_params(model_cfg)
    batch_sharding = sharding.batch_sharding(mesh)
    train_step = jit_train_step(module, tx, schedule, mesh, state_shardings, accum=opts.gradient_accumulation_steps,
                                seed=opts.seed, interleaved=interleaved)
    eval_step = jax.jit(make_eval_step(module, interleaved=interleaved,
                                       batch_devices=sharding.batch_size_multiple(mesh)),
                        in_shardings=(state_shardings["params"], batch_sharding),
                        out_shardings=sharding.replicated(mesh))

    ckpts = RunCheckpoints(os.path.join(opts.output_dir, CHECKPOINTS), opts.save_total_limit, log)
    # Early-stopping state travels with the checkpoint, so a resume continues the same count.
    meta = {"best_eval_loss": None, "bad_evals": 0, "stopped": False}
    start = 0
    restored = ckpts.restore(abstract_state(state, state_shardings)) if saved_run is not None else None
    if restored is not None:
        state, meta = restored
        start = int(jax.device_get(state["step"]))
        log(f"resumed from {opts.output_dir}/{CHECKPOINTS} at step {start}")
        run_config = _record_changes(saved_run, run_config, start, log)
    elif train_keys.get("model_name_or_path"):  # a resumed run continues from its own checkpoints instead
        state["params"] = pretrained.place(pretrained.initial_params(
            train_keys, model_cfg, host_params(state["params"]), opts.seed, log), state_shardings["params"])
    if is_main:
        with open(os.path.join(opts.output_dir, "run_config.json"), "w") as f:
            json.dump(run_config, f, indent=2, sort_keys=True)

    metrics_log = MetricsLog(opts, start, run_config, log)
    log(f"{model_cfg['model_type']}: {num_params / 1e6:.2f}M parameters, mesh {dict(mesh.shape)}, "
        f"{len(jax.devices())} devices; {total} steps of {batch_size} x {opts.block_size} tokens, "
        f"{batches.steps_per_epoch} steps/epoch, warmup {warmup}")

    def evaluate(params, step):
        if prepared.validation is None or len(prepared.validation) == 0:
            return {}
        sums = {}
        for local in data.eval_batches(prepared.validation, eval_batch_size, model_cfg,
                                       jax.process_index(), jax.process_count()):
            out = jax.device_get(eval_step(params, global_batch(local, batch_sharding)))
            for group, values in out.items():
                sums[group] = sums.get(group, 0) + np.asarray(values, np.float64)
        record = {"step": step, **eval_metrics(sums)}
        metrics_log.write(record)
        log(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
        return record

    def save(step):
        # A step inside a run of non-finite ones is not checkpointed: the newest checkpoint is always
        # one whose step was finite, so save_total_limit never evicts the last finite one.
        if int(jax.device_get(state["bad_steps"])):
            log(f"checkpoint of step {step} skipped: its loss or gradient is not finite")
            return
        ckpts.save(step, state, meta)
        if hub.every_save and step < total and not meta["stopped"]:  # the last goes with the final export
            hub.push_checkpoint(step, model_cfg, host_params(state["params"]), tokenizer_dir)

    def diverged(m, step):
        """(first, last) step of the non-finite ones in a row that `step` (its metrics m) ends, when too many."""
        bad = int(m["bad_steps"])
        if not opts.max_nonfinite_steps or bad < opts.max_nonfinite_steps:
            return None
        return step - bad + 1, step

    bar = tqdm(total=total, initial=start, disable=not is_main, dynamic_ncols=True, desc=opts.run_name)
    timed_tokens, timed_seconds, t_mark, tokens_since, paused = 0, 0.0, None, 0, 0.0
    seq_len = last_eval = None
    done, pending, stop, code = start, None, None, 0  # pending: the previous step's metrics, read one step late
    signals.in_loop = True
    for step in range(start, total):
        # Every process stops at the same step: the stop code is agreed on (max over processes).
        code = run_guard.agree(signals.received or (255 if ckpts.poll() else 0))
        if meta["stopped"] or code:
            break
        batch = global_batch(data.make_batch(prepared.train, batches.indices(step), model_cfg), batch_sharding)
        seq_len = batch["input_ids"].shape[1]
        state, metrics = train_step(state, batch)
        done = step + 1
        if pending is not None:  # read after dispatching this step, so the device never waits
            stop = diverged(jax.device_get(pending), done - 1)
            if stop:
                break
        pending = {k: metrics[k] for k in ("bad_steps",)}
        bar.update(1)
        tokens_since += batch["input_ids"].size
        if done % opts.logging_steps == 0 or done == total:
            m = jax.device_get(metrics)
            now = time.perf_counter()
            # The first interval holds compilation; throughput counts the ones after it.
            tps = None
            if t_mark is not None:
                seconds = now - t_mark - paused
                timed_tokens, timed_seconds, tps = timed_tokens + tokens_since, timed_seconds + seconds, tokens_since / seconds
            t_mark, tokens_since, paused = now, 0, 0.0
            record = {"step": done, "epoch": round(done / batches.steps_per_epoch, 4),
                      "loss": float(m["loss"]), "accuracy": float(m["accuracy"]),
                      "grad_norm": float(m["grad_norm"]), "learning_rate": float(m["learning_rate"])}
            if m["skipped_steps"]:
                record["skipped_steps"] = int(m["skipped_steps"])
            metrics_log.write(record)
            bar.set_postfix(loss=f"{float(m['loss']):.4f}", tok_s=f"{tps:.0f}" if tps else "-")
        if done % opts.eval_steps == 0 or done == total:
            eval_start = time.perf_counter()
            last_eval = evaluate(state["params"], done)
            loss = last_eval.get("eval_loss")
            if loss is not None and math.isfinite(loss):
                best = meta["best_eval_loss"]
                if best is None or (loss < best and best - loss > opts.early_stopping_threshold):
                    meta.update(best_eval_loss=loss, bad_evals=0)
                    params = host_params(state["params"])
                    if is_main:
                        checkpoint.save_native(os.path.join(opts.output_dir, "best"), model_cfg, params,
                                               tokenizer_dir=tokenizer_dir, overwrite=True)
                else:
                    meta["bad_evals"] += 1
                    if opts.early_stopping_patience and meta["bad_evals"] >= opts.early_stopping_patience:
                        meta["stopped"] = True
                        log(f"early stopping at step {done}: eval loss has not improved on "
                            f"{meta['best_eval_loss']:.4f} for {meta['bad_evals']} evaluations")
            paused += time.perf_counter() - eval_start  # evaluation is not training throughput
        if done % opts.save_steps == 0 or done == total or meta["stopped"]:
            save(done)
    else:
        if pending is not None:
            stop = diverged(jax.device_get(pending), done)
    bar.close()
    if not stop and done < total and not meta["stopped"]:  # a signal during the last step stops nothing
        code = run_guard.agree(code or signals.received or 0)
    if code and code != 255 and done > start and done not in (ckpts.last_saved, ckpts.pending):
        save(done)  # the step a signal interrupted: checkpointed before stopping
    try:
        ckpts.finish()
    finally:
        ckpts.close()
        metrics_log.close()
    if stop:
        kept = f"checkpoint step {ckpts.last_saved}" if ckpts.last_saved is not None else "no checkpoint yet"
        raise run_guard.RunStopped(
            f"training diverged: loss or gradient not finite at steps {stop[0]}-{stop[1]} (updates skipped; the "
            f"last finite state is in {kept}); try a lower learning_rate, longer warmup, a smaller max_grad_norm, "
            "or bf16 false", run_guard.DIVERGED_STATUS)
    if code == 255:
        raise checkpoint.CheckpointError("stopped: another process failed to write a checkpoint; "
                                         "run the same command to resume")
    if code:
        name = signal.Signals(code).name
        who = "" if signals.received else " (on another process)"
        kept = f"step {ckpts.last_saved}" if ckpts.last_saved is not None else "no checkpoint"
        at = f"at step {done}" if ckpts.last_saved == done else f"at step {done} (last checkpoint: {kept})"
        raise run_guard.RunStopped(f"stopped by {name}{who} {at}; run the same command to resume", 128 + code)

    final_step = int(jax.device_get(state["step"]))
    params = host_params(state["params"])
    summary_path = os.path.join(opts.output_dir, SUMMARY)
    if final_step == start and os.path.exists(summary_path):
        # Rerunning a finished run trains nothing and measures nothing: its summary, final model and
        # export (written before the summary) stand, and nothing is pushed again.
        log(f"done: the run in {opts.output_dir} had already ended at step {final_step}")
        with open(summary_path) as f:
            return json.load(f)
    if is_main:
        save_final(opts, model_cfg, params, log)
        hub.push_final(os.path.join(opts.output_dir, "hf"))
    summary = {"step": final_step, "num_params": num_params,
               "tokens_per_s": timed_tokens / timed_seconds if timed_seconds else None, "mfu": None}
    if last_eval:
        summary.update(last_eval)
    peak = peak_flops(jax.devices()[0])
    if summary["tokens_per_s"] and peak and seq_len:
        summary["mfu"] = summary["tokens_per_s"] * flops_per_token(model_cfg, num_params, seq_len) / (
            peak * len(jax.devices()))
    tps = f"{summary['tokens_per_s']:.0f} tokens/s" if summary["tokens_per_s"] else "tokens/s n/a (too few steps)"
    mfu = f", MFU {summary['mfu']:.1%}" if summary["mfu"] is not None else ""
    log(f"done: step {final_step}, {tps}{mfu}; model in {opts.output_dir}")
    log(what_was_trained(model_cfg, num_params, final_step, prepared, last_eval))
    if is_main:
        # Timings stay out of metrics.jsonl (a resumed run must write the same lines); they live here.
        with open(summary_path, "w") as f:
            json.dump(strict_json(summary), f, indent=2, allow_nan=False)
    return summary


def what_was_trained(model_cfg: dict, num_params: int, steps: int, prepared, last_eval: dict | None) -> str:
    """The run's last line: what was trained, on what, and what its perplexity means."""
    def count(n):
        return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}K" if n >= 1e3 else str(n)

    line = (f"trained {model_cfg['model_type']} ({model_cfg['n_layer']} layers, d {model_cfg['n_embd']}, "
            f"{count(num_params)} params) for {steps} steps on {prepared.source} "
            f"({count(prepared.train.size)} training tokens)")
    if not last_eval or "eval_perplexity" not in last_eval:
        return f"{line}; not evaluated"
    line += f"; eval perplexity {last_eval['eval_perplexity']:.1f} on {count(prepared.validation.size)} held-out tokens"
    if "eval_next_perplexity" in last_eval:  # duo-predict: both groups; the next-token one is GPT-2's kind
        line += (f" (next-token {last_eval['eval_next_perplexity']:.1f}, "
                 f"fill-in {last_eval['eval_fill_perplexity']:.1f})")
    tokenizer = prepared.tokenizer.source
    if tokenizer == "gpt2":
        return line + " - per GPT-2 token, the unit of GPT-2's published perplexities (on this text, not theirs)"
    return line + f" - per token of the {tokenizer} tokenizer, not comparable with GPT-2's perplexities"


def save_final(opts: Options, model_cfg: dict, params, log) -> None:
    """Native checkpoint in output_dir itself (beside checkpoints/, best/, ...), then the HF export."""
    out = opts.output_dir
    # save_native replaces a whole directory, so it writes a staging one whose files move in.
    staging = os.path.join(out, f".final-{uuid.uuid4().hex[:8]}")
    checkpoint.save_native(staging, model_cfg, params)
    for name in os.listdir(staging):
        os.replace(os.path.join(staging, name), os.path.join(out, name))
    shutil.rmtree(staging)
    if opts.export_hf:
        try:
            checkpoint.save_hf_dir(os.path.join(out, "hf"), model_cfg, params, force=True,
                                   tokenizer_dir=out if checkpoint.has_tokenizer(out) else None)
        except ImportError as e:  # torch is optional for training
            log(f"HF export skipped: {e}")
