"""Device mesh and the placement of parameters, optimizer state and batches on it.

Mesh axes: `data` (pure data parallelism), `fsdp` (data parallelism whose
replicas also split every large weight along the embedding axis) and `tensor`
(heads and MLP columns split Megatron-style). A batch is split over
(data, fsdp). A weight axis is only split when the mesh axis divides it, else
it stays whole, so every config runs on every mesh, just less sharded.
"""
from __future__ import annotations

import math
import re
from typing import Mapping

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from flax_gpt2v.config import ConfigError
from flax_gpt2v.training.schedule import LAYERS

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# (regex on the '/'-joined parameter path, mesh axis per array axis). First match wins.
# Column-parallel layers split their output (heads, MLP hidden) over `tensor`,
# row-parallel ones their input, so a block needs one reduction per layer.
RULES = (
    (r"attn/c_attn/kernel$", ("fsdp", "tensor")),        # [d, 3d]
    (r"attn/c_proj/kernel$", ("tensor", "fsdp")),        # [d, d]
    (r"mlp/c_fc/kernel$", ("fsdp", "tensor")),           # [d, 4d]
    (r"mlp/c_proj/kernel$", ("tensor", "fsdp")),         # [4d, d]
    (r"wte/embedding$", ("tensor", "fsdp")),             # [V, d]
    (r"wpe/embedding$", (None, "fsdp")),                 # [P, d]
    (r"bottleneck/kernel$", (None, "fsdp")),             # [d or 2d, d]
)


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
    so `opt_state[1][0].mu['transformer']...` gets the rule of its parameter."""
    return "/".join(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def spec_for(path: str, shape: tuple[int, ...], mesh: Mesh, optimizer: bool = False) -> P:
    """The PartitionSpec of a parameter, or with `optimizer` of its optimizer moments: those
    split their `fsdp` axis over (data, fsdp), so pure data parallelism keeps one shard of
    the Adam state per device (ZeRO-1) instead of a full copy."""
    def axis(name, dim):
        if name == "fsdp" and optimizer and mesh.shape["data"] > 1 and dim % batch_size_multiple(mesh) == 0:
            return BATCH_AXES
        return name if name and dim % mesh.shape[name] == 0 else None

    # The optimizer's stacked layers (schedule.stack_layers) add a leading layer axis, kept whole.
    layers = (None,) if f"/{LAYERS}/" in f"/{path}/" else ()
    for pattern, axes in RULES:
        if re.search(pattern, path) and len(layers) + len(axes) == len(shape):
            return P(*layers, *(axis(a, dim) for a, dim in zip(axes, shape[len(layers):])))
    return P()  # biases, LayerNorms, variant scalars: small, replicated


def tree_shardings(tree, mesh: Mesh, optimizer: bool = False):
    """NamedShardings for a tree of arrays (or ShapeDtypeStructs) of parameters, or with
    `optimizer` of optimizer state (see spec_for)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: NamedSharding(mesh, spec_for(path_str(path), tuple(x.shape), mesh, optimizer)), tree)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
