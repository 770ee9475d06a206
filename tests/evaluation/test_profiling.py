"""Top-op summaries of profiler traces: self time under nesting, which threads count, HLO names."""
import pytest

from flax_gpt2v.evaluation import profiling


def meta(kind, pid, name, tid=None):
    return {"ph": "M", "name": kind, "pid": pid, **({"tid": tid} if tid is not None else {}), "args": {"name": name}}


def op(pid, tid, name, ts, dur):
    return {"ph": "X", "pid": pid, "tid": tid, "name": name, "ts": ts, "dur": dur}


def test_self_time_subtracts_nested_events():
    events = [op(1, 1, "while", 0, 100), op(1, 1, "fusion.1", 10, 30), op(1, 1, "dot", 15, 10),
              op(1, 1, "fusion.2", 50, 20), op(1, 1, "fusion.1", 120, 5)]
    assert profiling.self_times(events) == {"while": 50, "fusion.1": 25, "dot": 10, "fusion.2": 20}


def test_gpu_trace_counts_the_xla_ops_line_only():
    trace = {"traceEvents": [
        meta("process_name", 1, "/host:CPU"), meta("thread_name", 1, "python", 1),
        meta("process_name", 2, "/device:GPU:0"), meta("thread_name", 2, "Stream #13(Compute)", 1),
        meta("thread_name", 2, "XLA Ops", 2), meta("thread_name", 2, "XLA Modules", 3),
        op(1, 1, "PjitFunction(step)", 0, 1000),
        op(2, 1, "sm90_xmma_gemm_bf16", 0, 300), op(2, 3, "jit_step", 0, 800),
        op(2, 2, "custom-call.3", 0, 300), op(2, 2, "fusion.7", 400, 100), op(2, 2, "custom-call.3", 600, 300),
    ]}
    top = profiling.top_ops(trace, steps=2, sources={"custom-call.3": "jit(step)/Block/attn/dot_general"})
    assert [(o["name"], o["ms_per_step"], o["share"], o["source"]) for o in top] == [
        ("custom-call.3", 0.3, pytest.approx(6 / 7), "jit(step)/Block/attn/dot_general"),
        ("fusion.7", 0.05, pytest.approx(1 / 7), None)]


def test_cpu_trace_counts_xla_worker_threads_without_runtime_wrappers():
    trace = {"traceEvents": [
        meta("process_name", 1, "/host:CPU"), meta("thread_name", 1, "tf_XLAEigen/1", 7),
        meta("thread_name", 1, "tf_XLAPjRtCpuClient/2", 8), meta("thread_name", 1, "python", 9),
        op(1, 7, "ThunkExecutor::Execute", 0, 100), op(1, 7, "ynn_fusion.4", 10, 60), op(1, 7, "end: ynn_fusion.4", 70, 1),
        op(1, 8, "SlinkyThreadPool::Await", 0, 50), op(1, 8, "dot", 0, 40), op(1, 9, "$train.py:10 step", 0, 500),
    ]}
    assert [(o["name"], o["ms_per_step"]) for o in profiling.top_ops(trace, steps=1)] == [
        ("ynn_fusion.4", 0.06), ("dot", 0.04)]


def test_hlo_sources_maps_instructions_to_jax_ops():
    hlo = """
ENTRY %main.3 (x.1: f32[8,16]) -> f32[16,16] {
  %x.1 = f32[8,16]{1,0} parameter(0), metadata={op_name="x"}
  %ynn_fusion = f32[8,16]{1,0} fusion(%x.1), kind=kCustom, calls=%c, metadata={op_name="jit(f)/Block/dot_general" stack_frame_id=4}
  %copy.2 = f32[8,16]{1,0} copy(%ynn_fusion)
  ROOT %dot = f32[16,16]{1,0} dot(%x.1, %copy.2), metadata={op_name="jit(f)/transpose(jvp(jit(f)))/transpose"}
}"""
    assert profiling.hlo_sources(hlo) == {"x.1": "x", "ynn_fusion": "jit(f)/Block/dot_general",
                                          "dot": "jit(f)/transpose(jvp(jit(f)))/transpose"}
