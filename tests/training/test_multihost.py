"""Two training processes on one machine (CPU devices, jax.distributed) match one process on as many devices."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import flax_gpt2v as fg
from flax_gpt2v.training import run_guard

from helpers import ROOT, TESTS, read_metrics, simulated_devices_env

# Two processes that each want the machine: under xdist, one such test at a time (tests/conftest.py).
pytestmark = pytest.mark.whole_machine

# Each process trains tiny_config (test_train) on corpus(); the coordinator comes from JAX_* variables.
WORKER = """
import json, sys
sys.path.insert(0, {tests!r})
import helpers as t
from flax_gpt2v.training import run_guard, trainer as tr
agree, agreements = run_guard.agree, []
run_guard.agree = lambda code: agreements.append(code) or agree(code)
try:
    summary = tr.train(t.tiny_config("gpt2", {out!r}, **{extra!r}), prepared=t.corpus(), log=print)
except run_guard.RunStopped as e:
    print(f"AGREEMENTS {{len(agreements)}}", flush=True)
    print(e, flush=True)
    sys.exit(e.status)
print("SUMMARY " + json.dumps(summary))
"""
EXTRA = dict(max_steps=4, per_device_train_batch_size=2, logging_steps=1, eval_steps=2, save_steps=2, warmup_steps=1)
# Only a guard against a deadlocked pair of processes, far above any slow machine's run time.
HANG_GUARD_S = 1800


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(out, devices: int, extra=EXTRA, **env):
    full_env = simulated_devices_env(devices, **env)
    script = WORKER.format(tests=TESTS, out=str(out), extra=extra)
    return subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env=full_env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def finish(procs):
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=HANG_GUARD_S)[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail("a training process hung:\n" + "\n".join((p.communicate()[0] or "")[-3000:] for p in procs))
    return outputs


def summary_of(output: str) -> dict:
    line = next(line for line in output.splitlines() if line.startswith("SUMMARY "))
    return json.loads(line[len("SUMMARY "):])


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    port = free_port()
    multi, single = tmp_path / "multi", tmp_path / "single"
    procs = [launch(multi, 2, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                    JAX_PROCESS_ID=str(i)) for i in range(2)]
    procs.append(launch(single, 4))  # the same global batch on 4 devices of one process, alongside
    outputs = finish(procs)
    for p, output in zip(procs[:2], outputs):
        if p.returncode and "multi-process" in output and "not supported" in output.lower():
            pytest.skip(f"this jax build has no CPU multi-process support: {output.strip().splitlines()[-1]}")
    for i, (p, output) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"process {i} exited {p.returncode}:\n{output[-4000:]}"
    assert "4 devices" in outputs[0] and "4 devices" in outputs[2]

    # Both hosts report the same run; host 0 wrote the metrics, checkpoints and the final model.
    s0, s1, ref = (summary_of(o) for o in outputs)
    assert s0["step"] == s1["step"] == ref["step"] == EXTRA["max_steps"]
    assert s0["eval_loss"] == pytest.approx(s1["eval_loss"], abs=1e-6)
    assert s0["eval_loss"] == pytest.approx(ref["eval_loss"], abs=1e-5)
    got, want = read_metrics(multi), read_metrics(single)
    assert [m["step"] for m in got] == [m["step"] for m in want]
    for a, b in zip(got, want):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k] == pytest.approx(b[k], abs=1e-5, rel=1e-5), (a["step"], k)
    assert sorted(os.listdir(multi / "checkpoints")) == ["2", "4"]
    lm, lm_ref = fg.load(multi), fg.load(single)
    assert lm.config == lm_ref.config
    for x, y in zip(jax.tree.leaves(lm.params), jax.tree.leaves(lm_ref.params)):
        np.testing.assert_allclose(x, y, atol=1e-5)
    for x, y in zip(jax.tree.leaves(fg.load(multi / "best").params), jax.tree.leaves(fg.load(single / "best").params)):
        np.testing.assert_allclose(x, y, atol=1e-5)


def launch_pair(out, extra):
    port = free_port()
    return [launch(out, 2, extra, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                   JAX_PROCESS_ID=str(i)) for i in range(2)]


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_at_one_checkpointed_step(tmp_path):
    """SIGTERM to the process that does not write: both stop after the same step, which is checkpointed,
    and the pair resumes from it to the same run as one process on as many devices."""
    out, ref = tmp_path / "multi", tmp_path / "single"
    long = {**EXTRA, "max_steps": 100000, "save_steps": 1000, "eval_steps": 1000, "lr_scheduler_type": "constant",
            "warmup_steps": 0}
    procs = launch_pair(out, long)
    metrics = out / "metrics.jsonl"
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        assert all(p.poll() is None for p in procs), "\n".join(p.communicate()[0][-3000:] for p in procs)
        time.sleep(0.2)
    procs[1].send_signal(signal.SIGTERM)
    outputs = finish(procs)
    for p, output in zip(procs, outputs):
        if p.returncode and "multi-process" in output and "not supported" in output.lower():
            pytest.skip(f"this jax build has no CPU multi-process support: {output.strip().splitlines()[-1]}")
    assert [p.returncode for p in procs] == [128 + signal.SIGTERM] * 2, "\n".join(o[-3000:] for o in outputs)
    last = [o.strip().splitlines()[-1] for o in outputs]
    n = int(re.fullmatch(r"stopped by SIGTERM at step (\d+); run the same command to resume", last[1]).group(1))
    assert last[0] == f"stopped by SIGTERM (on another process) at step {n}; run the same command to resume"
    # Not an all-gather per step: the lock's, one every AGREE_EVERY steps, the one after the loop.
    for output in outputs:
        agreements = int(re.search(r"^AGREEMENTS (\d+)$", output, re.M).group(1))
        assert agreements <= 3 + n // run_guard.AGREE_EVERY, (agreements, n)
    assert os.listdir(out / "checkpoints") == [str(n)]
    assert max(m["step"] for m in read_metrics(out)) == n

    short = {**long, "max_steps": n + 2}
    procs = launch_pair(out, short) + [launch(ref, 4, short)]
    outputs = finish(procs)
    for i, (p, output) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"process {i} exited {p.returncode}:\n{output[-4000:]}"
    assert f"resumed from {out}/checkpoints at step {n}" in outputs[0]
    got, want = read_metrics(out), read_metrics(ref)
    assert [m["step"] for m in got] == [m["step"] for m in want]
    for a, b in zip(got, want):
        for k in a:
            assert a[k] == pytest.approx(b[k], abs=1e-5, rel=1e-5), (a["step"], k)
