"""Faults injected for real into training runs: signals, non-finite losses, flipped bytes on disk,
a second process on the same output_dir, a full filesystem (issue 12)."""
from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest
import safetensors.numpy

import eval_jax
import flax_gpt2v as fg
from flax_gpt2v.training import options, pretrained, run_checkpoints, run_guard
from flax_gpt2v.training import trainer as tr
from flax_gpt2v.errors import error_line
from flax_gpt2v.hf.checkpoint import NATIVE_WEIGHTS, CheckpointError
from flax_gpt2v.config import ConfigError

from helpers import ROOT, TESTS, corpus, read_metrics, tiny_config

# train_jax.py's own main() in a fresh process, on the test corpus (the CLI reads data from the config).
CLI_RUN = """
import sys
sys.path.insert(0, {tests!r}); sys.path.insert(0, {root!r})
import helpers as t
import train_jax
from flax_gpt2v.data import pipeline as data
from flax_gpt2v.training import trainer as tr
{hook}
real_train = tr.train
tr.train = lambda config, overrides, **kw: real_train(config, overrides, prepared=t.corpus(), **kw)
sys.exit(train_jax.main(["--config", {config!r}]))
"""
# Constant learning rate: a resumed run may change max_steps and still repeat an uninterrupted one.
LONG = dict(max_steps=100000, logging_steps=1, save_steps=1000, eval_steps=1000, lr_scheduler_type="constant",
            warmup_steps=0, per_device_train_batch_size=4)


def start_cli(tmp_path, out, hook="", **extra):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(tiny_config("gpt2", out, **extra)))
    script = CLI_RUN.format(tests=TESTS, root=ROOT, config=str(config), hook=hook)
    return subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, "JAX_PLATFORMS": "cpu"})


def wait_for_step(proc, out, step):
    """Block until metrics.jsonl holds `step` (the process is then inside the training loop)."""
    path = out / "metrics.jsonl"
    while True:
        if path.exists() and any(json.loads(line)["step"] >= step for line in path.read_text().splitlines()
                                 if line.endswith("}")):
            return
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.2)


def strict_lines(path):
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")
    return [json.loads(line, parse_constant=refuse) for line in open(path)]


def tensorboard_events(directory):
    """Every event of the TensorBoard files under directory (TFRecord: length, crc, event, crc)."""
    from tensorboardX.proto import event_pb2
    events = []
    for path in sorted(directory.rglob("events.out.tfevents.*")):
        raw = path.read_bytes()
        i = 0
        while i < len(raw):
            n = int.from_bytes(raw[i:i + 8], "little")
            events.append(event_pb2.Event.FromString(raw[i + 12:i + 12 + n]))
            i += 12 + n + 4
    return events


def assert_same_params(a, b):
    for x, y in zip(jax.tree.leaves(fg.load(a).params), jax.tree.leaves(fg.load(b).params)):
        np.testing.assert_array_equal(x, y)


# ---------------------------------------------------------------- signals

@pytest.mark.slow
def test_sigterm_checkpoints_the_step_and_a_resume_repeats_the_run(tmp_path):
    out, ref = tmp_path / "run", tmp_path / "ref"
    # Saves every other step: the stop step is either saved at the signal or already being saved.
    proc = start_cli(tmp_path, out, **{**LONG, "save_steps": 2, "save_total_limit": 1})
    wait_for_step(proc, out, 3)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate()
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "Traceback" not in err
    m = re.fullmatch(r"stopped by SIGTERM at step (\d+); run the same command to resume", err.strip().splitlines()[-1])
    assert m, err[-2000:]
    n = int(m.group(1))
    assert sorted(os.listdir(out / "checkpoints")) == [str(n)]
    assert run_checkpoints.verify(str(out / "checkpoints" / str(n))) is None
    assert (out / "checkpoints" / str(n) / run_checkpoints.MANIFEST).exists()
    assert max(r["step"] for r in read_metrics(out)) == n

    # Resumed with a changed option (announced, kept in run_config.json), it repeats an uninterrupted run.
    lines = []
    tr.train(tiny_config("gpt2", out, **{**LONG, "max_steps": n + 2}), prepared=corpus(), log=lines.append)
    assert f"resumed from {out}/checkpoints at step {n}" in lines
    assert f"resuming at step {n} with max_steps changed: 100000 -> {n + 2}" in lines
    assert f"resuming at step {n} with save_steps changed: 2 -> 1000" in lines
    history = json.loads((out / "run_config.json").read_text())["history"]
    assert history == [{"step": n, "changed": {"max_steps": [100000, n + 2], "save_steps": [2, 1000],
                                               "save_total_limit": [1, None]}}]
    tr.train(tiny_config("gpt2", ref, **{**LONG, "max_steps": n + 2}), prepared=corpus(), log=lambda m: None)
    assert read_metrics(out) == read_metrics(ref)
    assert_same_params(out, ref)


SIGNAL_AT = """
import os, signal
indices = data.BatchSchedule.indices
def signalling_indices(self, step):
    if step == {step}:
        os.kill(os.getpid(), signal.SIGTERM)
    return indices(self, step)
data.BatchSchedule.indices = signalling_indices
"""


@pytest.mark.slow
def test_sigterm_during_a_step_that_is_saved_anyway(tmp_path):
    # The signal comes while step 4, a save step, runs: its checkpoint is the one the stop waits for.
    out = tmp_path / "run"
    proc = start_cli(tmp_path, out, hook=SIGNAL_AT.format(step=3), **{**LONG, "save_steps": 2})
    _, err = proc.communicate()
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert err.strip().splitlines()[-1] == "stopped by SIGTERM at step 4; run the same command to resume"
    assert sorted(os.listdir(out / "checkpoints")) == ["2", "4"]
    assert all(run_checkpoints.verify(str(out / "checkpoints" / s)) is None for s in ("2", "4"))


SLOW_CHECKSUMS = """
import time
from flax_gpt2v.training import run_checkpoints
write_manifest = run_checkpoints.write_manifest
def slow_write_manifest(step_dir):
    time.sleep(3)  # a large checkpoint: the stop is still waiting for it when the second signal comes
    write_manifest(step_dir)
run_checkpoints.write_manifest = slow_write_manifest
"""


@pytest.mark.slow
def test_the_lock_outlives_its_file_and_a_second_signal_exits_at_once(tmp_path):
    out = tmp_path / "run"
    proc = start_cli(tmp_path, out, hook=SLOW_CHECKSUMS, **LONG)
    wait_for_step(proc, out, 2)
    # .lock removed by hand: the directory itself is the lock, a second run is still refused, and the holder
    # writes .lock again.
    (out / ".lock").unlink()
    with pytest.raises(ConfigError, match=rf"config key 'output_dir': {out} is in use by another run \((PID "
                                          rf"{proc.pid} on this host .*, running|holder unknown), lock"):
        tr.train(tiny_config("gpt2", out, **LONG), prepared=corpus(), log=lambda m: None)
    while not (out / ".lock").exists() or not (out / ".lock").read_text().endswith("\n"):
        assert proc.poll() is None
        time.sleep(0.1)
    assert (out / ".lock").read_text().split()[1] == str(proc.pid)
    # A second signal 0.3 s after the first, while the stop waits for its checkpoint, exits at once.
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    stdout, err = proc.communicate()
    assert proc.returncode == 128 + signal.SIGINT, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert err.strip().splitlines()[-1] == ("stopped by a second SIGINT without a checkpoint; run the same command "
                                            "to resume from the last one")
    assert f"{out}/.lock was removed; written again (the lock is on {out} itself)" in stdout
    steps = [r["step"] for r in read_metrics(out)]
    assert steps == list(range(1, len(steps) + 1))  # the holder's lines, all of them, and no other run's
    assert not (out / ".lock").exists()


# A signal from inside JAX's tracing of the model's initialisation, right after the lock was taken: the
# moment whose exception once came out of XLA's compile and segfaulted at exit (status 139).
SIGNAL_WHILE_TRACING = """
import os, signal, time
from flax_gpt2v.training import steps
init_params = steps.init_params
def signalling_init_params(module, key):
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.5)  # still tracing when the signal is handled
    return init_params(module, key)
steps.init_params = signalling_init_params
"""


def assert_one_line_exit(proc, status, line):
    _, err = proc.communicate()
    assert proc.returncode == status, err[-3000:]
    for noise in ("Traceback", "Exception ignored", "Fatal Python error"):
        assert noise not in err, err[-3000:]
    assert err.strip().splitlines()[-1] == line, err[-2000:]


@pytest.mark.slow
def test_a_signal_while_compiling_exits_at_once_in_one_line(tmp_path):
    out = tmp_path / "run"
    proc = start_cli(tmp_path, out, hook=SIGNAL_WHILE_TRACING)
    assert_one_line_exit(proc, 128 + signal.SIGTERM, "stopped by SIGTERM before training; run the same command to "
                                                     "resume")
    assert not (out / ".lock").exists()  # released: the next run takes no notice of a dead holder


def test_from_python_a_first_signal_outside_the_loop_leaves_the_process_alive(tmp_path, monkeypatch, capfd):
    """train() from Python (a notebook, whose interrupt must not end the kernel): a SIGINT while the step
    is built stops the run before its first step; one while the final model is written lets
    the final files be finished. Both real signals to this process, each said in one line."""
    acted = threading.Event()
    act = run_guard.StopSignals._act
    monkeypatch.setattr(run_guard.StopSignals, "_act", lambda self, signum: (act(self, signum), acted.set()))

    def interrupting(function):
        def interrupted(*args, **kwargs):
            acted.clear()
            os.kill(os.getpid(), signal.SIGINT)
            assert acted.wait(600)  # the watcher thread has read it
            return function(*args, **kwargs)
        return interrupted

    run = dict(max_steps=4, save_steps=100, eval_steps=100, logging_steps=1, warmup_steps=1)
    with monkeypatch.context() as m:
        m.setattr(tr, "run_train_step", interrupting(tr.run_train_step))
        with pytest.raises(run_guard.RunStopped) as e:
            tr.train(tiny_config("gpt2", tmp_path / "setup", **run), prepared=corpus(), log=lambda s: None)
    assert e.value.status == 128 + signal.SIGINT
    assert str(e.value) == "stopped by SIGINT at step 0 (last checkpoint: no checkpoint); run the same command to resume"
    monkeypatch.setattr(tr, "save_final", interrupting(tr.save_final))
    summary = tr.train(tiny_config("gpt2", tmp_path / "finishing", **run), prepared=corpus(), log=lambda s: None)
    assert summary["step"] == 4 and (tmp_path / "finishing" / NATIVE_WEIGHTS).exists()
    err = capfd.readouterr().err
    assert "SIGINT received: the run stops before its first step; a second signal exits at once" in err
    assert ("SIGINT received: the final model, export and summary are finished first; a second signal exits at "
            "once") in err


# The final files of a finished training, each interrupted: a SIGTERM while the native model is written
# (exits at once: all is checkpointed), then a SIGKILL while hf/ is written on the rerun that finishes them.
SIGNAL_IN_FINAL_WRITE = """
import os, signal, time
import safetensors.numpy, safetensors.torch
def interrupted(save_file, sig):
    def save(tensors, path, **kw):
        save_file(tensors, path, **kw)
        if not os.path.basename(os.path.dirname(path)).startswith(".best"):
            os.kill(os.getpid(), sig)
            time.sleep(60)
    return save
safetensors.{module}.save_file = interrupted(safetensors.{module}.save_file, signal.{sig})
"""


@pytest.mark.slow
def test_a_run_stopped_while_writing_its_final_files_finishes_them_on_the_rerun(tmp_path):
    out = tmp_path / "run"
    opts = dict(max_steps=4, save_steps=2, eval_steps=4, logging_steps=1, warmup_steps=1, export_hf=True)
    proc = start_cli(tmp_path, out, hook=SIGNAL_IN_FINAL_WRITE.format(module="numpy", sig="SIGTERM"), **opts)
    assert_one_line_exit(proc, 128 + signal.SIGTERM, "stopped by SIGTERM while writing the final model, export and "
                         "summary (training is complete and checkpointed); run the same command to write them")
    assert not (out / "summary.json").exists() and not (out / ".lock").exists()
    proc = start_cli(tmp_path, out, hook=SIGNAL_IN_FINAL_WRITE.format(module="torch", sig="SIGKILL"), **opts)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    partial = [p.name for p in out.iterdir() if ".partial-" in p.name]
    assert partial and not (out / "hf").exists() and not (out / "summary.json").exists()

    lines = []
    summary = tr.train(tiny_config("gpt2", out, **opts), prepared=corpus(), log=lines.append)
    assert not [p.name for p in out.iterdir() if ".partial-" in p.name]
    assert all(f"removed {out / name}, left by a run stopped while writing it" in lines for name in partial)
    assert f"resumed from {out}/checkpoints at step 4" in lines
    # The figures measured before the first stop: the final evaluation and tokens/s travel with the checkpoint.
    assert summary["step"] == 4 and summary["eval_loss"] == read_metrics(out)[-1]["eval_loss"]
    assert summary["tokens_per_s"] > 0 and json.loads((out / "summary.json").read_text()) == summary
    assert not lines[-1].endswith("not evaluated")
    assert_same_params(out, out / "hf")


# ---------------------------------------------------------------- divergence

def test_nonfinite_steps_never_reach_parameters_or_files(tmp_path):
    out = tmp_path / "run"
    lines = []
    with pytest.raises(run_guard.RunStopped) as e:
        tr.train(tiny_config("gpt2", out, learning_rate=1e3, warmup_steps=0, max_steps=60, logging_steps=1,
                             save_steps=2, eval_steps=4, save_total_limit=1, max_nonfinite_steps=3),
                 prepared=corpus(), log=lines.append)
    assert e.value.status == run_guard.DIVERGED_STATUS
    msg = str(e.value)
    assert "\n" not in msg and re.match(r"training diverged: loss or gradient not finite at steps (\d+)-(\d+) ", msg)
    assert "learning_rate" in msg and "bf16" in msg
    records = strict_lines(out / "metrics.jsonl")  # strict JSON: non-finite values are null
    assert any(r.get("loss", 0) is None or r.get("grad_norm", 0) is None for r in records)
    skipped = [r for r in records if r.get("skipped_steps")]
    assert skipped and skipped[-1]["skipped_steps"] >= 3
    # The kept checkpoint (save_total_limit 1) is a finite one and restores; best/ is finite.
    steps = os.listdir(out / "checkpoints")
    assert len(steps) == 1 and int(steps[0]) < int(re.match(r".* steps (\d+)-", msg).group(1))
    assert f"the last finite state is in checkpoint step {steps[0]}" in msg
    for x in jax.tree.leaves(fg.load(out / "best").params):
        assert np.isfinite(x).all()
    assert any(line.startswith("checkpoint of step") and "not finite" in line for line in lines)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # initializer_range 1e39 itself
def test_parameters_not_finite_from_the_start_are_named_not_the_learning_rate(tmp_path, monkeypatch):
    run = dict(max_steps=20, logging_steps=1, warmup_steps=1, max_nonfinite_steps=2, save_steps=100)
    # 1e39 overflows float32 at initialisation; 1e30 does not, but the forward pass does.
    for scale, cause in ((1e39, "are not finite, so no step could be"),
                         (1e30, "from the first step on, before any update, so not because of the learning rate: "
                                "the initial parameters (initializer_range 1e+30) overflow")):
        with pytest.raises(run_guard.RunStopped) as e:
            tr.train(tiny_config("gpt2", tmp_path / str(scale), initializer_range=scale, **run), prepared=corpus(),
                     log=lambda m: None)
        assert e.value.status == run_guard.DIVERGED_STATUS
        assert str(e.value).startswith("training diverged: loss or gradient not finite at steps 1-2: ")
        assert cause in str(e.value) and "lower initializer_range" in str(e.value)
        assert "learning_rate" not in str(e.value)
    # A pretrained checkpoint with a NaN: refused before training, naming the parameter.
    ckpt = tmp_path / "nan"
    cfg = options.load_run_config(tiny_config("gpt2", tmp_path / "run"))[1]
    lm = fg.init(cfg, seed=0)
    lm.save(ckpt)
    weights = safetensors.numpy.load_file(ckpt / NATIVE_WEIGHTS)
    weights["transformer/h/ln_2/bias"][0, 3] = np.nan
    safetensors.numpy.save_file(weights, ckpt / NATIVE_WEIGHTS)
    with pytest.raises(CheckpointError, match=rf"model_name_or_path {ckpt}: parameter transformer/h/ln_2/bias holds "
                                              rf"NaN or infinite values \({ckpt}\); the checkpoint is damaged"):
        pretrained.initial_params({"model_name_or_path": str(ckpt)}, cfg, lm.params, 0, lambda m: None)


def test_a_full_disk_under_output_dir_is_named(tmp_path, monkeypatch):
    out = tmp_path / "run"
    write = tr.MetricsLog.write

    def full_at_step_3(self, record):
        if record["step"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device")  # a write names no file
        write(self, record)
    monkeypatch.setattr(tr.MetricsLog, "write", full_at_step_3)
    with pytest.raises(OSError) as e:
        tr.train(tiny_config("gpt2", out, max_steps=6, save_steps=2, logging_steps=1, warmup_steps=1),
                 prepared=corpus(), log=lambda m: None)
    assert error_line(e.value) == (f"error: disk full while writing {out} (No space left on device); free space "
                                   "and run the same command to resume")
    assert run_checkpoints.verify(str(out / "checkpoints" / "2")) is None and not (out / ".lock").exists()


# ---------------------------------------------------------------- integrity and logs

def test_flipped_bytes_and_a_torn_log_line_fall_back_to_an_intact_step(tmp_path):
    out, kept = tmp_path / "run", tmp_path / "kept"
    cfg = tiny_config("gpt2", out, max_steps=4, save_steps=2, eval_steps=2, logging_steps=1, report_to="tensorboard")
    tr.train(cfg, prepared=corpus(), log=lambda m: None)
    shutil.copytree(out, kept)
    # Flip bytes in the largest data file of the latest step; tear the last metrics line.
    data_files = [p for p in (out / "checkpoints" / "4" / "state").rglob("*") if p.is_file()]
    victim = max(data_files, key=lambda p: p.stat().st_size)
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2: len(raw) // 2 + 21] = bytes(b ^ 0xFF for b in raw[len(raw) // 2: len(raw) // 2 + 21])
    victim.write_bytes(bytes(raw))
    text = (out / "metrics.jsonl").read_text()
    (out / "metrics.jsonl").write_text(text + text.splitlines()[-1][:17])
    lines = []
    tr.train(cfg, prepared=corpus(), log=lines.append)
    assert f"checkpoint step 4 is damaged: {victim} does not match its checksum; falling back to the previous one" \
        in lines
    assert f"resumed from {out}/checkpoints at step 2" in lines
    assert any("dropped 1 unreadable (torn) line" in line for line in lines)
    assert read_metrics(out) == read_metrics(kept)
    assert_same_params(out, kept)
    # Each run tells TensorBoard to purge what was written past its restored step: the first from step 1
    # (a fresh start), the resumed one from step 3.
    from tensorboardX.proto import event_pb2
    starts = [e.step for e in tensorboard_events(out / "tb") if e.session_log.status == event_pb2.SessionLog.START]
    assert starts == [1, 3]
    assert json.loads((out / "summary.json").read_text())["eval_loss"] == \
        json.loads((kept / "summary.json").read_text())["eval_loss"]

    # A truncated file in every step: refused in one line that names the step and the file.
    for step in ("2", "4"):
        f = max((p for p in (out / "checkpoints" / step / "state").rglob("*") if p.is_file()),
                key=lambda p: p.stat().st_size)
        f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"no checkpoint is intact .*step 4: .*has 100 bytes.*use a new output_dir") \
            as e:
        tr.train({**cfg, "max_steps": 6}, prepared=corpus(), log=lambda m: None)
    assert "\n" not in str(e.value)


KILL_BEFORE_CHECKSUM = """
import os, signal
from flax_gpt2v.training import run_checkpoints
write_manifest = run_checkpoints.write_manifest
def killing_write_manifest(step_dir):
    if step_dir.endswith("/{step}"):  # Orbax has committed the step; its checksum never comes
        os.kill(os.getpid(), signal.SIGKILL)
    write_manifest(step_dir)
run_checkpoints.write_manifest = killing_write_manifest
"""


@pytest.mark.slow
def test_a_step_killed_before_its_checksum_is_not_trusted(tmp_path):
    # Killed right after step 4's commit, that step then damaged on disk: the resume falls back to step 2.
    out, ref = tmp_path / "run", tmp_path / "ref"
    opts = {**LONG, "max_steps": 6, "save_steps": 2}
    proc = start_cli(tmp_path, out, hook=KILL_BEFORE_CHECKSUM.format(step=4), **opts)
    _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, err[-3000:]
    step4 = out / "checkpoints" / "4"
    assert (step4 / "state").is_dir() and not (step4 / run_checkpoints.MANIFEST).exists()
    victim = max((p for p in (step4 / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2: len(raw) // 2 + 21] = bytes(b ^ 0xFF for b in raw[len(raw) // 2: len(raw) // 2 + 21])
    victim.write_bytes(bytes(raw))
    lines = []
    tr.train(tiny_config("gpt2", out, **opts), prepared=corpus(), log=lines.append)
    assert f"checkpoint step 4 is not trusted: {step4}/{run_checkpoints.MANIFEST} was never written (the run " \
           "stopped before checksumming the step); falling back to the previous one" in lines
    assert f"resumed from {out}/checkpoints at step 2" in lines
    tr.train(tiny_config("gpt2", ref, **opts), prepared=corpus(), log=lambda m: None)
    assert read_metrics(out) == read_metrics(ref)
    assert_same_params(out, ref)


def test_checksums_are_written_beside_the_loop_and_waited_for(tmp_path, monkeypatch):
    out = tmp_path / "run"
    threads = {}
    write_manifest = run_checkpoints.write_manifest

    def slow_write_manifest(step_dir):
        threads[os.path.basename(step_dir)] = threading.current_thread()
        time.sleep(1)  # a large checkpoint: the run's end must still wait for its checksum
        write_manifest(step_dir)
    monkeypatch.setattr(run_checkpoints, "write_manifest", slow_write_manifest)
    tr.train(tiny_config("gpt2", out, max_steps=4, save_steps=2, eval_steps=100, warmup_steps=1), prepared=corpus(),
             log=lambda m: None)
    assert sorted(threads) == ["2", "4"]
    assert all(t is not threading.main_thread() for t in threads.values())
    for step in ("2", "4"):
        assert run_checkpoints.verify(str(out / "checkpoints" / step)) is None


def test_orbax_is_hushed_only_while_checkpoint_io_runs(tmp_path, monkeypatch):
    absl = logging.getLogger("absl")
    level = absl.level
    during, outside = [], []
    write_manifest = run_checkpoints.write_manifest

    def noting_write_manifest(step_dir):
        during.append(absl.isEnabledFor(logging.WARNING))
        write_manifest(step_dir)
    monkeypatch.setattr(run_checkpoints, "write_manifest", noting_write_manifest)
    # The line naming the model comes after the checkpoints are opened and restored, before the loop.
    log = lambda line: outside.append(absl.isEnabledFor(logging.WARNING)) if " parameters, mesh " in line else None
    tr.train(tiny_config("gpt2", tmp_path / "run", max_steps=2, save_steps=2, warmup_steps=1), prepared=corpus(),
             log=log)
    assert during == [False] and outside == [True]
    assert absl.level == level


def test_rerunning_a_finished_run_keeps_its_summary(tmp_path, capsys):
    out = tmp_path / "run"
    cfg = tiny_config("gpt2", out, max_steps=2, save_steps=2, eval_steps=2, warmup_steps=1)
    first = tr.train(cfg, prepared=corpus(), log=lambda m: None)
    final_files = [out / "flax_params.safetensors", out / "config.json"]
    written = [p.stat().st_mtime_ns for p in final_files]
    lines = []
    assert tr.train(cfg, prepared=corpus(), log=lines.append) == first
    assert [p.stat().st_mtime_ns for p in final_files] == written  # the final model is not written again
    assert json.loads((out / "summary.json").read_text()) == first and "eval_loss" in first
    assert not any(line.startswith("resuming at step") for line in lines)  # nothing changed
    with pytest.raises(ConfigError, match=r"config key 'model_type': differs from the run"):
        tr.train({**cfg, **tiny_config("dd-gpt2", out), "n_embd": 64}, prepared=corpus(), log=lambda m: None)

    # Other training data under the same run: refused, nothing written, unless accepted; then kept
    # in the history like a changed option.
    other = corpus()
    other.train = other.train[::-1]
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(ConfigError, match=r"the data changed since the run in .* was checkpointed \(train: "
                                          r"\d+ blocks, sha256 \w+ then, \d+ blocks, sha256 \w+ now\); .*"
                                          r"--accept_data_change true"):
        tr.train(cfg, prepared=other, log=lambda m: None)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before

    # Torn by a power loss (a file written without the durable writer): a zero-byte summary.json is
    # rebuilt by the next run.
    (out / "summary.json").write_bytes(b"")
    lines = []
    summary = tr.train({**cfg, "accept_data_change": True}, prepared=other, log=lines.append)
    assert any(line.startswith("accept_data_change: resuming") for line in lines)
    run = json.loads((out / "run_config.json").read_text())
    assert list(run["history"][-1]["changed"]) == ["tokens.train"] and "accept_data_change" not in run["train"]
    assert any("summary.json is damaged (empty)" in line for line in lines)
    assert json.loads((out / "summary.json").read_text()) == summary and summary["step"] == 2

    # run_config.json is the run's record (its history): damaged, the trainer refuses and says how to go
    # on. eval_jax.py --compare reads past it, a damaged summary and a torn last metrics line.
    (out / "summary.json").write_bytes(b"")
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "lo')
    (out / "run_config.json").write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match=r"run_config.json is not UTF-8 text .* delete it to resume"):
        tr.train(cfg, prepared=other, log=lambda m: None)
    capsys.readouterr()
    assert eval_jax.main(["--compare", str(out), "--plot_dir", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    for damage in ("summary.json is damaged (empty)", "metrics.jsonl: its last line (line",
                   "run_config.json is not UTF-8 text"):
        assert damage in err, err


# ---------------------------------------------------------------- one run per output_dir

HOLDER = """
import sys, time
from flax_gpt2v.training import run_guard
lock = run_guard.RunLock(sys.argv[1])
lock.acquire(print)
print("locked", flush=True)
time.sleep(3600)
"""


def test_a_second_run_on_the_same_output_dir_is_refused(tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], cwd=ROOT, text=True, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ConfigError, match=rf"config key 'output_dir': {out} is in use by another run "
                                              rf"\(PID {holder.pid} on this host \(.*\), running"):
            tr.train(tiny_config("gpt2", out), prepared=corpus(), log=lambda m: None)
        assert sorted(os.listdir(out)) == [".lock"]  # nothing else written
    finally:
        holder.kill()
        holder.wait()
    # The holder died holding the lock: the next run takes it over and says so.
    lines = []
    lock = run_guard.RunLock(str(out))
    lock.acquire(lines.append)
    lock.release()
    assert lines == [f"{out}: taking over the lock of a run that ended without releasing it "
                     f"(PID {holder.pid} on this host ({os.uname().nodename}), no longer running)"]
    assert not (out / ".lock").exists()


def test_a_moved_output_dir_stops_its_run_and_a_lock_file_lock_is_lost_with_its_file(tmp_path, monkeypatch):
    out, moved = tmp_path / "run", tmp_path / "moved"
    indices = tr.data.BatchSchedule.indices

    def moving_indices(self, step):
        if step == 2:  # not a save step: the move is noticed before the next step
            while not (out / "checkpoints" / "2" / run_checkpoints.MANIFEST).exists():  # step 2 has landed
                time.sleep(0.05)
            os.rename(out, moved)
        return indices(self, step)
    monkeypatch.setattr(tr.data.BatchSchedule, "indices", moving_indices)
    with pytest.raises(ConfigError) as e:
        tr.train(tiny_config("gpt2", out, max_steps=6, save_steps=2, logging_steps=1, warmup_steps=1),
                 prepared=corpus(), log=lambda m: None)
    assert str(e.value) == (f"stopped at step 3: {out} was moved or removed while this run was writing to it; its "
                            f"last checkpoint is step 2; make sure no other run uses {out}, then run the same command "
                            "to resume")
    assert not out.exists() and os.listdir(moved / "checkpoints") == ["2"]
    assert run_checkpoints.verify(str(moved / "checkpoints" / "2")) is None
    assert [r["step"] for r in read_metrics(moved)] == [1, 2, 3]

    # Where a directory cannot be flocked (NFS), .lock is the lock, and its removal loses it.
    flock = run_guard.fcntl.flock

    def nfs_flock(f, op):
        if isinstance(f, int):
            raise OSError(errno.EBADF, "Bad file descriptor")
        return flock(f, op)
    monkeypatch.setattr(run_guard.fcntl, "flock", nfs_flock)
    lock = run_guard.RunLock(str(out))
    lock.acquire(print)
    assert lock.dir_fd is None and lock.lost(print) is None
    (out / ".lock").unlink()
    assert lock.lost(print) == (f"{out}/.lock was removed or replaced while this run held it, so another run may "
                                f"now write to {out}")
    lock.release()
    assert not out.exists()


# ---------------------------------------------------------------- a full disk

FILL_DISK = """
indices = data.BatchSchedule.indices
def filling_indices(self, step):
    if step == {fill_at}:
        import os, time
        while not os.path.isdir({committed!r}):  # the checkpoint before lands first
            time.sleep(0.1)
        st = os.statvfs({mount!r})
        with open(os.path.join({mount!r}, "filler"), "wb") as f:
            f.write(b"x" * (st.f_bavail * st.f_frsize - 64 * 1024))
    return indices(self, step)
data.BatchSchedule.indices = filling_indices
"""


@pytest.mark.slow
def test_a_full_disk_while_checkpointing_stops_in_one_line(tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {r.stderr.strip()}")
    try:
        out = mount / "run"
        extra = dict(max_steps=12, save_steps=3, eval_steps=100, logging_steps=1, lr_scheduler_type="constant",
                     warmup_steps=0, per_device_train_batch_size=4)
        proc = start_cli(tmp_path, out, hook=FILL_DISK.format(fill_at=5, mount=str(mount), committed=str(out / "checkpoints" / "3")), **extra)
        _, err = proc.communicate()
        assert proc.returncode == 2, err[-3000:]
        assert "Traceback" not in err and "Exception" not in err, err[-3000:]
        assert re.fullmatch(rf"error: disk full while writing checkpoint step 6 to {out}/checkpoints; the checkpoint "
                            r"of step 3 is intact; free space and run the same command to resume",
                            err.strip().splitlines()[-1]), err[-2000:]
        assert run_checkpoints.verify(str(out / "checkpoints" / "3")) is None
        os.remove(mount / "filler")
        lines = []
        tr.train(tiny_config("gpt2", out, **extra), prepared=corpus(), log=lines.append)
        assert f"resumed from {out}/checkpoints at step 3" in lines
        assert [r["step"] for r in read_metrics(out) if "loss" in r] == list(range(1, 13))
    finally:
        subprocess.run(["umount", "-l", str(mount)])
