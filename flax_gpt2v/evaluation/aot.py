"""The trainer's step compiled ahead of time: for a GPU that is not here ("deviceless", `--target h100`) or
for this machine's own devices, and what the compiled program says about a run before it starts.

`compile_step` builds a run's real train step (training.steps.run_train_step: its remat, scan, chunked
loss, AdamW, bf16 over fp32, its mesh and shardings), compiles it for the devices and reads off, per
device: peak memory against the device's (memory_analysis: arguments, temporaries, outputs), the attention
kernel the compiler chose, the collectives of one step, the model FLOPs of a step (analytic) and the compile
time. `fit_error` turns a peak that does not fit into the one line that refuses the run.

Deviceless compilation needs jax-cuda12-pjrt and jax-cuda12-plugin at jax's own version and nvidia-cudnn-cu12
(README, "Compile for the H100 without one"); the target is XLA's description of the GPU (targets/*.txtpb).
Nothing is autotuned and cost_analysis() is empty there, so it gives no times.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from flax_gpt2v.config import ConfigError
from flax_gpt2v.hf.keymap import num_params as count_params
from flax_gpt2v.models import variant_of
from flax_gpt2v.training import sharding
from flax_gpt2v.training.options import load_run_config
from flax_gpt2v.training.schedule import run_optimizer
from flax_gpt2v.training.steps import abstract_state, flops_per_token, run_train_step

# --target name -> XLA's GPU target config (its specs/*.txtpb with runtime and cuDNN versions added).
TARGETS = {"h100": Path(__file__).parent / "targets" / "h100_sxm.txtpb"}
PLUGINS = ("jax-cuda12-pjrt", "jax-cuda12-plugin")
CUDNN = "nvidia-cudnn-cu12"
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")
GIB = 2 ** 30


def installed(name: str) -> str | None:
    """The installed version of a distribution, or None."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def missing_plugins() -> list[str]:
    """What deviceless compilation needs and is not installed (at jax's version for the plugins), as pip
    requirements: the CUDA PJRT plugin, and cuDNN, which the compiler calls to build its fused attention."""
    missing = [f"{name}=={jax.__version__}" for name in PLUGINS if installed(name) != jax.__version__]
    return missing + ([] if installed(CUDNN) else [CUDNN])


@dataclasses.dataclass(frozen=True)
class Devices:
    """What a step is compiled for: the devices, their name and memory (None: not known, e.g. a CPU)."""
    devices: list
    name: str
    memory_bytes: int | None
    platform: str | None  # decides the "auto" attention kernel; None: JAX's default backend


def target_devices(target: str, count: int) -> Devices:
    """`count` compile-only devices of a GPU target on one host ('1x1xcount')."""
    if target not in TARGETS:
        raise ConfigError(f"--target {target!r}: unknown; expected one of {', '.join(TARGETS)}")
    missing = missing_plugins()
    if missing:
        raise ConfigError(f"--target {target} compiles without the GPU and needs {', '.join(missing)} "
                          f"(pip install {' '.join(missing)})")
    from jax.experimental import topologies

    spec = TARGETS[target].read_text()
    topology = topologies.get_topology_desc(platform="cuda", target_config=spec, topology=f"1x1x{count}")
    memory = int(re.search(r"device_memory_size:\s*(\d+)", spec).group(1))
    return Devices(list(topology.devices), topology.devices[0].device_kind, memory, "gpu")


def local_devices() -> Devices:
    """This machine's devices; their memory limit where the backend reports one (GPUs do, CPUs not)."""
    devices = jax.devices()
    stats = devices[0].memory_stats() or {}
    return Devices(devices, devices[0].device_kind, stats.get("bytes_limit"), None)


def peak_bytes(m) -> int:
    """A compiled program's device memory from its memory_analysis(): arguments, temporaries and outputs; the
    donated state comes back in the same buffers, so aliased output bytes are not extra."""
    return m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes


def input_length(model_cfg: Mapping[str, Any], block_size: int) -> int:
    """Input positions per row of a training batch of `block_size`-token blocks (2L-1 for duo-predict)."""
    inputs, _ = variant_of(model_cfg).batch(np.zeros((1, block_size), np.int32), model_cfg)
    return int(inputs.shape[1])


def compile_step(model_cfg: Mapping[str, Any], opts, on: Devices) -> dict:
    """Compile the run's train step (options `opts`, a TrainOptions) for `on` and report it, per device."""
    mesh = sharding.make_mesh(opts.mesh, on.devices)
    rows = opts.per_device_train_batch_size * sharding.batch_size_multiple(mesh) * opts.gradient_accumulation_steps
    length = input_length(model_cfg, opts.block_size)
    # The schedule's constants do not change the program: any length of run compiles the same step.
    schedule, tx = run_optimizer(opts, 0, 1)
    _, shapes, shardings, step = run_train_step(model_cfg, opts, tx, schedule, mesh, platform=on.platform)
    state = abstract_state(shapes, shardings)
    batch = {k: jax.ShapeDtypeStruct((rows, length), jnp.int32, sharding=sharding.batch_sharding(mesh))
             for k in ("input_ids", "targets")}
    start = time.perf_counter()
    with compiler_log() as log:
        compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    m = compiled.memory_analysis()
    hlo = compiled.as_text()
    num_params = count_params(model_cfg)
    flops = flops_per_token(model_cfg, num_params, length) * rows * length
    return {
        "device": on.name, "devices": len(on.devices), "mesh": dict(mesh.shape),
        "per_device_batch": opts.per_device_train_batch_size, "global_batch": rows, "input_length": length,
        "attn_pdrop": model_cfg["attn_pdrop"],
        "remat": opts.remat_policy if opts.gradient_checkpointing else "none",
        "peak_bytes": peak_bytes(m),
        "argument_bytes": m.argument_size_in_bytes, "temp_bytes": m.temp_size_in_bytes,
        "output_bytes": m.output_size_in_bytes, "alias_bytes": m.alias_size_in_bytes,
        "device_memory_bytes": on.memory_bytes,
        "attention": attention_kernel(hlo),
        "collectives": count_collectives(hlo),
        "num_params": num_params, "flops_per_step": flops, "flops_per_step_per_device": flops / len(on.devices),
        "compile_s": compile_s,
        "compiler_log": log.lines,
    }


@contextlib.contextmanager
def compiler_log():
    """Holds back what XLA's C++ side writes to stderr meanwhile (e.g. its rematerialization warning for a
    step over the device's memory, which the report states as a figure), so that a refusal stays one
    line; the lines end up in `.lines`."""
    held = SimpleNamespace(lines=[])
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield held
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            held.lines = sink.read().decode(errors="replace").splitlines()


# ---------------------------------------------------------------- reading the optimized HLO

def attention_kernel(hlo: str) -> str:
    """"cudnn" when the program calls cuDNN's fused attention, else "explicit" (scores as dot + softmax)."""
    return "cudnn" if re.search(r'custom_call_target="__cudnn\$fmha', hlo) else "explicit"


_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_COLLECTIVE = re.compile(r"=\s*\S.*?\s(" + "|".join(COLLECTIVES) + r")(-start)?\(")
_CALLS = re.compile(r"(?:body|calls|to_apply|condition|true_computation|false_computation)=%?([\w.\-]+)"
                    r"|branch_computations=\{([^}]*)\}")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


def count_collectives(hlo: str) -> dict[str, int]:
    """How many of each collective one run of the program executes: each op (an async one by its -start)
    counted in its computation, times the trip count of the loops around it (scanned layers)."""
    own: dict[str, dict[str, int]] = {}
    calls: dict[str, list[tuple[str, int]]] = {}
    entry, name = None, None
    for line in hlo.splitlines():
        header = _COMPUTATION.match(line)
        if header and not line.startswith(" "):
            name = header.group(1)
            own[name], calls[name] = dict.fromkeys(COLLECTIVES, 0), []
            if line.startswith("ENTRY"):
                entry = name
            continue
        if name is None:
            continue
        op = _COLLECTIVE.search(line)
        if op:
            own[name][op.group(1)] += 1
        trips = _TRIP_COUNT.search(line)
        for single, branches in _CALLS.findall(line):
            for callee in [single] if single else re.findall(r"%?([\w.\-]+)", branches):
                # A while loop runs its body (and its condition) trip-count times.
                calls[name].append((callee, int(trips.group(1)) if trips and " while(" in line else 1))

    totals: dict[str, dict[str, int]] = {}

    def total(comp: str) -> dict[str, int]:  # HLO's call graph has no cycles
        if comp not in totals:
            out = dict(own[comp])
            for callee, times in calls[comp]:
                for k, v in (total(callee) if callee in own else {}).items():
                    out[k] += times * v
            totals[comp] = out
        return totals[comp]

    return total(entry) if entry else dict.fromkeys(COLLECTIVES, 0)


# ---------------------------------------------------------------- the verdict

def fit_error(report: Mapping[str, Any]) -> str | None:
    """None when the step's peak fits the device's memory (or that is unknown), else the refusal: the figure,
    and what to change (a batch that would fit, full remat, a mesh that splits the state)."""
    limit, peak = report["device_memory_bytes"], report["peak_bytes"]
    if limit is None or peak <= limit:
        return None
    batch, temp = report["per_device_batch"], report["temp_bytes"]
    # Temporaries grow with the batch; arguments and outputs (the state) do not.
    fits = int(batch * (limit - (peak - temp)) / temp) if temp else 0
    changes = [f"per_device_train_batch_size {fits} (now {batch})" if 0 < fits < batch else None,
               {"none": "gradient_checkpointing true", "dots": "remat_policy full"}.get(report["remat"]),
               "a mesh with fsdp > 1 over more devices (splits parameters and optimizer state)"]
    return (f"peak memory {peak / GIB:.1f} GiB per device does not fit the {limit / GIB:.1f} GiB of "
            f"{report['device']} (arguments {report['argument_bytes'] / GIB:.1f} GiB, temporaries "
            f"{temp / GIB:.1f} GiB); try {', or '.join(c for c in changes if c)}")


def summary_lines(label: str, report: Mapping[str, Any]) -> list[str]:
    """The human-readable report of one compiled step."""
    limit = report["device_memory_bytes"]
    of = f" of {limit / GIB:.1f} GiB ({report['peak_bytes'] / limit:.0%})" if limit else ""
    collectives = ", ".join(f"{k} {v}" for k, v in report["collectives"].items() if v) or "none"
    return [
        f"{label}: {report['devices']} x {report['device']}, mesh {report['mesh']}, batch {report['per_device_batch']}"
        f"/device x {report['input_length']} positions, attn_pdrop {report['attn_pdrop']}, remat {report['remat']}",
        f"  peak memory {report['peak_bytes'] / GIB:.2f} GiB per device{of}: arguments "
        f"{report['argument_bytes'] / GIB:.2f}, temporaries {report['temp_bytes'] / GIB:.2f}, outputs "
        f"{report['output_bytes'] / GIB:.2f} (aliased {report['alias_bytes'] / GIB:.2f}) GiB",
        f"  attention: {ATTENTION_NAMES[report['attention']]}; collectives per step: {collectives}",
        f"  model FLOPs per step {report['flops_per_step']:.3e} ({report['flops_per_step_per_device']:.3e} per "
        f"device); compiled in {report['compile_s']:.1f} s",
    ]


ATTENTION_NAMES = {"cudnn": "cuDNN fused", "explicit": "explicit (dot + softmax)"}


# ---------------------------------------------------------------- the commands

def devices_for(target: str | None, mesh: Mapping[str, int], count: int | None = None) -> Devices:
    """The devices a run is checked on: this machine's, or `count` of a target's (default: the devices the
    mesh names, at least one)."""
    if target is None:
        return local_devices()
    if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count <= 0):
        raise ConfigError(f"--devices: must be a positive integer, got {count!r}")
    return target_devices(target, count or int(np.prod([n for n in mesh.values() if n > 0] or [1])))


def check_run(config, overrides: Mapping[str, Any], target: str | None, count: int | None) -> int:
    """`train_jax.py --config X --check [--target T] [--devices N]`: compile the run's step and report it;
    a step that does not fit raises ConfigError (one `error:` line). No data is read."""
    _, model_cfg, opts, _ = load_run_config(config, overrides)
    report = compile_step(model_cfg, opts, devices_for(target, opts.mesh, count))
    print("\n".join(summary_lines(opts.run_name or str(config), report)), flush=True)
    problem = fit_error(report)
    if problem:
        raise ConfigError(problem)
    print("fits: the run can start", flush=True)
    return 0


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "unknown")
    except OSError:
        return "unknown"


def environment() -> dict:
    return {"jax": jax.__version__, **{name: installed(name) for name in (*PLUGINS, CUDNN)}, "cpu": cpu_model()}


TABLE_COLUMNS = ("config", "batch", "attn_pdrop", "peak memory", "of device", "attention", "collectives",
                 "FLOPs/step", "compile")


def markdown_table(results: list[dict]) -> str:
    """One row per compiled step (results: {"config": name, **compile_step's report})."""
    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "|".join("---" for _ in TABLE_COLUMNS) + "|"]
    for r in results:
        limit = r["device_memory_bytes"]
        collectives = ", ".join(f"{k} {v}" for k, v in r["collectives"].items() if v) or "none"
        lines.append("| " + " | ".join([
            r["config"], str(r["per_device_batch"]), f"{r['attn_pdrop']:g}", f"{r['peak_bytes'] / GIB:.1f} GiB",
            f"{r['peak_bytes'] / limit:.0%}" if limit else "n/a", ATTENTION_NAMES[r["attention"]], collectives,
            f"{r['flops_per_step']:.3g}", f"{r['compile_s']:.0f} s"]) + " |")
    return "\n".join(lines)
