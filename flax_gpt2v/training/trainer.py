"""The trainer: the original's recipe (docs/training.md) as a loop of named phases over the jitted step.

`train(config)` reads an experiment file (the original's keys; options.py), prepares the data, and
trains with AdamW + warmup/decay, gradient clipping, accumulation, periodic evaluation with early
stopping, asynchronous Orbax checkpoints and automatic resumption from `<output_dir>/checkpoints`.
A `Run` is set up once, then each step is: the step, logging, evaluation and early stopping, saving;
then the run finishes (stop reasons, final model, summary). The global step is the whole training
position: batches (BatchSchedule) and dropout keys are pure functions of it, so a resumed run
repeats an uninterrupted one exactly. The steps themselves are steps.py; what a run survives
(signals, non-finite steps, damaged checkpoints, a second run, a full disk) lives in run_guard.py
and run_checkpoints.py (README has the table); what it writes in output_dir, run_files.py.

Layout of `<output_dir>`: checkpoints/ (Orbax, the last `save_total_limit`, each
step with its sha256.json), best/ (native checkpoint with the lowest eval loss),
metrics.jsonl, tb/ (TensorBoard), run_config.json, .lock while a run holds it, and
at the end the final native checkpoint (config.json + flax_params.safetensors +
tokenizer files) and hf/ (HF export).
"""
from __future__ import annotations

import dataclasses
import math
import os
import signal
import time
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from flax_gpt2v import durable
from flax_gpt2v.config import ConfigError
from flax_gpt2v.data import pipeline as data
from flax_gpt2v.hf import checkpoint
from flax_gpt2v.hf.hub import HubPush
from flax_gpt2v.hf.keymap import num_params as count_params
from flax_gpt2v.models import build_model, variant_of
from flax_gpt2v.training import cluster, harness, original_experiments, pretrained, run_guard, sharding
from flax_gpt2v.training.options import (DATA_KEYS, IGNORED_KEYS, TrainOptions, fit_to_tokenizer,
                                         load_run_config)
from flax_gpt2v.training.run_checkpoints import RunCheckpoints, disk_errno
from flax_gpt2v.training.run_files import (CHECKPOINTS, RUN_CONFIG, SUMMARY, MetricsLog, check_output_dir,
                                           check_same_tokens, record_changes, remove_partial_writes, save_final,
                                           strict_json, what_was_trained)
from flax_gpt2v.training.schedule import run_optimizer
from flax_gpt2v.training.steps import (abstract_state, create_state, eval_loop, eval_metrics, flops_per_token,
                                       global_batch, host_params, jit_eval_step, peak_flops, run_train_step)


def train(config: Mapping[str, Any] | str | os.PathLike, overrides: Mapping[str, Any] | None = None, *,
          prepared=None, log: Callable[[str], None] | None = None, exit_at_once: bool = False) -> dict:
    """Train (or resume) the run a config describes; returns the summary (steps, metrics, tokens/s, MFU).

    `prepared` (a PreparedData) skips `data.prepare_data`, e.g. for in-memory corpora. Holds the
    output_dir's lock while it runs; raises run_guard.RunStopped when a signal or divergence stops it.
    `exit_at_once`: a signal before training or while finishing ends the process at once (the command
    line's choice, run_guard.StopSignals); without it, as from a notebook, the process lives on.
    """
    from tqdm import tqdm

    notes = []
    model_raw, model_cfg, opts, train_keys = load_run_config(config, overrides, notes)
    # Every process says where it stands in a multi-host run; later lines come from process 0 only.
    cluster.initialize(opts.distributed, opts.distributed_timeout, log or tqdm.write)
    is_main = jax.process_index() == 0
    log = log or (lambda msg: tqdm.write(msg) if is_main else None)
    lock = run_guard.RunLock(opts.output_dir)
    signals = run_guard.StopSignals(on_exit=lock.release, exit_at_once=exit_at_once)
    signals.install()
    run = None
    try:
        run = Run(model_raw, model_cfg, opts, train_keys, prepared, log, signals, lock, notes)
        run.loop()
        return run.finish()
    except OSError as e:
        if disk_errno(e) is None:
            raise
        # A full disk under output_dir outside a checkpoint (those say so themselves): metrics.jsonl,
        # run_config.json, best/, the final model. Orbax's own errors name no file.
        where = e.filename or opts.output_dir
        raise OSError(e.errno, f"disk full while writing {where} ({e.strerror}); free space and run the same "
                               "command to resume") from None
    finally:
        if run is not None:
            run.close()
        lock.release()
        signals.restore()


class Throughput:
    """Training tokens per second over the logging intervals after the first (which holds compilation),
    evaluation time left out."""

    def __init__(self, tokens: int = 0, seconds: float = 0.0):
        self.tokens, self.seconds = tokens, seconds  # over the timed intervals (a resumed run's too)
        self.mark, self.since, self.paused = None, 0, 0.0  # the current interval

    def interval(self) -> float | None:
        """Ends the current interval; its tokens per second, None for the first."""
        now, tps = time.perf_counter(), None
        if self.mark is not None:
            seconds = now - self.mark - self.paused
            self.tokens, self.seconds, tps = self.tokens + self.since, self.seconds + seconds, self.since / seconds
        self.mark, self.since, self.paused = now, 0, 0.0
        return tps

    def count(self, tokens: int) -> None:
        self.since += tokens

    def pause(self, seconds: float) -> None:
        self.paused += seconds

    @property
    def rate(self) -> float | None:
        return self.tokens / self.seconds if self.seconds else None


class Run:
    """One training run: set up in the constructor, then `loop()` (step, log, evaluate-and-early-stop,
    save) and `finish()` (why it stopped, the final model and summary)."""

    def __init__(self, model_raw, model_cfg, opts: TrainOptions, train_keys, prepared, log, signals, lock, notes):
        from tqdm import tqdm

        self.opts, self.train_keys, self.log, self.signals, self.lock = opts, train_keys, log, signals, lock
        self.is_main = jax.process_index() == 0
        self.hub = HubPush(opts, train_keys.get("hub_token"), log, active=self.is_main)
        notes.append(original_experiments.no_effect_line(k for k in train_keys if k in IGNORED_KEYS))
        for note in filter(None, notes):
            log(note)
        self._setup_mesh()
        self.prepared = prepared if prepared is not None else self._prepare_data(model_cfg)
        self.model_cfg = fit_to_tokenizer(model_raw, train_keys, self.prepared.tokenizer)
        _take_lock(lock, opts, log)  # before the first read or write of output_dir
        saved_run = self._setup_output_dir()
        self._setup_schedule()
        self._setup_model()
        self._setup_harness()
        self._restore(saved_run)
        self.metrics_log = MetricsLog(opts, self.start, self.run_config, log)
        log(f"{self.model_cfg['model_type']}: {self.num_params / 1e6:.2f}M parameters, mesh {dict(self.mesh.shape)}, "
            f"{len(jax.devices())} devices; {self.total} steps of {self.batch_size} x {opts.block_size} tokens, "
            f"{self.batches.steps_per_epoch} steps/epoch, warmup {self.warmup}")
        self.bar = tqdm(total=self.total, initial=self.start, disable=not self.is_main, dynamic_ncols=True,
                        desc=opts.run_name)
        self.done, self.code = self.start, 0
        self.pending = None  # the previous step's bad_steps, read one step late
        self.stop = None  # (first, last) non-finite step when the run diverged
        self.lock_lost = None  # why, when the lock stopped keeping other runs out
        self.closed = False

    # ------------------------------------------------------------ setup

    def _setup_mesh(self) -> None:
        opts = self.opts
        self.mesh = sharding.make_mesh(opts.mesh)
        shards = sharding.batch_size_multiple(self.mesh)
        self.batch_size = opts.per_device_train_batch_size * shards * opts.gradient_accumulation_steps
        self.eval_batch_size = (opts.per_device_eval_batch_size or opts.per_device_train_batch_size) * shards
        for name, size in (("per_device_train_batch_size", self.batch_size),
                           ("per_device_eval_batch_size", self.eval_batch_size)):
            if size % jax.process_count():
                raise ConfigError(f"config key '{name}': global batch {size} is not divisible by "
                                  f"{jax.process_count()} hosts")
        self.batch_sharding = sharding.batch_sharding(self.mesh)

    def _prepare_data(self, model_cfg):
        keys = self.train_keys
        cache_dir = keys.get("cache_dir") or os.path.join(os.path.expanduser("~"), ".cache", "flax_gpt2v")
        return data.prepare_data({**keys, "block_size": self.opts.block_size, "model_type": model_cfg["model_type"]},
                                 cache_dir, log=self.log)

    def _setup_output_dir(self) -> dict | None:
        """The saved run_config to resume (check_output_dir); writes the tokenizer, builds this run_config."""
        opts = self.opts
        saved_run = check_output_dir(opts, self.model_cfg)
        # The data keys too, so that eval_jax.py measures a run on the data it was trained for, and the
        # tokens' identity, so that a resume knows what it resumes.
        self.run_config = {"model": self.model_cfg, "train": dataclasses.asdict(opts),
                           "data": {k: v for k, v in self.train_keys.items() if k in DATA_KEYS},
                           "tokens": data.tokens_identity(self.prepared)}
        check_same_tokens(saved_run, self.run_config, self.train_keys.get("accept_data_change"), self.log)
        os.makedirs(opts.output_dir, exist_ok=True)
        if self.is_main:
            self.prepared.tokenizer.save(opts.output_dir, model_max_length=self.model_cfg["n_positions"])
        self.tokenizer_dir = opts.output_dir if checkpoint.has_tokenizer(opts.output_dir) else None
        if self.is_main:
            remove_partial_writes(opts.output_dir, self.log)
        return saved_run

    def _setup_schedule(self) -> None:
        opts = self.opts
        num_blocks = len(self.prepared.train)
        if num_blocks < self.batch_size:
            raise ConfigError(f"config key 'per_device_train_batch_size': a step needs {self.batch_size} blocks, "
                              f"the training set has {num_blocks}")
        self.batches = data.BatchSchedule(num_blocks, self.batch_size,
                                          opts.seed if opts.data_seed is None else opts.data_seed,
                                          jax.process_index(), jax.process_count())
        self.total = (opts.max_steps if opts.max_steps > 0 else
                      math.ceil(opts.num_train_epochs * self.batches.steps_per_epoch))
        if opts.warmup_steps > self.total:  # max_steps was checked in resolve_options; the epochs' steps are known here
            raise ConfigError(f"config key 'warmup_steps': {opts.warmup_steps} is longer than the run "
                              f"({self.total} steps)")
        self.warmup = opts.warmup_steps if opts.warmup_steps > 0 else math.ceil(opts.warmup_ratio * self.total)
        self.schedule, self.tx = run_optimizer(opts, self.warmup, self.total)

    def _setup_model(self) -> None:
        opts, cfg = self.opts, self.model_cfg
        module, _, self.state_shardings, self.train_step = run_train_step(cfg, opts, self.tx, self.schedule,
                                                                          self.mesh)
        self.state = create_state(build_model(cfg), self.tx, self.state_shardings, opts.seed)
        self.num_params = count_params(cfg)
        self.eval_step = jit_eval_step(module, self.mesh, self.state_shardings["params"],
                                       interleaved=variant_of(cfg).interleaved)
        self.eval_module = module

    def _setup_harness(self) -> None:
        """The eval_harness_tasks, checked before training starts; lm-eval is imported only when set."""
        self.harness = self.harness_tasks = None
        opts = self.opts
        if not opts.eval_harness_tasks:
            return
        hf_tokenizer = getattr(self.prepared.tokenizer, "hf", None)
        if hf_tokenizer is None:
            raise ConfigError("config key 'eval_harness_tasks': the harness needs a Hugging Face tokenizer, and "
                              f"this run's is {self.prepared.tokenizer!r}")
        self.harness_tasks = harness.resolve_tasks(opts.eval_harness_tasks, None, "config key 'eval_harness_tasks'")
        # The eval step's module (plain layout, the run's compute dtype) on the training mesh; the
        # parameters are the current ones at each evaluation.
        self.harness = harness.make_harness_lm(self.eval_module, None, hf_tokenizer, self.model_cfg, self.mesh,
                                               self.eval_batch_size, progress=False)

    def _restore(self, saved_run: dict | None) -> None:
        """Resume from the run's checkpoints, or start from model_name_or_path; writes run_config.json."""
        opts = self.opts
        self.ckpts = RunCheckpoints(os.path.join(opts.output_dir, CHECKPOINTS), opts.save_total_limit, self.log)
        # Early-stopping state travels with the checkpoint, so a resume continues the same count.
        self.meta = {"best_eval_loss": None, "bad_evals": 0, "stopped": False}
        self.start = 0
        self.throughput, self.seq_len, self.last_eval = Throughput(), None, None
        restored = (self.ckpts.restore(abstract_state(self.state, self.state_shardings))
                    if saved_run is not None else None)
        if restored is not None:
            self.state, self.meta = restored
            self.start = int(jax.device_get(self.state["step"]))
            # What the summary reports travels with the checkpoint too: a run killed while writing its
            # final files, resumed, still reports its last evaluation and throughput.
            tokens, seconds = self.meta.pop("throughput", (0, 0.0))
            self.throughput = Throughput(tokens, seconds)
            self.seq_len, self.last_eval = self.meta.pop("seq_len", None), self.meta.pop("last_eval", None)
            self.log(f"resumed from {opts.output_dir}/{CHECKPOINTS} at step {self.start}")
            self.run_config = record_changes(saved_run, self.run_config, self.start, self.log)
        elif self.train_keys.get("model_name_or_path"):  # a resumed run continues from its own checkpoints instead
            self.state["params"] = pretrained.place(pretrained.initial_params(
                self.train_keys, self.model_cfg, host_params(self.state["params"]), opts.seed, self.log),
                self.state_shardings["params"])
        if self.is_main:
            durable.write_json(os.path.join(opts.output_dir, RUN_CONFIG), self.run_config, indent=2, sort_keys=True)

    # ------------------------------------------------------------ the loop

    def loop(self) -> None:
        """Train until the last step, early stopping, divergence or a stop signal (agreed by every process)."""
        self.signals.enter("loop")
        for step in range(self.start, self.total):
            # Every process stops at the same step: the stop code is agreed on (max over processes).
            self.code = run_guard.agreed_stop(step, self.opts.save_steps, self.stop_code())
            if self.meta["stopped"] or self.code:
                break
            metrics = self.step(step)
            if self.pending is not None:  # read after dispatching this step, so the device never waits
                self.stop = self.diverged(jax.device_get(self.pending), self.done - 1)
                if self.stop:
                    break
            self.pending = {k: metrics[k] for k in ("bad_steps",)}
            self.bar.update(1)
            if self.due(self.opts.logging_steps):
                self.log_metrics(metrics)
            if self.due(self.opts.eval_steps):
                self.evaluate_and_early_stop()
            if self.due(self.opts.save_steps) or self.meta["stopped"]:
                self.save(self.done)
        else:
            if self.pending is not None:
                self.stop = self.diverged(jax.device_get(self.pending), self.done)
        self.bar.close()

    def stop_code(self) -> int:
        """This process's reason to stop before the next step (run_guard's codes), 0 for none."""
        if self.signals.received:
            return self.signals.received
        if self.ckpts.poll():
            return run_guard.FAILED_SAVE
        self.lock_lost = self.lock.lost(self.log)
        return run_guard.LOCK_LOST if self.lock_lost else 0

    def due(self, every: int) -> bool:
        return self.done % every == 0 or self.done == self.total

    def step(self, step: int) -> dict:
        local = data.make_batch(self.prepared.train, self.batches.indices(step), self.model_cfg)
        batch = global_batch(local, self.batch_sharding)
        self.seq_len = batch["input_ids"].shape[1]
        self.state, metrics = self.train_step(self.state, batch)
        self.done = step + 1
        self.throughput.count(batch["input_ids"].size)
        return metrics

    def diverged(self, m, step: int) -> tuple[int, int] | None:
        """(first, last) step of the non-finite ones in a row that `step` (its metrics m) ends, when too many."""
        bad = int(m["bad_steps"])
        if not self.opts.max_nonfinite_steps or bad < self.opts.max_nonfinite_steps:
            return None
        return step - bad + 1, step

    def log_metrics(self, metrics) -> None:
        m = jax.device_get(metrics)
        tps = self.throughput.interval()
        done = self.done
        record = {"step": done, "epoch": round(done / self.batches.steps_per_epoch, 4),
                  "loss": float(m["loss"]), "accuracy": float(m["accuracy"]),
                  "grad_norm": float(m["grad_norm"]), "learning_rate": float(m["learning_rate"])}
        if m["skipped_steps"]:
            record["skipped_steps"] = int(m["skipped_steps"])
        self.metrics_log.write(record)
        self.bar.set_postfix(loss=f"{float(m['loss']):.4f}", tok_s=f"{tps:.0f}" if tps else "-")

    def evaluate(self) -> dict:
        """The eval metrics of the current parameters and the eval_harness_tasks' ({} without either), logged."""
        record = {}
        validation = self.prepared.validation
        if validation is not None and len(validation):
            batches = (global_batch(local, self.batch_sharding) for local in data.eval_batches(
                validation, self.eval_batch_size, self.model_cfg, jax.process_index(), jax.process_count()))
            record.update(eval_metrics(eval_loop(self.eval_step, self.state["params"], batches)))
        if self.harness is not None:
            self.harness.params = self.state["params"]
            results = harness.run_tasks(self.harness, self.harness_tasks, limit=self.opts.eval_harness_limit,
                                        bootstrap_iters=0)  # no standard errors: they are not logged
            record.update(harness.metric_record(results))
        if not record:
            return {}
        record = {"step": self.done, **record}
        self.metrics_log.write(record)
        self.log(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
        return record

    def evaluate_and_early_stop(self) -> None:
        """Evaluate; a better eval loss goes to best/, too many evaluations without one stop the run."""
        eval_start = time.perf_counter()
        self.last_eval = self.evaluate()
        loss, meta, opts = self.last_eval.get("eval_loss"), self.meta, self.opts
        if loss is not None and math.isfinite(loss):
            best = meta["best_eval_loss"]
            if best is None or (loss < best and best - loss > opts.early_stopping_threshold):
                meta.update(best_eval_loss=loss, bad_evals=0)
                params = host_params(self.state["params"])
                if self.is_main:
                    checkpoint.save_native(os.path.join(opts.output_dir, "best"), self.model_cfg, params,
                                           tokenizer_dir=self.tokenizer_dir, overwrite=True)
            else:
                meta["bad_evals"] += 1
                if opts.early_stopping_patience and meta["bad_evals"] >= opts.early_stopping_patience:
                    meta["stopped"] = True
                    self.log(f"early stopping at step {self.done}: eval loss has not improved on "
                             f"{meta['best_eval_loss']:.4f} for {meta['bad_evals']} evaluations")
        self.throughput.pause(time.perf_counter() - eval_start)  # evaluation is not training throughput

    def save(self, step: int) -> None:
        # A step inside a run of non-finite ones is not checkpointed: the newest checkpoint is always
        # one whose step was finite, so save_total_limit never evicts the last finite one.
        if int(jax.device_get(self.state["bad_steps"])):
            self.log(f"checkpoint of step {step} skipped: its loss or gradient is not finite")
            return
        self.ckpts.save(step, self.state, {**self.meta, "last_eval": self.last_eval, "seq_len": self.seq_len,
                                           "throughput": [self.throughput.tokens, self.throughput.seconds]})
        if self.hub.every_save and step < self.total and not self.meta["stopped"]:  # the last goes with the final export
            self.hub.push_checkpoint(step, self.model_cfg, host_params(self.state["params"]), self.tokenizer_dir)

    # ------------------------------------------------------------ the end

    def finish(self) -> dict:
        """Checkpoint and report a stop (raising RunStopped or CheckpointError), else the final model and summary."""
        self._close()
        final_step = int(jax.device_get(self.state["step"]))
        params = host_params(self.state["params"])  # a collective: every process, before any may return
        self.signals.enter("finishing")  # everything is checkpointed: a signal now exits at once
        summary_path = os.path.join(self.opts.output_dir, SUMMARY)
        # A damaged summary (a power loss) is missing: the final model and summary are written again.
        saved = durable.read_derived_json(summary_path, self.log) if final_step == self.start else None
        if saved is not None:
            # Rerunning a finished run trains nothing and measures nothing: its summary, final model and
            # export (written durably before the summary) stand, and nothing is pushed again.
            self.log(f"done: the run in {self.opts.output_dir} had already ended at step {final_step}")
            return saved
        if self.is_main:
            save_final(self.opts, self.model_cfg, params, self.log)
            self.hub.push_final(os.path.join(self.opts.output_dir, "hf"))
        summary = self._summary(final_step)
        if self.is_main:
            # Timings stay out of metrics.jsonl (a resumed run must write the same lines); they live here.
            durable.write_json(summary_path, strict_json(summary), indent=2, allow_nan=False)
        return summary

    def _close(self) -> None:
        """Agree on a late stop signal, checkpoint the step it interrupted, wait for the checkpoints, and
        raise why the run stopped early, if it did."""
        ckpts, done = self.ckpts, self.done
        if not self.stop:  # a signal during the last step too: the run stops once that step is checkpointed
            self.code = run_guard.agree(self.code or self.signals.received or 0)
        if (self.code not in (0, run_guard.FAILED_SAVE, run_guard.LOCK_LOST) and done > self.start
                and done not in (ckpts.last_saved, ckpts.pending)):
            self.save(done)  # the step a signal interrupted: checkpointed before stopping
        try:
            ckpts.finish()
        finally:
            self.close()  # here, as every process passes here at once: Orbax's close is a collective
        saved = ckpts.last_saved is not None
        if self.stop:
            raise run_guard.RunStopped(self._diverged_line(), run_guard.DIVERGED_STATUS)
        if self.code == run_guard.FAILED_SAVE:
            raise checkpoint.CheckpointError("stopped: another process failed to write a checkpoint; "
                                             "run the same command to resume")
        if self.code == run_guard.LOCK_LOST:
            why = self.lock_lost or "process 0 lost the lock of output_dir"
            kept = f"its last checkpoint is step {ckpts.last_saved}" if saved else "it has no checkpoint"
            raise ConfigError(f"stopped at step {done}: {why}; {kept}; make sure no other run uses "
                              f"{self.opts.output_dir}, then run the same command to resume")
        if self.code:
            name = signal.Signals(self.code).name
            who = "" if self.signals.received else " (on another process)"
            kept = f"step {ckpts.last_saved}" if saved else "no checkpoint"
            at = f"at step {done}" if ckpts.last_saved == done else f"at step {done} (last checkpoint: {kept})"
            raise run_guard.RunStopped(f"stopped by {name}{who} {at}; run the same command to resume", 128 + self.code)

    def close(self) -> None:
        """However the run ends, its pending checkpoint lands (none is left half-written) and its files close."""
        if not self.closed:
            self.closed = True
            self.ckpts.close()
            self.metrics_log.close()

    def _diverged_line(self) -> str:
        """Why the run diverged. From the first step this run took, the parameters it started from are the
        suspects, not the learning rate: they are not finite, or (a fresh start) not one update was made."""
        (first, last), saved = self.stop, self.ckpts.last_saved
        kept = f"checkpoint step {saved}" if saved is not None else "no checkpoint yet"
        steps = f"training diverged: loss or gradient not finite at steps {first}-{last}"
        if first == self.start + 1:
            if self.start:
                source, fix = f"the parameters restored from checkpoint step {self.start}", \
                    f"remove {self.ckpts.step_dir(self.start)} to resume from the checkpoint before it"
            elif self.train_keys.get("model_name_or_path"):
                source, fix = f"the parameters of model_name_or_path {self.train_keys['model_name_or_path']}", \
                    "use another checkpoint, or bf16 false"
            else:
                source, fix = (f"the initial parameters (initializer_range {self.model_cfg.get('initializer_range')})",
                               "lower initializer_range (GPT-2's is 0.02), or bf16 false")
            finite = all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(self.state["params"]))
            if not finite:
                return f"{steps}: {source} are not finite, so no step could be; {fix}"
            if not self.start:
                return (f"{steps}: from the first step on, before any update, so not because of the learning "
                        f"rate: {source} overflow; {fix}")
        return (f"{steps} (updates skipped; the last finite state is in {kept}); try a lower learning_rate, longer "
                "warmup, a smaller max_grad_norm, or bf16 false")

    def _summary(self, final_step: int) -> dict:
        """summary.json's figures (steps, last eval, tokens/s, MFU), also logged."""
        summary = {"step": final_step, "num_params": self.num_params, "tokens_per_s": self.throughput.rate,
                   "mfu": None}
        if self.last_eval:
            summary.update(self.last_eval)
        peak = peak_flops(jax.devices()[0])
        if summary["tokens_per_s"] and peak and self.seq_len:
            summary["mfu"] = summary["tokens_per_s"] * flops_per_token(self.model_cfg, self.num_params,
                                                                       self.seq_len) / (peak * len(jax.devices()))
        tps = f"{summary['tokens_per_s']:.0f} tokens/s" if summary["tokens_per_s"] else "tokens/s n/a (too few steps)"
        mfu = f", MFU {summary['mfu']:.1%}" if summary["mfu"] is not None else ""
        self.log(f"done: step {final_step}, {tps}{mfu}; model in {self.opts.output_dir}")
        self.log(what_was_trained(self.model_cfg, self.num_params, final_step, self.prepared, self.last_eval))
        return summary


def _take_lock(lock: run_guard.RunLock, opts: TrainOptions, log) -> None:
    """Process 0 locks output_dir; every process refuses together, so none waits for the others."""
    failure = None
    if jax.process_index() == 0:
        try:
            lock.acquire(log)
        except ConfigError as e:
            failure = e
    if run_guard.agree(int(failure is not None)):
        raise failure or ConfigError(f"config key 'output_dir': {opts.output_dir} is in use by another run")


