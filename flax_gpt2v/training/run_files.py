"""What a run writes in its output_dir besides the Orbax checkpoints: metrics.jsonl (and the report_to
backends), run_config.json and its history of changed options and data, the final model and its HF export,
summary.json and the run's last log line; and the check that output_dir holds this run or none.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from typing import Any, Callable, Mapping

import jax

from flax_gpt2v import durable
from flax_gpt2v.config import ConfigError, read_json
from flax_gpt2v.hf import checkpoint
from flax_gpt2v.training import reporting
from flax_gpt2v.training.options import TrainOptions

CHECKPOINTS = "checkpoints"
SUMMARY = "summary.json"
RUN_CONFIG = "run_config.json"


class MetricsLog:
    """metrics.jsonl (+ the `report_to` backends); written by process 0 only."""

    def __init__(self, opts: TrainOptions, restored_step: int, run_config: dict, log: Callable[[str], None]):
        self.active = jax.process_index() == 0
        self.path = os.path.join(opts.output_dir, "metrics.jsonl")
        self.backends = []
        if not self.active:
            return
        if os.path.exists(self.path):
            # Lines past the restored step were written by the lost part of an interrupted run;
            # a line that does not parse was torn by a crash or a full disk while being written.
            keep, torn = [], 0
            with open(self.path, encoding="utf-8", errors="replace") as f:
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
            durable.write_file(self.path, lambda f: f.writelines(keep))
        self.file = open(self.path, "a", encoding="utf-8")
        self.backends = reporting.open_backends(opts.report_to, opts.output_dir, run_config, log, restored_step)

    def write(self, record: dict) -> None:
        if not self.active:
            return
        record = strict_json(record)
        self.file.write(json.dumps(record, allow_nan=False) + "\n")
        self.file.flush()
        # On disk before any later checkpoint: a resume keeps every line up to its step.
        os.fsync(self.file.fileno())
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


def check_output_dir(opts: TrainOptions, model_cfg: dict) -> dict | None:
    """The saved run_config ({} if none) when output_dir holds a run to resume, else None. Refuses a
    directory whose model it would replace, and resuming with another model (model_type named first)."""
    out = opts.output_dir
    resuming = os.path.isdir(os.path.join(out, CHECKPOINTS)) and bool(os.listdir(os.path.join(out, CHECKPOINTS)))
    saved = os.path.join(out, RUN_CONFIG)
    if resuming and os.path.exists(saved):
        try:
            saved_run = read_json(saved)
        except ConfigError as e:  # not rebuilt: it holds the run's history of changed options
            raise ConfigError(f"{e}; it is this run's record: restore it, or delete it to resume without "
                              "its history of changed options") from None
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


def check_same_tokens(before: dict | None, run_config: dict, accept, log) -> None:
    """Refuses to resume a run whose data's tokens (run_config's `tokens`: each split's SHA-256 from
    the token cache) changed since it was checkpointed (the same train_file, other contents is most
    likely a mistake), unless `accept` (the accept_data_change key): then the change is announced,
    and record_changes keeps it in the history."""
    if not isinstance(accept, (bool, type(None))):
        raise ConfigError(f"config key 'accept_data_change': expected true or false, got {accept!r}")
    old, new = (before or {}).get("tokens"), run_config["tokens"]
    if not old:  # a new run, or one recorded before the tokens were
        return
    changed = [split for split in new if (old.get(split) or {}).get("sha256") != new[split]["sha256"]]
    if not changed:
        return
    def tokens(ident):
        return f"{ident.get('blocks')} blocks, sha256 {str(ident.get('sha256'))[:12]}"

    what = "; ".join(f"{split}: {tokens(old.get(split) or {})} then, {tokens(new[split])} now" for split in changed)
    out = run_config["train"]["output_dir"]
    if not accept:
        raise ConfigError(f"the data changed since the run in {out} was checkpointed ({what}); restore it, use "
                          "another output_dir, or resume on the new data with --accept_data_change true")
    log(f"accept_data_change: resuming {out} on changed data ({what})")


def record_changes(before: dict, run_config: dict, step: int, log) -> dict:
    """run_config with `history` carried on from `before` plus, when trainer or data options or the
    data's tokens changed since, an entry {step, changed: {key: [old, new]}}; each change is announced."""
    if not before:  # checkpoints without a run_config.json: nothing to compare with
        return run_config
    history = list(before.get("history", []))
    changed = {}
    for section in ("train", "data", "tokens"):
        if section not in before:  # written by a trainer that did not record it
            continue
        old, new = before[section], run_config[section]
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key):
                name = f"tokens.{key}" if section == "tokens" else key
                changed[name] = [old.get(key), new.get(key)]
                log(f"resuming at step {step} with {name} changed: {old.get(key)!r} -> {new.get(key)!r}")
    if changed:
        history.append({"step": step, "changed": changed})
    return {**run_config, "history": history} if history else run_config


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


def remove_partial_writes(out: str, log) -> None:
    """Remove what a run killed while writing best/, the final model or hf/ left: each is written whole
    in a `.<name>.partial-...` directory (hf/checkpoint.py, durable.move_into) that then moves into place,
    and every file under a `durable.partial_name` until it is renamed."""
    for name in sorted(os.listdir(out)):
        if name.startswith(".") and ".partial-" in name:
            path = os.path.join(out, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:  # a file durable.write_file had not renamed yet
                os.remove(path)
            log(f"removed {path}, left by a run stopped while writing it")


def save_final(opts: TrainOptions, model_cfg: dict, params, log) -> None:
    """Native checkpoint in output_dir itself (beside checkpoints/, best/, ...), then the HF export."""
    out = opts.output_dir
    # save_native replaces a whole directory, so it writes a staging one whose files move in.
    durable.move_into(out, lambda staging: checkpoint.save_native(staging, model_cfg, params))
    if opts.export_hf:
        try:
            checkpoint.save_hf_dir(os.path.join(out, "hf"), model_cfg, params, force=True,
                                   tokenizer_dir=out if checkpoint.has_tokenizer(out) else None)
        except ImportError as e:  # torch is optional for training
            log(f"HF export skipped: {e}")
