"""Where a train step's time goes: the top operations of a JAX or PyTorch profile, per step.

JAX writes a Perfetto/Chrome trace (`jax.profiler.trace(..., create_perfetto_trace=True)`); we read
the device's "XLA Ops" line on a GPU (one event per HLO op, the kernels grouped under it), or the
XLA CPU runtime's worker threads on a CPU, and rank HLO ops by self time. PyTorch's profiler ranks
its own ops by self device time (self CPU time without CUDA).
"""
from __future__ import annotations

import collections
import gzip
import json
import re
from pathlib import Path

# An HLO instruction and the JAX name stack it came from: `%fusion.3 = ... metadata={op_name="jit(step)/..."`.
HLO_INSTRUCTION = re.compile(r'^\s*(?:ROOT\s+)?%([^\s=]+) = .*?metadata=\{op_name="([^"]*)"', re.MULTILINE)


def self_times(events: list[dict]) -> dict[str, float]:
    """Total self time (microseconds) per event name on one thread: an event's duration less the
    durations of the events nested directly inside it."""
    totals: dict[str, float] = collections.defaultdict(float)
    stack: list[list] = []  # [name, end, child time]
    for e in sorted(events, key=lambda e: (e["ts"], -e["dur"])):
        while stack and e["ts"] >= stack[-1][1]:
            name, _, children = stack.pop()
            totals[name] -= children
        if stack:
            stack[-1][2] += e["dur"]
        totals[e["name"]] += e["dur"]
        stack.append([e["name"], e["ts"] + e["dur"], 0.0])
    for name, _, children in stack:
        totals[name] -= children
    return dict(totals)


def op_threads(trace: dict) -> list[list[dict]]:
    """The complete ("X") events of the threads that run XLA ops, one list per thread."""
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    process, thread = {}, {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            process[e["pid"]] = e["args"]["name"]
        elif e.get("ph") == "M" and e.get("name") == "thread_name":
            thread[(e["pid"], e["tid"])] = e["args"]["name"]
    devices = {pid for pid, name in process.items() if name.startswith("/device:")}
    if devices:
        ops_lines = {key for key, name in thread.items() if key[0] in devices and name == "XLA Ops"}
        chosen = ops_lines or {key for key, name in thread.items() if key[0] in devices and name.startswith("Stream")}
    else:
        chosen = {key for key, name in thread.items() if name.startswith("tf_XLA")}
    by_thread = collections.defaultdict(list)
    for e in events:
        if e.get("ph") == "X" and (e["pid"], e.get("tid")) in chosen and "dur" in e:
            by_thread[(e["pid"], e["tid"])].append(e)
    return list(by_thread.values())


def is_op(name: str) -> bool:
    """HLO instruction names, not the XLA CPU runtime's own functions (`ThunkExecutor::Execute`,
    `SlinkyThreadPool::Await`) or its `end: <op>` markers."""
    return "::" not in name and not name.startswith("end: ")


def hlo_sources(hlo_text: str) -> dict[str, str]:
    """HLO instruction name -> the JAX op (name stack: transforms, Flax module path, primitive) it came from."""
    return {name: op_name for name, op_name in HLO_INSTRUCTION.findall(hlo_text)}


def top_ops(trace: dict, steps: int, top: int = 10, sources: dict[str, str] | None = None) -> list[dict]:
    """The `top` ops by self time in a trace of `steps` steps: name, milliseconds per step, share of
    the profiled op time, and with `sources` (from `hlo_sources`) the JAX op each came from."""
    totals: dict[str, float] = collections.Counter()
    for events in op_threads(trace):
        totals.update(self_times(events))
    totals = {name: t for name, t in totals.items() if is_op(name) and t > 0}
    whole = sum(totals.values())
    ranked = sorted(totals.items(), key=lambda item: -item[1])[:top]
    sources = sources or {}
    return [{"name": name, "ms_per_step": t / 1e3 / steps, "share": t / whole, "source": sources.get(name)}
            for name, t in ranked]


def jax_top_ops(trace_dir: Path, steps: int, top: int = 10, hlo_text: str = "") -> list[dict]:
    """`top_ops` of the newest Perfetto trace that `jax.profiler.trace` wrote under `trace_dir`,
    named after the compiled module's `hlo_text`."""
    traces = sorted(Path(trace_dir).glob("**/*.trace.json.gz"), key=lambda p: p.stat().st_mtime)
    if not traces:
        raise FileNotFoundError(f"no *.trace.json.gz under {trace_dir}: was create_perfetto_trace set?")
    with gzip.open(traces[-1], "rt") as f:
        return top_ops(json.load(f), steps, top, hlo_sources(hlo_text))


def torch_top_ops(profile, steps: int, cuda: bool, top: int = 10) -> list[dict]:
    """The `top` ops of a finished `torch.profiler.profile` by self device (CUDA) or CPU time."""
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    averages = [a for a in profile.key_averages() if getattr(a, key) > 0]
    whole = sum(getattr(a, key) for a in averages)
    ranked = sorted(averages, key=lambda a: -getattr(a, key))[:top]
    return [{"name": a.key, "ms_per_step": getattr(a, key) / 1e3 / steps, "share": getattr(a, key) / whole,
             "source": None} for a in ranked]
