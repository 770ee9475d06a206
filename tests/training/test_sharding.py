"""Mesh layouts give the single-device result; checkpoints move between device counts.

Several devices are simulated on CPU, which must be decided before jax starts,
hence the subprocesses with XLA_FLAGS.
"""
from __future__ import annotations

import json
import subprocess
import sys
import types

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import flax_gpt2v as fg
from flax_gpt2v.hf.keymap import flax_shapes
from flax_gpt2v.models import param_axes
from flax_gpt2v.training import sharding
from flax_gpt2v.training import trainer as tr
from flax_gpt2v.training.schedule import adamw
from flax_gpt2v.config import ConfigError

import helpers as tt  # (the corpus and the tiny configs)

ROOT = tt.ROOT


def run_on_devices(n: int, script: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT,
                          env=tt.simulated_devices_env(n), **kw)


def test_rules():
    """The one rules table: heads and MLP columns over `tensor`, the model width over `fsdp`."""
    mesh = types.SimpleNamespace(shape={"data": 1, "fsdp": 4, "tensor": 2})
    d = 64
    assert sharding.spec_for(("layers", "embed", "qkv", "heads", "kv"), (6, d, 3, 4, 16), mesh) == \
        P(None, "fsdp", None, "tensor", None)
    assert sharding.spec_for(("layers", "heads", "kv", "embed"), (6, 4, 16, d), mesh) == P(None, "tensor", None, "fsdp")
    assert sharding.spec_for(("layers", "embed", "mlp"), (6, d, 4 * d), mesh) == P(None, "fsdp", "tensor")
    assert sharding.spec_for(("layers", "mlp", "embed"), (6, 4 * d, d), mesh) == P(None, "tensor", "fsdp")
    assert sharding.spec_for(("vocab", "embed"), (50257, d), mesh) == P(None, "fsdp")  # odd V
    assert sharding.spec_for(("vocab", "embed"), (256, d), mesh) == P("tensor", "fsdp")
    assert sharding.spec_for(("layers", "heads", "kv"), (6, 3, 16), mesh) == P(None, None, None)  # 2 does not divide 3
    assert sharding.spec_for(("norm",), (d,), mesh) == P(None)


def test_every_parameter_is_named_and_placed():
    for model_type, extra in [("gpt2", {}), ("parallel-gpt2", {"bottleneck_method": "concat"}), ("dd-gpt2", {}),
                              ("rotating-head-gpt2", {"rotatinghead": "lr", "use_norm": True})]:
        cfg = fg.load_config({**tt.TINY, "model_type": model_type, "vocab_size": 256, **extra})
        axes = param_axes(fg.build_model(cfg))
        assert sorted(axes) == sorted(flax_shapes(cfg)), model_type
        for path, names in axes.items():
            assert len(names) == len(flax_shapes(cfg)[path]), path
            assert (names[0] == "layers") == path.startswith("transformer/h/"), path
            assert set(names) <= set(sharding.LOGICAL_RULES), path


def test_optimizer_state_follows_its_parameter():
    cfg = fg.load_config({**tt.TINY, "vocab_size": 256})
    lm = fg.init(cfg)
    mesh = types.SimpleNamespace(shape={"data": 1, "fsdp": 1, "tensor": 1})
    opt_state = adamw(lambda s: 1e-3, 0.01).init(lm.params)
    axes = param_axes(lm.module)
    leaves = {sharding.path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(opt_state)[0]}
    # mu and nu, wrappers dropped; the blocks stacked on a leading layer axis like their parameters.
    assert leaves["transformer/h/mlp/c_fc/kernel"].shape == lm.params["transformer"]["h"]["mlp"]["c_fc"]["kernel"].shape
    mesh = sharding.make_mesh({}, jax.devices()[:1])
    assert jax.tree.structure(sharding.tree_shardings(opt_state, axes, mesh)) == jax.tree.structure(opt_state)


def test_optimizer_state_is_split_over_data_replicas():
    """ZeRO-1: with pure data parallelism the Adam moments of large weights are split over
    the data axis too; the parameters themselves stay whole on every replica."""
    mesh = types.SimpleNamespace(shape={"data": 4, "fsdp": 2, "tensor": 1})
    d = 64
    names = ("layers", "embed", "mlp")
    assert sharding.spec_for(names, (6, d, 4 * d), mesh) == P(None, "fsdp", "tensor")
    assert sharding.spec_for(names, (6, d, 4 * d), mesh, optimizer=True) == P(None, ("data", "fsdp"), "tensor")
    assert sharding.spec_for(names, (6, 12, 4 * d), mesh, optimizer=True) == P(None, "fsdp", "tensor")  # 8 does not divide 12
    assert sharding.spec_for(("norm",), (d,), mesh, optimizer=True) == P(None)


def test_mesh_config_errors():
    with pytest.raises(ConfigError, match="mesh.model"):
        sharding.make_mesh({"model": 2})
    with pytest.raises(ConfigError, match="'mesh'"):
        sharding.make_mesh({"fsdp": 3})
    with pytest.raises(ConfigError, match="'mesh'"):
        sharding.make_mesh({"fsdp": -1, "tensor": -1})
    assert dict(sharding.make_mesh({"fsdp": -1}).shape) == {"data": 1, "fsdp": len(jax.devices()), "tensor": 1}


LAYOUTS_SCRIPT = """
import sys, json
sys.path.insert(0, "tests")
import jax, jax.numpy as jnp, numpy as np, optax
import helpers as tt
import flax_gpt2v as fg
from flax_gpt2v.data import pipeline as data
from flax_gpt2v.training import sharding, steps
from flax_gpt2v.training.schedule import adamw, lr_schedule
assert len(jax.devices()) == 8
report = {}
for model_type in ("gpt2", "parallel-gpt2", "duo-predict-gpt2"):
    cfg = fg.load_config({**tt.TINY, **tt.TRAIN_VARIANTS[model_type], "model_type": model_type, "vocab_size": 256,
                          "resid_pdrop": 0.1, "attn_pdrop": 0.1})
    module = fg.build_model(cfg)
    blocks = tt.corpus().train
    batch = {k: jnp.asarray(v) for k, v in data.make_batch(blocks, np.arange(16), cfg).items()}
    sched = lr_schedule("constant", 1e-3, 0, 10)
    def one_step(mesh):
        tx = adamw(sched, 0.01)
        state, shardings = steps.init_state(module, tx, mesh, 0)
        step = steps.jit_train_step(module, tx, sched, mesh, shardings, accum=1, seed=0,
                                 interleaved=model_type == "duo-predict-gpt2")
        new, m = step(state, batch)
        specs = {"/".join(str(k.key) for k in p): str(x.sharding.spec)
                 for p, x in jax.tree_util.tree_flatten_with_path(new["params"])[0]}
        grads = jax.tree.map(lambda mu: mu / 0.1, optax.tree_utils.tree_get(new["opt_state"], "mu"))  # (1 - b1) g
        return float(m["loss"]), jax.device_get(new["params"]), jax.device_get(grads), specs
    ref_loss, ref_params, ref_grads, _ = one_step(sharding.make_mesh({}, jax.devices()[:1]))
    # Adam's first update is lr * g / (|g| + eps): a gradient at the level of fp32 summation-order noise
    # (|g| ~ eps) moves its parameter anywhere in [-lr, lr], whatever the layout. So the step's gradient is
    # compared everywhere, and the updated parameters where the gradient stands clear of that noise.
    clear = [np.abs(g) > 1e-6 for g in jax.tree.leaves(ref_grads)]
    # Every layout for the baseline; the variants' own weights on the mixed one.
    layouts = [{"data": 8}, {"fsdp": 8}, {"tensor": 4, "data": 2}] if model_type == "gpt2" else []
    for layout in layouts + [{"data": 2, "fsdp": 2, "tensor": 2}]:
        loss, params, grads, specs = one_step(sharding.make_mesh(layout))
        dgrads = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)))
        dparams = max(float(np.max(np.abs(a - b)[c], initial=0.0))
                      for a, b, c in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params), clear))
        report[f"{model_type} {layout}"] = {"dloss": abs(loss - ref_loss), "dgrads": dgrads, "dparams": dparams,
            "c_fc": specs["transformer/h/mlp/c_fc/kernel"], "wte": specs["transformer/wte/embedding"]}
print("REPORT" + json.dumps(report))
"""


@pytest.mark.slow
def test_layouts_match_one_device():
    r = run_on_devices(8, LAYOUTS_SCRIPT)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(r.stdout.split("REPORT")[1])
    for name, res in report.items():
        assert res["dloss"] < 1e-5 and res["dgrads"] < 1e-5 and res["dparams"] < 1e-5, (name, res)
    assert report["gpt2 {'fsdp': 8}"]["c_fc"] == str(P(None, "fsdp", "tensor"))
    assert report["gpt2 {'tensor': 4, 'data': 2}"]["wte"] == str(P("tensor", "fsdp"))


@pytest.mark.slow
def test_checkpoint_from_8_devices_resumes_on_1(tmp_path):
    # Killed on an fsdp=8 mesh after the step-8 checkpoint, resumed here on one device.
    extra = dict(max_steps=12, save_steps=4, eval_steps=4, logging_steps=1, mesh={"fsdp": 8},
                 per_device_train_batch_size=2)
    out, ref = tmp_path / "moved", tmp_path / "ref"
    script = tt.KILLED_RUN.format(tests=tt.TESTS, kill_at=10, model_type="gpt2", out=str(out),
                                  extra=extra)
    r = run_on_devices(8, script)
    assert r.returncode == -9, r.stderr[-3000:]
    # One device with the same global batch of 16 rows.
    same = {**extra, "mesh": {"data": 1}, "per_device_train_batch_size": 16}
    tr.train(tt.tiny_config("gpt2", out, **same), prepared=tt.corpus(), log=lambda m: None)
    tr.train(tt.tiny_config("gpt2", ref, **same), prepared=tt.corpus(), log=lambda m: None)
    a, b = tt.read_metrics(ref), tt.read_metrics(out)
    assert [m["step"] for m in a] == [m["step"] for m in b]
    for x, y in zip(a, b):
        for k in x:
            assert y[k] == pytest.approx(x[k], rel=1e-4, abs=1e-6), (x, y)
    for x, y in zip(jax.tree.leaves(fg.load(ref).params), jax.tree.leaves(fg.load(out).params)):
        np.testing.assert_allclose(x, y, atol=2e-5)


COLLECTIVES_SCRIPT = """
import json, re
import jax, jax.numpy as jnp
import flax_gpt2v as fg
from flax_gpt2v.training import sharding, steps
from flax_gpt2v.training.schedule import adamw, lr_schedule
report = {}
for model_type in ("gpt2", "dd-gpt2"):
    cfg = fg.load_config({"model_type": model_type, "n_layer": 2, "n_embd": 64, "n_head": 4, "n_positions": 32,
                          "vocab_size": 256, "resid_pdrop": 0.1, "attn_pdrop": 0.1})
    module = fg.build_model(cfg)
    batch = {"input_ids": jnp.zeros((8, 32), jnp.int32), "targets": jnp.zeros((8, 32), jnp.int32)}
    sched = lr_schedule("constant", 1e-3, 0, 10)
    for tensor in (2, 4):
        mesh = sharding.make_mesh({"tensor": tensor})
        tx = adamw(sched, 0.01)
        state, shardings = steps.init_state(module, tx, mesh, 0)
        step = steps.jit_train_step(module, tx, sched, mesh, shardings, accum=1, seed=0, interleaved=False)
        forward = jax.jit(lambda p, ids: module.apply({"params": p}, ids),
                          in_shardings=(shardings["params"], sharding.batch_sharding(mesh)))
        for name, hlo in (("train", step.lower(state, batch).compile().as_text()),
                          ("forward", forward.lower(state["params"], batch["input_ids"]).compile().as_text())):
            report[f"{model_type} tensor={tensor} {name}"] = {
                op: len(re.findall(rf"= \\S+ {op}(-start)?\\(", hlo)) for op in ("collective-permute", "all-to-all", "all-reduce")}
print("REPORT" + json.dumps(report))
"""


@pytest.mark.slow
def test_tensor_parallel_step_never_reshards():
    """Heads and MLP columns on `tensor` from the parameters' logical names: a tensor-parallel
    train step and forward pass hold only the reductions the math needs (all-reduce), no
    collective-permute or all-to-all moving activations or weights between layouts."""
    r = run_on_devices(8, COLLECTIVES_SCRIPT)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(r.stdout.split("REPORT")[1])
    assert len(report) == 8
    for name, counts in report.items():
        assert counts["collective-permute"] == 0 and counts["all-to-all"] == 0, (name, counts)
        assert counts["all-reduce"] > 0, (name, counts)  # the counting sees collectives at all
