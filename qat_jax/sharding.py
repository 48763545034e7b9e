"""The device mesh, the logical-to-mesh axis rules and the shardings of the train state.

This is the only module that names mesh axes. Three axes: `data` (batch split, parameters
replicated), `fsdp` (batch split and parameters sharded along d_model) and `tensor` (heads,
d_ff and vocabulary split).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from qat_jax import model
from qat_jax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the axes that split the batch

# Logical axis -> mesh axes. One table for parameters and activations.
RULES = (
    (model.BATCH, ("data", "fsdp")),
    (model.SEQ, None),
    (model.EMBED, "fsdp"),
    (model.VOCAB, "tensor"),
    (model.Q_HEADS, "tensor"),
    (model.KV_HEADS, "tensor"),
    (model.MLP, "tensor"),
    (model.NORM, None),
    (model.LAYERS, None),  # model.scan_layers: the stacked layer axis, never split
)


@dataclasses.dataclass(frozen=True)
class MeshSpec:
    """The mesh's axis sizes as configured (mesh.*; resolve.mesh_spec builds it): data -1 takes
    every device that fsdp and tensor leave."""

    data: int
    fsdp: int
    tensor: int


def mesh_shape(ms: MeshSpec, n_devices: int) -> dict[str, int]:
    """The mesh axis sizes of `ms` on `n_devices`, with data=-1 filled in.

    Raises ConfigError naming the key when the mesh does not fit the devices."""
    for key in MESH_AXES:
        value = getattr(ms, key)
        if value == 0 or value < -1 or (key != "data" and value == -1):
            valid = "a positive integer or -1 (all remaining devices)" if key == "data" else (
                "a positive integer")
            raise ConfigError(f"mesh.{key}={value} is invalid: it must be {valid}")
    fixed = ms.fsdp * ms.tensor
    if ms.data == -1:
        if n_devices % fixed:
            raise ConfigError(
                f"mesh.fsdp * mesh.tensor = {fixed} does not divide the {n_devices} devices")
        shape = {"data": n_devices // fixed, "fsdp": ms.fsdp, "tensor": ms.tensor}
    else:
        shape = {"data": ms.data, "fsdp": ms.fsdp, "tensor": ms.tensor}
    total = shape["data"] * shape["fsdp"] * shape["tensor"]
    if total != n_devices:
        raise ConfigError(
            f"mesh data x fsdp x tensor = {shape['data']} x {shape['fsdp']} x {shape['tensor']} = "
            f"{total} devices, but {n_devices} are available; set mesh.data=-1 or sizes whose "
            f"product is {n_devices}")
    return shape


def make_mesh(ms: MeshSpec, devices=None) -> Mesh:
    """The mesh of `ms` over `devices` (default: all devices of all hosts)."""
    devices = jax.devices() if devices is None else devices
    shape = mesh_shape(ms, len(devices))
    # Auto axis types: shardings propagate through the model from the in/out shardings and the
    # logical constraints (jax.make_mesh defaults to Explicit, which would require typed specs).
    return jax.make_mesh(tuple(shape.values()), MESH_AXES,
                         axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """[batch, ...] arrays: split the leading axis over data and fsdp."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp")))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def logical_shardings(boxed_tree, mesh: Mesh):
    """Shardings of a tree whose leaves may be `nn.LogicallyPartitioned` boxes (or their
    eval_shape). Unboxed leaves (Adam's step count, the step) are replicated."""
    # optax.partition leaves MaskedNode placeholders (no array) in the optimizer state, inside
    # the parameters' boxes; a box around one would get a spec, so the box is dropped first.
    is_box = lambda x: isinstance(x, nn.LogicallyPartitioned)
    boxed_tree = jax.tree.map(
        lambda x: x.value if is_box(x) and isinstance(x.value, optax.MaskedNode) else x,
        boxed_tree, is_leaf=is_box)
    # (A MaskedNode is an empty pytree node: it passes through unchanged.)
    return nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed_tree), mesh, RULES)


def axis_rules():
    """Context for `nn.with_logical_constraint` inside the model."""
    return nn.logical_axis_rules(RULES)


def shard_batch(batch: np.ndarray, mesh: Mesh) -> jax.Array:
    """Assemble the global batch from each host's local rows (the host's slice of the data)."""
    return jax.make_array_from_process_local_data(batch_sharding(mesh), batch)


def per_device_batch(f, params, tokens, param_specs):
    """`f(params, tokens) -> (loss, grads)` run per device on its own rows of the batch, with
    whole parameters; returns the mean loss and the mean gradient, sharded like `params`.

    The batch axes (data, fsdp) are manual inside (jax.shard_map over them; tensor stays the
    compiler's): each parameter is all-gathered over fsdp once before `f`, and each gradient
    is reduced once after it (reduce-scattered over fsdp where its parameter is split there,
    summed over data). Gradient accumulation puts its micro-step loop inside `f`, so its
    communication is that of one step, whatever the number of micro-steps. `param_specs` are
    the parameters' PartitionSpecs (of their NamedShardings)."""
    mesh = jax.sharding.get_abstract_mesh()
    axes = tuple(a for a in BATCH_AXES if not mesh.empty and mesh.shape[a] > 1)
    if not axes:
        return f(params, tokens)
    n = int(np.prod([mesh.shape[a] for a in axes]))
    is_spec = lambda x: isinstance(x, PartitionSpec)
    specs = jax.tree.map(lambda s: PartitionSpec(*(_only(d, axes) for d in s)), param_specs,
                         is_leaf=is_spec)

    def gather(x, spec):
        for dim, names in enumerate(spec):
            if names:
                x = jax.lax.all_gather(x, names, axis=dim, tiled=True)
        return x

    def reduce(g, spec):
        split = [a for names in spec if names for a in _names(names)]
        for dim, names in enumerate(spec):
            if names:
                g = jax.lax.psum_scatter(g, names, scatter_dimension=dim, tiled=True)
        rest = tuple(a for a in axes if a not in split)
        return (jax.lax.psum(g, rest) if rest else g) / n

    def local(params, tokens):
        whole = jax.tree.map(gather, params, specs, is_leaf=is_spec)
        rules = tuple((name, _only(target, axes, drop=True)) for name, target in RULES)
        with nn.logical_axis_rules(rules):
            loss, grads = f(whole, tokens)
        return jax.lax.psum(loss, axes) / n, jax.tree.map(reduce, grads, specs, is_leaf=is_spec)

    return jax.shard_map(local, mesh=mesh, in_specs=(specs, PartitionSpec(axes)),
                         out_specs=(PartitionSpec(), specs), axis_names=set(axes),
                         check_vma=False)(params, tokens)


def _names(entry) -> tuple[str, ...]:
    return (entry,) if isinstance(entry, str) else tuple(entry or ())


def _only(entry, axes, drop: bool = False):
    """A spec entry's mesh axes among `axes` (or, with `drop`, not among them); None if none."""
    kept = tuple(n for n in _names(entry) if (n in axes) != drop)
    return kept[0] if len(kept) == 1 else (kept or None)
