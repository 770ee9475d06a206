"""Which launcher started a process, which process it is and which GPUs it drives (training/cluster.py), for
every launch mode; a coordinator that cannot be reached is one line. Two processes launched as srun and
mpirun launch them train together: tests/training/test_multihost.py."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from unittest import mock

import pytest

from flax_gpt2v.config import ConfigError
from flax_gpt2v.training import cluster
from flax_gpt2v.training.cluster import launch, tasks_on_node

from helpers import ROOT, free_port, without_launcher



def srun_env(procid, ntasks, tasks_per_node, nodeid, localid, nodelist="node[001-004]", **extra):
    """What srun sets in each task (slurm.schedmd.com/srun.html, OUTPUT ENVIRONMENT VARIABLES)."""
    nnodes = len(tasks_per_node.split(","))
    return {"SLURM_JOB_ID": "4242", "SLURM_JOBID": "4242", "SLURM_NODELIST": nodelist, "SLURM_JOB_NODELIST": nodelist,
            "SLURM_STEP_NODELIST": nodelist, "SLURM_NTASKS": str(ntasks), "SLURM_NPROCS": str(ntasks),
            "SLURM_STEP_NUM_TASKS": str(ntasks), "SLURM_STEP_NUM_NODES": str(nnodes),
            "SLURM_STEP_TASKS_PER_NODE": tasks_per_node, "SLURM_TASKS_PER_NODE": tasks_per_node,
            "SLURM_STEP_ID": "0", "SLURM_PROCID": str(procid), "SLURM_LOCALID": str(localid),
            "SLURM_NODEID": str(nodeid), **extra}


# What Open MPI 4.1.4's `mpirun -np 2` set in its rank 1 (Debian 12's openmpi-bin; address made up).
OMPI_RANK1 = {"OMPI_COMM_WORLD_LOCAL_RANK": "1", "OMPI_COMM_WORLD_LOCAL_SIZE": "2", "OMPI_COMM_WORLD_NODE_RANK": "1",
              "OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_FIRST_RANKS": "0",
              "OMPI_MCA_ess": "^singleton", "OMPI_MCA_ess_base_jobid": "1143275521", "OMPI_MCA_ess_base_vpid": "1",
              "OMPI_MCA_orte_hnp_uri": "1143275520.0;tcp://192.0.2.2:34273;tcp6://[fd00::2]:60599",
              "OMPI_UNIVERSE_SIZE": "2", "PMIX_NAMESPACE": "1143275521", "PMIX_RANK": "1"}
GPUS8 = "0,1,2,3,4,5,6,7"


def test_tasks_on_node_reads_slurms_lists():
    assert tasks_on_node("8(x4)", 3) == 8
    assert [tasks_on_node("2(x3),1", n) for n in range(5)] == [2, 2, 2, 1, None]
    assert tasks_on_node("4", 0) == 4 and tasks_on_node("garbled", 0) is None


@pytest.mark.parametrize("mode, env, want", [
    # 2 nodes x 8 GPUs, one process per GPU: each drives the GPU of its local rank (JAX's rule)
    ("srun, one process per GPU", srun_env(13, 16, "8(x2)", 1, 5, CUDA_VISIBLE_DEVICES=GPUS8), (5,)),
    # one process per node (--ntasks-per-node 1 --gpus-per-task 8): all 8, not GPU 0 only (jax #16788)
    ("srun, one per node", srun_env(1, 2, "1(x2)", 1, 0, CUDA_VISIBLE_DEVICES=GPUS8, SLURM_GPUS_PER_TASK="8"), None),
    ("srun, one per node, --gpus-per-node", srun_env(1, 2, "1(x2)", 1, 0, CUDA_VISIBLE_DEVICES=GPUS8), None),
    # a partial node: GPUs 2 and 3, two processes; ordinals 0 and 1 of those two (no invalid ordinal, #23452)
    ("srun, partial node, rank 0", srun_env(0, 2, "2", 0, 0, CUDA_VISIBLE_DEVICES="2,3"), (0,)),
    ("srun, partial node, rank 1", srun_env(1, 2, "2", 0, 1, CUDA_VISIBLE_DEVICES="2,3"), (1,)),
    # --gpus-per-task 1: srun already gave each task its one GPU; ordinal 0, not the local rank (#28194)
    ("srun --gpus-per-task 1", srun_env(5, 8, "8", 0, 5, CUDA_VISIBLE_DEVICES="5", SLURM_GPUS_PER_TASK="1"), None),
    ("srun --gpu-bind single:1", srun_env(5, 8, "8", 0, 5, CUDA_VISIBLE_DEVICES="5"), None),
    ("srun --gpus-per-task 2, two tasks", srun_env(1, 2, "2", 0, 1, CUDA_VISIBLE_DEVICES="2,3",
                                                    SLURM_GPUS_PER_TASK="2"), None),
    # 4 processes sharing a node's 8 GPUs: two each
    ("srun, 4 processes on 8 GPUs", srun_env(3, 8, "4(x2)", 0, 3, CUDA_VISIBLE_DEVICES=GPUS8), (6, 7)),
    # no visible-devices variable (every GPU of the node seen): JAX's rule
    ("srun, no CUDA_VISIBLE_DEVICES", srun_env(2, 8, "8", 0, 2), (2,)),
    ("srun on ROCm", srun_env(1, 2, "2", 0, 1, ROCR_VISIBLE_DEVICES="4,5"), (1,)),
    ("mpirun, one process per GPU", {**OMPI_RANK1, "CUDA_VISIBLE_DEVICES": "0,1"}, (1,)),
    ("mpirun -npernode 1", {**OMPI_RANK1, "OMPI_COMM_WORLD_LOCAL_RANK": "0", "OMPI_COMM_WORLD_LOCAL_SIZE": "1",
                            "CUDA_VISIBLE_DEVICES": GPUS8}, None),
    ("the user's JAX_LOCAL_DEVICE_IDS", srun_env(1, 2, "1(x2)", 1, 0, JAX_LOCAL_DEVICE_IDS="0,2"), (0, 2)),
])
def test_each_launch_mode_drives_the_right_gpus(mode, env, want):
    got = launch(env, None)
    assert got.local_device_ids == want, mode
    visible = cluster.visible_devices(env)
    if got.local_device_ids and visible:  # never an ordinal the process cannot see
        assert max(got.local_device_ids) < len(visible[1].split(",")), mode


def test_what_each_launcher_says():
    slurm = launch(srun_env(13, 16, "8(x2)", 1, 5), None)
    assert (slurm.launcher, slurm.process_id, slurm.num_processes, slurm.local_rank, slurm.local_size,
            slurm.coordinator_address) == ("SLURM", 13, 16, 5, 8, None)
    ompi = launch(OMPI_RANK1, None)
    assert (ompi.launcher, ompi.process_id, ompi.num_processes, ompi.coordinator_address) == ("Open MPI", 1, 2, None)
    # Open MPI 5 sets no address JAX can read: JAX_COORDINATOR_ADDRESS gives it, or one line says to
    ompi5 = {k: v for k, v in OMPI_RANK1.items() if k != "OMPI_MCA_orte_hnp_uri"}
    assert launch({**ompi5, "JAX_COORDINATOR_ADDRESS": "n1:1234"}, None).coordinator_address == "n1:1234"
    with pytest.raises(ConfigError, match="Open MPI started this process but names no coordinator: set "
                                          "JAX_COORDINATOR_ADDRESS"):
        launch(ompi5, None)
    # explicit values win, key by key: the config's over JAX_*, JAX_* over the launcher's
    both = launch({**srun_env(1, 2, "2", 0, 1), "JAX_COORDINATOR_ADDRESS": "a:1", "JAX_PROCESS_ID": "0"},
                  {"coordinator_address": "b:2", "local_device_ids": [3]})
    assert (both.launcher, both.coordinator_address, both.process_id, both.local_device_ids) == ("SLURM", "b:2", 0, (3,))
    jax_vars = launch({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}, None)
    assert (jax_vars.launcher, jax_vars.local_device_ids) == ("JAX_* variables", None)
    assert launch({}, {"coordinator_address": "h:1", "num_processes": 2, "process_id": 0}).launcher == "config"


def test_single_process_runs_join_nothing():
    assert launch({}, None) is None and launch({}, {}) is None
    assert launch(srun_env(0, 1, "1", 0, 0), None) is None  # srun -n 1
    assert launch({k: v for k, v in srun_env(0, 4, "4", 0, 0).items() if k != "SLURM_STEP_NODELIST"}, None) is None
    ompi5_single = {k: v for k, v in OMPI_RANK1.items() if k != "OMPI_MCA_orte_hnp_uri"}
    assert launch({**ompi5_single, "OMPI_COMM_WORLD_SIZE": "1", "OMPI_COMM_WORLD_RANK": "0"}, None) is None


@pytest.mark.parametrize("env, distributed, message", [
    ({}, {"coordinator_address": "h:1", "num_process": 2}, "config key 'distributed.num_process': unknown"),
    ({}, {"coordinator_address": "h:1"}, "config key 'distributed.num_processes': not set (nor JAX_NUM_PROCESSES)"),
    ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}, None,
     "config key 'distributed.coordinator_address': not set: set JAX_COORDINATOR_ADDRESS"),
    ({}, {"coordinator_address": "h:1", "num_processes": 2, "process_id": 2}, "process_id must be in 0..num_processes-1"),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"}, None,
     "JAX_NUM_PROCESSES: must be an integer, got 'two'"),
    (srun_env(0, 3, "3", 0, 0, CUDA_VISIBLE_DEVICES=GPUS8), None,
     "3 processes on this node cannot share the 8 GPUs of CUDA_VISIBLE_DEVICES=0,1,2,3,4,5,6,7 evenly"),
    (srun_env(0, 2, "2", 0, 0, JAX_LOCAL_DEVICE_IDS="0,x"), None, "JAX_LOCAL_DEVICE_IDS: must be comma-separated"),
    (srun_env(0, 2, "2", 0, 0), {"local_device_ids": "0"}, "'distributed.local_device_ids': must be a list"),
])
def test_bad_launches_are_one_line(env, distributed, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        launch(env, distributed)


@pytest.mark.parametrize("env", [srun_env(1, 2, "2", 0, 1), OMPI_RANK1,
                                 {k: v for k, v in srun_env(1, 2, "2", 0, 1).items() if k != "SLURM_LOCALID"}, {}])
def test_launchers_found_as_jax_finds_them(env):
    """launch() restates the variables JAX's SlurmCluster and OmpiCluster look for; they agree."""
    from jax._src import clusters

    with mock.patch.dict(os.environ, env, clear=True):
        jax_finds = next((c.name for c in (clusters.OmpiCluster, clusters.SlurmCluster) if c.is_env_present()), None)
    found = launch(env, None)
    assert {None: None, "SLURM": "slurm", "Open MPI": "ompi"}[found and found.launcher] == jax_finds


def test_the_coordinator_is_jaxs():
    """The address comes from JAX's cluster class: the first node of the step, port from the job id
    unless JAX_COORDINATOR_PORT; mpirun's host for Open MPI 4."""
    env = srun_env(1, 2, "1(x2)", 1, 0, nodelist="gpu[017-018]")
    with mock.patch.dict(os.environ, env, clear=True):
        assert cluster._coordinator(launch(env, None), 10) == f"gpu017:{4242 % 4096 + 61440}"
    with mock.patch.dict(os.environ, {**env, "JAX_COORDINATOR_PORT": "1234"}, clear=True):
        assert cluster._coordinator(launch(env, None), 10) == "gpu017:1234"
    with mock.patch.dict(os.environ, OMPI_RANK1, clear=True):
        assert cluster._coordinator(launch(OMPI_RANK1, None), 10).startswith("192.0.2.2:")


def test_the_line_each_process_logs():
    env = srun_env(1, 2, "1(x2)", 1, 0, CUDA_VISIBLE_DEVICES="2,3")
    assert cluster.describe(launch(env, None), "node001:62130", env) == (
        "SLURM: process 1 of 2, local rank 0 of 1, coordinator node001:62130, GPUs: all visible of "
        "CUDA_VISIBLE_DEVICES=2,3")
    env = srun_env(3, 8, "4(x2)", 0, 3, CUDA_VISIBLE_DEVICES=GPUS8)
    assert cluster.describe(launch(env, None), "n:1", env).endswith(
        "local rank 3 of 4, coordinator n:1, GPUs: GPU ordinals 6,7 of CUDA_VISIBLE_DEVICES=0,1,2,3,4,5,6,7")


@pytest.mark.slow
def test_a_coordinator_never_reached_is_one_line_within_the_timeout(tmp_path):
    """train_jax.py as process 1 of an srun launch whose coordinator port is closed, and as process 0 of
    an mpirun launch whose other process never comes: each ends after distributed_timeout with one line
    naming the coordinator, exit status 2, nothing written (JAX alone aborts with a C++ stack trace)."""
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"model_type": "gpt2", "n_layer": 1, "n_embd": 16, "n_head": 2,
                                  "output_dir": str(tmp_path / "out"), "distributed_timeout": 3}))
    closed, waiting = free_port(), free_port()
    envs = [{**srun_env(1, 2, "1(x2)", 1, 0, nodelist="127.0.0.1"), "JAX_COORDINATOR_PORT": str(closed)},
            {**OMPI_RANK1, "OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_LOCAL_RANK": "0",
             "OMPI_MCA_orte_hnp_uri": "1143275520.0;tcp://127.0.0.1:34273", "JAX_COORDINATOR_PORT": str(waiting)}]
    procs = [subprocess.Popen([sys.executable, os.path.join(ROOT, "train_jax.py"), "--config", str(config)],
                              cwd=ROOT, env={**without_launcher(os.environ), "JAX_PLATFORMS": "cpu", **env}, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for env in envs]
    (_, unreachable), (_, alone) = (p.communicate(timeout=600) for p in procs)
    assert [p.returncode for p in procs] == [2, 2], unreachable[-3000:] + alone[-3000:]
    assert unreachable.splitlines() == [
        f"error: cannot reach the coordinator at 127.0.0.1:{closed} within distributed_timeout=3s (process 1 of 2, "
        "SLURM); is process 0 running there, and is the port open between the nodes?"]
    assert alone.splitlines() == [
        f"error: not all 2 processes joined at the coordinator 127.0.0.1:{waiting} within distributed_timeout=3s "
        "(process 0 of 2, Open MPI); start every process (srun / mpirun start them all) or raise distributed_timeout"]
    assert not (tmp_path / "out").exists()
