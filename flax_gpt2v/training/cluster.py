"""Joining a multi-host run: which launcher started this process, which process it is, which GPUs it drives.

A run is multi-host when the config's `distributed`, the JAX_* variables or a launcher say so: SLURM's
`srun` or Open MPI's `mpirun`, found by the variables JAX's own cluster detection reads (jax._src.clusters),
whose classes then derive the coordinator's address. Explicit values win over the launcher's, key by
key, so an Open MPI 5 launch (which sets no address JAX can read) needs only JAX_COORDINATOR_ADDRESS.

Each process's GPUs are chosen here, not by JAX: JAX gives the i-th process of a node the i-th GPU it
sees, which drives only GPU 0 of a one-process-per-node launch (jax-ml/jax #16788, MaxText #865 and
#3433) and asks for a GPU the process cannot see when the launcher already gave each task its own
(`--gpus-per-task`, `--gpu-bind`: `invalid device ordinal`, jax-ml/jax #23452, #28194).
`local_device_ids` is the rule, a pure function of the environment.

A coordinator that cannot be reached, or processes that never all join, end in one `error:` line naming
the coordinator after `distributed_timeout` seconds, exit status 2: jax.distributed.initialize would
otherwise abort the process from C++ (DEADLINE_EXCEEDED and a stack trace) after its own timeout.
"""
from __future__ import annotations

import dataclasses
import os
import re
import socket
import sys
import threading
from typing import Mapping

from flax_gpt2v.config import ConfigError
from flax_gpt2v.errors import error_line

# The keys `distributed` may hold: jax.distributed.initialize's arguments a user sets.
DISTRIBUTED_KEYS = ("coordinator_address", "num_processes", "process_id", "local_device_ids")
# What restricts a process's GPUs, first found wins (CUDA, then ROCm's two).
VISIBLE_DEVICES = ("CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES")
# The variables by which JAX's SlurmCluster.is_env_present tells that srun started this process.
SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")


@dataclasses.dataclass(frozen=True)
class Launch:
    """This process's place in a multi-host run."""
    launcher: str  # who said so: "SLURM", "Open MPI", "config", "JAX_* variables"
    num_processes: int
    process_id: int
    coordinator_address: str | None  # None: JAX's cluster class for `launcher` derives it
    local_device_ids: tuple[int, ...] | None  # GPU ordinals among the visible ones; None: all visible
    local_rank: int | None = None  # the process's index among those of its node, when the launcher says
    local_size: int | None = None  # processes on its node, when the launcher says


def tasks_on_node(spec: str, node: int) -> int | None:
    """Tasks on node `node` from SLURM's tasks-per-node list ("8(x4)", "2(x3),1"); None when not listed."""
    counts = []
    for part in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if m is None:
            return None
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts[node] if 0 <= node < len(counts) else None


def visible_devices(env: Mapping[str, str]) -> tuple[str, str] | None:
    """(variable, value) of the first of VISIBLE_DEVICES that is set."""
    return next(((var, env[var]) for var in VISIBLE_DEVICES if var in env), None)


def local_device_ids(env: Mapping[str, str], local_rank: int | None, local_size: int | None) -> tuple[int, ...] | None:
    """The GPUs this process drives, as ordinals among those it sees (CUDA numbers the GPUs of
    CUDA_VISIBLE_DEVICES from 0); None: all it sees.

    - JAX_LOCAL_DEVICE_IDS, when set, is the user's choice.
    - One process on its node (`--ntasks-per-node 1`, `mpirun -npernode 1`), or a launcher that names no
      local rank: every GPU it sees.
    - `--gpus-per-task` (SLURM_GPUS_PER_TASK), or fewer GPUs visible than processes on the node: the
      launcher gave each process its own GPUs; every GPU it sees.
    - Otherwise the node's processes share the visible GPUs (all of a node's 8, or CUDA_VISIBLE_DEVICES=2,3
      of a partial node), each its own equal slice: one each for one process per GPU.
    - Without a visible-devices variable, JAX's rule: the local rank's GPU.
    """
    if env.get("JAX_LOCAL_DEVICE_IDS"):
        return _ids(env["JAX_LOCAL_DEVICE_IDS"], "JAX_LOCAL_DEVICE_IDS")
    if local_rank is None or local_size == 1 or "SLURM_GPUS_PER_TASK" in env:
        return None
    visible = visible_devices(env)
    if visible is None or local_size is None:
        return (local_rank,)
    count = len([d for d in visible[1].split(",") if d.strip()])
    if count < local_size:
        return None
    if count % local_size:
        raise ConfigError(f"{local_size} processes on this node cannot share the {count} GPUs of "
                          f"{visible[0]}={visible[1]} evenly; launch one process per GPU or one per node")
    share = count // local_size
    return tuple(range(local_rank * share, (local_rank + 1) * share))


def _ids(text: str, where: str) -> tuple[int, ...]:
    try:
        return tuple(int(d) for d in text.split(","))
    except ValueError:
        raise ConfigError(f"{where}: must be comma-separated GPU ordinals, got {text!r}") from None


def _launcher(env: Mapping[str, str]) -> tuple[str, dict]:
    """The launcher that started this process and what it says, in JAX's order (Open MPI, then SLURM)."""
    if "OMPI_COMM_WORLD_SIZE" in env:
        # Open MPI 4 sets OMPI_MCA_orte_hnp_uri (mpirun's address), from which JAX's OmpiCluster derives
        # the coordinator; Open MPI 5 (PRRTE) does not.
        return "Open MPI", dict(num_processes=int(env["OMPI_COMM_WORLD_SIZE"]),
                                process_id=int(env["OMPI_COMM_WORLD_RANK"]),
                                local_rank=int(env["OMPI_COMM_WORLD_LOCAL_RANK"]),
                                local_size=int(env["OMPI_COMM_WORLD_LOCAL_SIZE"]),
                                derivable="OMPI_MCA_orte_hnp_uri" in env)
    if all(var in env for var in SLURM_VARS):
        spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
        return "SLURM", dict(num_processes=int(env["SLURM_NTASKS"]), process_id=int(env["SLURM_PROCID"]),
                             local_rank=int(env["SLURM_LOCALID"]),
                             local_size=tasks_on_node(spec, int(env.get("SLURM_NODEID", 0))) if spec else None,
                             derivable=True)
    return "", {}


def launch(env: Mapping[str, str], distributed: Mapping | None) -> Launch | None:
    """This process's Launch from the environment and the config's `distributed`; None for a
    single-process run. Keys of `distributed` win over JAX_* variables, which win over the launcher's."""
    distributed = dict(distributed or {})
    unknown = sorted(set(distributed) - set(DISTRIBUTED_KEYS))
    if unknown:
        raise ConfigError(f"config key 'distributed.{unknown[0]}': unknown; expected {', '.join(DISTRIBUTED_KEYS)}")
    launcher, facts = _launcher(env)
    values = {k: v for k, v in facts.items() if k in ("num_processes", "process_id")}
    derivable = facts.get("derivable", False)
    jax_vars = {"coordinator_address": "JAX_COORDINATOR_ADDRESS", "num_processes": "JAX_NUM_PROCESSES",
                "process_id": "JAX_PROCESS_ID"}
    for key, var in jax_vars.items():
        if var in env:
            values[key] = env[var] if key == "coordinator_address" else _int(env[var], var)
            launcher = launcher or "JAX_* variables"
    for key in ("coordinator_address", "num_processes", "process_id"):
        if key in distributed:
            values[key] = distributed[key]
            launcher = launcher or "config"
    if not launcher:
        return None
    for key in ("num_processes", "process_id"):
        if key not in values:
            raise ConfigError(f"config key 'distributed.{key}': not set (nor {jax_vars[key]}) for a multi-host run")
    n, pid = values["num_processes"], values["process_id"]
    if not (isinstance(n, int) and isinstance(pid, int) and 0 <= pid < n):
        raise ConfigError(f"config key 'distributed': process_id must be in 0..num_processes-1, got process "
                          f"{pid!r} of {n!r}")
    if n == 1:
        return None
    if not derivable and "coordinator_address" not in values:
        where = f"{launcher} started this process but names no coordinator" if facts else \
            "config key 'distributed.coordinator_address': not set"
        raise ConfigError(f"{where}: set JAX_COORDINATOR_ADDRESS (or config key 'distributed.coordinator_address') "
                          "to host:port of process 0")
    local_rank, local_size = facts.get("local_rank"), facts.get("local_size")
    if "local_device_ids" in distributed:
        ids = distributed["local_device_ids"]
        if ids is not None and not (isinstance(ids, list) and all(type(i) is int for i in ids)):
            raise ConfigError(f"config key 'distributed.local_device_ids': must be a list of GPU ordinals or null, "
                              f"got {ids!r}")
        local = None if ids is None else tuple(ids)
    else:
        local = local_device_ids(env, local_rank, local_size)
    return Launch(launcher, n, pid, values.get("coordinator_address"), local, local_rank, local_size)


def _int(text: str, var: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"{var}: must be an integer, got {text!r}") from None


def describe(lau: Launch, address: str, env: Mapping[str, str]) -> str:
    """The one line each process logs: the launcher, process i of n, the coordinator, its GPUs."""
    visible = visible_devices(env)
    seen = f" of {visible[0]}={visible[1]}" if visible else ""
    if lau.local_device_ids is None:
        gpus = f"all visible{seen}"
    else:
        gpus = f"GPU ordinal{'s' if len(lau.local_device_ids) > 1 else ''} " \
               f"{','.join(map(str, lau.local_device_ids))}{seen}"
    node = (f", local rank {lau.local_rank} of {lau.local_size}" if lau.local_size is not None
            else f", local rank {lau.local_rank}" if lau.local_rank is not None else "")
    return f"{lau.launcher}: process {lau.process_id} of {lau.num_processes}{node}, coordinator {address}, GPUs: {gpus}"


def _coordinator(lau: Launch, timeout: int) -> str:
    """The coordinator's host:port, from JAX's cluster class when the launch did not name it
    (JAX_COORDINATOR_PORT replaces the port it derives from the job id)."""
    if lau.coordinator_address:
        return lau.coordinator_address
    from jax._src import clusters

    cluster = {"SLURM": clusters.SlurmCluster, "Open MPI": clusters.OmpiCluster}[lau.launcher]
    return cluster.get_coordinator_address(timeout_secs=timeout,
                                           override_coordinator_port=os.environ.get("JAX_COORDINATOR_PORT"))


def _reachable(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
        return True
    except (OSError, ValueError):
        return False


def _give_up(lau: Launch, address: str, timeout: int) -> None:
    """Run by a timer thread while jax.distributed.initialize still waits: one line, exit status 2."""
    who = f"process {lau.process_id} of {lau.num_processes}, {lau.launcher}"
    if lau.process_id != 0 and not _reachable(address):
        text = (f"cannot reach the coordinator at {address} within distributed_timeout={timeout}s ({who}); "
                "is process 0 running there, and is the port open between the nodes?")
    else:
        text = (f"not all {lau.num_processes} processes joined at the coordinator {address} within "
                f"distributed_timeout={timeout}s ({who}); start every process (srun / mpirun start them all) "
                "or raise distributed_timeout")
    print(error_line(ConfigError(text)), file=sys.stderr, flush=True)
    os._exit(2)  # the main thread is inside JAX's C++ connect; nothing of the run is written yet


def initialize(distributed: Mapping | None, timeout: int, log) -> None:
    """Join the multi-host run the environment and config describe (nothing for a single process);
    `log` gets describe()'s line on every process."""
    import jax

    lau = launch(os.environ, distributed)
    if lau is None:
        return
    address = _coordinator(lau, timeout)
    watchdog = threading.Timer(timeout, _give_up, (lau, address, timeout))
    watchdog.daemon = True
    watchdog.start()
    try:
        # JAX's own timeout is longer than the watchdog's, so that the user reads the watchdog's line.
        jax.distributed.initialize(address, lau.num_processes, lau.process_id,
                                   local_device_ids=None if lau.local_device_ids is None else list(lau.local_device_ids),
                                   cluster_detection_method="deactivate", initialization_timeout=timeout + 60)
    finally:
        watchdog.cancel()
    local = jax.local_devices()
    log(describe(lau, address, os.environ) + f" -> {len(local)} local {local[0].platform} devices, "
                                             f"{jax.device_count()} in all")
