"""Device mesh and the placement of parameters, optimizer state and batches on it.

Mesh axes: `data` (pure data parallelism), `fsdp` (data parallelism whose
replicas also split every large weight along the embedding axis) and `tensor`
(heads and MLP columns split Megatron-style). A batch is split over
(data, fsdp). Parameters name their axes where the model makes them (models/gpt2.py,
`logical`); `LOGICAL_RULES` alone maps those names onto the mesh, for the parameters
and their optimizer state alike. A weight axis is only split when the mesh axis
divides it, else it stays whole, so every config runs on every mesh, just less sharded.
"""
from __future__ import annotations

import math
from typing import Mapping

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from flax_gpt2v.config import ConfigError

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical axis name -> mesh axis (None: never split). Column-parallel matmuls (qkv, c_fc)
# split their output heads / MLP columns over `tensor`, row-parallel ones (c_proj) their
# input, so a block needs one reduction per sublayer and no resharding; `fsdp` splits the
# model width of every weight that has it.
LOGICAL_RULES = {
    "layers": None,     # the stacked layers: every device runs every layer
    "embed": "fsdp",
    "heads": "tensor",
    "mlp": "tensor",
    "vocab": "tensor",
    "qkv": None,        # q, k, v: each device needs all three of its heads
    "kv": None,         # the head dimension
    "rotary": None,     # rotating head's per-head frequencies
    "positions": None,
    "norm": None,       # LayerNorm scales and biases: small
    "concat": None,     # the parallel bottleneck's two-branch input
}


def make_mesh(axes: Mapping[str, int] | None = None, devices=None) -> Mesh:
    """A Mesh with axes (data, fsdp, tensor); one size may be -1 (the remaining devices)."""
    devices = list(jax.devices() if devices is None else devices)
    axes = dict(axes or {})
    # `data` takes the remaining devices unless another axis is -1.
    sizes = {"data": 1 if -1 in axes.values() else -1, "fsdp": 1, "tensor": 1}
    for name, size in axes.items():
        if name not in sizes:
            raise ConfigError(f"config key 'mesh.{name}': unknown mesh axis; expected {', '.join(AXES)}")
        if isinstance(size, bool) or not isinstance(size, int) or (size <= 0 and size != -1):
            raise ConfigError(f"config key 'mesh.{name}': must be a positive integer or -1, got {size!r}")
        sizes[name] = size
    free = [a for a in AXES if sizes[a] == -1]
    if len(free) > 1:
        raise ConfigError(f"config key 'mesh': only one axis may be -1, got {', '.join(free)}")
    fixed = math.prod(sizes[a] for a in AXES if sizes[a] != -1)
    if free:
        if len(devices) % fixed:
            raise ConfigError(f"config key 'mesh': {len(devices)} devices are not divisible by {fixed}")
        sizes[free[0]] = len(devices) // fixed
    if math.prod(sizes.values()) != len(devices):
        raise ConfigError(f"config key 'mesh': {dict(sizes)} needs {math.prod(sizes.values())} devices, "
                          f"there are {len(devices)}")
    shape = tuple(sizes[a] for a in AXES)
    if len(devices) == len(jax.devices()):
        # Orders devices so that hosts own contiguous rows of the batch axes.
        grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    else:
        grid = np.array(devices).reshape(shape)
    return Mesh(grid, AXES)


def batch_size_multiple(mesh: Mesh) -> int:
    """How many devices a batch is split over."""
    return mesh.shape["data"] * mesh.shape["fsdp"]


def path_str(path) -> str:
    """'/'-joined dict keys of a tree path; optimizer-state wrappers (tuple indices, fields) drop out,
    so `opt_state[1][0].mu['transformer']...` names its parameter."""
    return "/".join(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def spec_for(names: tuple, shape: tuple[int, ...], mesh: Mesh, optimizer: bool = False) -> P:
    """The PartitionSpec of a parameter with logical axis `names`, or with `optimizer` of its
    optimizer moments: those split their `fsdp` axis over (data, fsdp), so pure data parallelism
    keeps one shard of the Adam state per device (ZeRO-1) instead of a full copy."""
    def axis(name, dim):
        mesh_axis = LOGICAL_RULES[name]
        if mesh_axis == "fsdp" and optimizer and mesh.shape["data"] > 1 and dim % batch_size_multiple(mesh) == 0:
            return BATCH_AXES
        return mesh_axis if mesh_axis and dim % mesh.shape[mesh_axis] == 0 else None

    return P(*(axis(name, dim) for name, dim in zip(names, shape)))


def tree_shardings(tree, axes: Mapping[str, tuple], mesh: Mesh, optimizer: bool = False):
    """NamedShardings for a tree of arrays (or ShapeDtypeStructs) of parameters, or with `optimizer`
    of optimizer state, from `axes` ('/'-joined parameter path -> logical names, models.param_axes).
    A leaf is placed like its parameter when its path and rank are the parameter's (Adam's moments),
    else replicated (step counts)."""
    def sharding(path, x):
        names = axes.get(path_str(path))
        if names is None or len(names) != len(x.shape):
            return NamedSharding(mesh, P())
        return NamedSharding(mesh, spec_for(names, tuple(x.shape), mesh, optimizer))

    return jax.tree_util.tree_map_with_path(sharding, tree)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
