"""Training processes on one machine (CPU devices, jax.distributed), launched as srun and mpirun launch them,
form one run equal to one process on as many devices, through a SIGTERM to one of them and the resume."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import flax_gpt2v as fg
from flax_gpt2v.training import run_guard

from helpers import ROOT, TESTS, free_port, read_metrics, simulated_devices_env, without_launcher

# Processes that each want the machine: under xdist, one such test at a time (tests/conftest.py).
pytestmark = pytest.mark.whole_machine

# Each process trains tiny_config (test_train) on corpus(); the launcher's variables make it one run.
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
# Runs until stopped: evaluated every 2 steps (best/), checkpointed when stopped; the global batch is 8.
LONG = dict(max_steps=100000, per_device_train_batch_size=2, logging_steps=1, eval_steps=2, save_steps=1000,
            warmup_steps=0, lr_scheduler_type="constant", early_stopping_patience=None)
# Only a guard against a deadlocked pair of processes, far above any slow machine's run time.
HANG_GUARD_S = 1800


def srun_task(i: int, n: int, port: int, devices: int) -> dict:
    """What srun sets in task i of `srun --nodes n --ntasks-per-node 1 --gpus-per-task D` (one process per
    node, every node 127.0.0.1 here); JAX_COORDINATOR_PORT replaces the port SLURM's job id gives."""
    gpus = ",".join(map(str, range(devices)))
    return {"SLURM_JOB_ID": "4242", "SLURM_JOBID": "4242", "SLURM_NODELIST": "127.0.0.1",
            "SLURM_JOB_NODELIST": "127.0.0.1", "SLURM_STEP_NODELIST": "127.0.0.1", "SLURM_NTASKS": str(n),
            "SLURM_NPROCS": str(n), "SLURM_STEP_NUM_TASKS": str(n), "SLURM_STEP_NUM_NODES": str(n),
            "SLURM_STEP_TASKS_PER_NODE": f"1(x{n})", "SLURM_TASKS_PER_NODE": f"1(x{n})", "SLURM_STEP_ID": "0",
            "SLURM_PROCID": str(i), "SLURM_LOCALID": "0", "SLURM_NODEID": str(i), "SLURM_GPUS_PER_TASK": str(devices),
            "CUDA_VISIBLE_DEVICES": gpus, "JAX_COORDINATOR_PORT": str(port)}


def mpirun_rank(i: int, n: int, port: int, devices: int) -> dict:
    """What Open MPI 4's `mpirun -np n` sets in rank i on one node (tests/training/test_cluster.py has a
    real one), one process per GPU (D simulated devices each, where a GPU process would have one);
    JAX_COORDINATOR_PORT replaces the port the job id gives."""
    return {"OMPI_COMM_WORLD_SIZE": str(n), "OMPI_COMM_WORLD_RANK": str(i), "OMPI_COMM_WORLD_LOCAL_RANK": str(i),
            "OMPI_COMM_WORLD_LOCAL_SIZE": str(n), "OMPI_COMM_WORLD_NODE_RANK": str(i), "OMPI_UNIVERSE_SIZE": str(n),
            "OMPI_MCA_ess_base_jobid": "1143275521", "OMPI_MCA_ess_base_vpid": str(i),
            "OMPI_MCA_orte_hnp_uri": "1143275520.0;tcp://127.0.0.1:34273", "PMIX_RANK": str(i),
            "CUDA_VISIBLE_DEVICES": ",".join(map(str, range(n))), "JAX_COORDINATOR_PORT": str(port)}


# launcher: (its task environment, processes, simulated devices each, what the first line of each says)
LAUNCHERS = {
    "srun, one process per node": (srun_task, 2, 2, "SLURM: process {i} of 2, local rank 0 of 1, coordinator "
                                   "127.0.0.1:{port}, GPUs: all visible of CUDA_VISIBLE_DEVICES=0,1 -> 2 local cpu "
                                   "devices, 4 in all"),
    "mpirun, one process per GPU": (mpirun_rank, 2, 2, "Open MPI: process {i} of 2, local rank {i} of 2, coordinator "
                                    "127.0.0.1:{port}, GPUs: GPU ordinal {i} of CUDA_VISIBLE_DEVICES=0,1 -> 2 "
                                    "local cpu devices, 4 in all"),
}


def launch(out, devices: int, extra, **env):
    full_env = {**without_launcher(simulated_devices_env(devices)), **env}
    script = WORKER.format(tests=TESTS, out=str(out), extra=extra)
    return subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env=full_env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def launch_all(out, extra, launcher: str):
    task_env, n, devices, _ = LAUNCHERS[launcher]
    port = free_port()
    return [launch(out, devices, extra, **task_env(i, n, port, devices)) for i in range(n)], port


def finish(procs):
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=HANG_GUARD_S)[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail("a training process hung:\n" + "\n".join((p.communicate()[0] or "")[-3000:] for p in procs))
    for p, output in zip(procs, outputs):
        if p.returncode and "multi-process" in output and "not supported" in output.lower():
            pytest.skip(f"this jax build has no CPU multi-process support: {output.strip().splitlines()[-1]}")
    return outputs


def summary_of(output: str) -> dict:
    line = next(line for line in output.splitlines() if line.startswith("SUMMARY "))
    return json.loads(line[len("SUMMARY "):])


def assert_same_run(got_out, want_out):
    got, want = read_metrics(got_out), read_metrics(want_out)
    assert [m["step"] for m in got] == [m["step"] for m in want]
    for a, b in zip(got, want):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k] == pytest.approx(b[k], abs=1e-5, rel=1e-5), (a["step"], k)
    for sub in ("", "best"):
        lm, lm_ref = fg.load(os.path.join(got_out, sub)), fg.load(os.path.join(want_out, sub))
        assert lm.config == lm_ref.config
        for x, y in zip(jax.tree.leaves(lm.params), jax.tree.leaves(lm_ref.params)):
            np.testing.assert_allclose(x, y, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_a_launched_run_stops_on_sigterm_resumes_and_equals_one_process(tmp_path, launcher):
    """One scenario per launcher, found by the trainer itself: the processes form one run (one line each:
    launcher, process i of n, GPUs); SIGTERM to the last (which does not write) stops all after the same
    step, which is checkpointed, agreed on without an all-gather per step; launched again, they resume
    from it and end equal, step by step (metrics, best/, the final model), to one process on as many
    devices."""
    out, ref = tmp_path / "multi", tmp_path / "single"
    n = LAUNCHERS[launcher][1]
    procs, _ = launch_all(out, LONG, launcher)
    metrics = out / "metrics.jsonl"
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        assert all(p.poll() is None for p in procs), "\n".join(p.communicate()[0][-3000:] for p in procs)
        time.sleep(0.2)
    procs[-1].send_signal(signal.SIGTERM)
    outputs = finish(procs)
    assert [p.returncode for p in procs] == [128 + signal.SIGTERM] * n, "\n".join(o[-3000:] for o in outputs)
    last = [o.strip().splitlines()[-1] for o in outputs]
    step = int(re.fullmatch(r"stopped by SIGTERM at step (\d+); run the same command to resume", last[-1]).group(1))
    assert last[:-1] == [f"stopped by SIGTERM (on another process) at step {step}; run the same command to resume"] * (n - 1)
    # Not an all-gather per step: the lock's, one every AGREE_EVERY steps, the one after the loop.
    for output in outputs:
        agreements = int(re.search(r"^AGREEMENTS (\d+)$", output, re.M).group(1))
        assert agreements <= 3 + step // run_guard.AGREE_EVERY, (agreements, step)
    assert os.listdir(out / "checkpoints") == [str(step)]
    assert max(m["step"] for m in read_metrics(out)) == step

    short = {**LONG, "max_steps": step + 2}
    procs, port = launch_all(out, short, launcher)
    outputs = finish(procs)
    # Then the same global batch on 4 devices of one process: not alongside, since on CPU JAX's collectives
    # give up when one process reaches a new one 30 s after another (gloo's fixed timeout), which a
    # third process on a loaded 2-core machine can cause.
    procs.append(launch(ref, 4, short))
    outputs += finish(procs[-1:])
    for i, (p, output) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"process {i} exited {p.returncode}:\n{output[-4000:]}"
    for i, output in enumerate(outputs[:n]):
        assert LAUNCHERS[launcher][3].format(i=i, port=port) in output.splitlines(), output[:2000]
        assert summary_of(output)["step"] == step + 2
    assert f"resumed from {out}/checkpoints at step {step}" in outputs[0]
    assert "4 devices" in outputs[0] and "4 devices" in outputs[-1]
    assert_same_run(out, ref)
