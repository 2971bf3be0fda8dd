"""The device mesh and the logical-axis -> mesh-axis rules: sharding is decided here only.

Model code names array dimensions with logical axes ('embed', 'mlp', 'heads',
'batch', ...). `config.sharding_rules` maps each logical name to mesh axes
(MaxText style). This module turns those into `NamedSharding`s.

Mesh axis types are `Auto` (GSPMD propagation), chosen on purpose: the models
are Flax linen modules annotated with logical partitioning, which assumes
`with_sharding_constraint` semantics; JAX 0.10's default Explicit axes would
require `out_sharding=` on every contraction. The contrastive loss is the one
place where we need to control communication exactly, and it uses
`jax.shard_map` (see losses.py).
"""
import contextlib
import math

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "model")


def mesh_shape(mesh_cfg, num_devices):
    """Resolves the configured axis sizes (one may be -1: 'all the rest')."""
    sizes = {a: int(mesh_cfg[a]) for a in MESH_AXES}
    free = [a for a, s in sizes.items() if s == -1]
    if len(free) > 1:
        raise ValueError(f"config.mesh: at most one axis may be -1, got {dict(sizes)}")
    if any(s == 0 or s < -1 for s in sizes.values()):
        raise ValueError(f"config.mesh: sizes must be positive or -1, got {dict(sizes)}")
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if free:
        if num_devices % fixed:
            raise ValueError(f"config.mesh: {num_devices} devices are not divisible by "
                             f"the fixed axes {dict(sizes)}")
        sizes[free[0]] = num_devices // fixed
    if math.prod(sizes.values()) != num_devices:
        raise ValueError(f"config.mesh: {dict(sizes)} needs {math.prod(sizes.values())} "
                         f"devices, but {num_devices} are available")
    return tuple(sizes[a] for a in MESH_AXES)


def make_mesh(mesh_cfg, devices=None):
    """A (data, fsdp, model) mesh over `devices` (default: all, across processes)."""
    devices = jax.devices() if devices is None else devices
    shape = mesh_shape(mesh_cfg, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(shape),
                         devices=devices)


def rules_dict(rules):
    return {name: axes for name, axes in rules}


def batch_axes(rules):
    """Mesh axes the batch dimension is split over, as a tuple."""
    axes = rules_dict(rules).get("batch")
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


def num_batch_shards(mesh, rules):
    return math.prod(mesh.shape[a] for a in batch_axes(rules))


def batch_sharding(mesh, rules):
    """Sharding of a batch array: leading dimension split over the 'batch' axes."""
    return NamedSharding(mesh, P(batch_axes(rules) or None))


def _drop_indivisible_axes(spec, shape, mesh):
    """Drops mesh axes that do not divide the dimension they would split."""
    out = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        if axes is None:
            out.append(None)
            continue
        axes_t = (axes,) if isinstance(axes, str) else tuple(axes)
        kept, size = [], 1
        for a in axes_t:
            if dim % (size * mesh.shape[a]) == 0:
                kept.append(a)
                size *= mesh.shape[a]
        out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return P(*out)


def unbox_abstract(tree):
    """Strips logical-partitioning boxes from an abstract tree (no sharding constraint applied)."""
    return jax.tree.map(lambda x: x.unbox(apply_constraint=False) if isinstance(x, nn.Partitioned) else x,
                        tree, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def logical_to_sharding(abstract_boxed, mesh, rules):
    """NamedShardings for a tree of (boxed) abstract arrays annotated with logical axes."""
    logical_specs = nn.get_partition_spec(abstract_boxed)
    mesh_specs = nn.logical_to_mesh(logical_specs, rules)
    shapes = unbox_abstract(abstract_boxed)
    return jax.tree.map(
        lambda spec, x: NamedSharding(mesh, _drop_indivisible_axes(spec, x.shape, mesh)),
        mesh_specs, shapes, is_leaf=lambda x: isinstance(x, P))


def without_axes(rules, axes):
    """`rules` with the mesh axes `axes` removed (inside a shard_map manual over them)."""
    def drop(target):
        if target is None or isinstance(target, str):
            return None if target in axes else target
        kept = tuple(a for a in target if a not in axes)
        return kept or None
    return tuple((name, drop(target)) for name, target in rules)


def mesh_context(mesh, rules):
    """`with` this: the mesh and the logical-axis rules that tracing the model needs."""
    stack = contextlib.ExitStack()
    stack.enter_context(jax.set_mesh(mesh))
    stack.enter_context(nn.logical_axis_rules(rules))
    return stack


def replicated(mesh):
    return NamedSharding(mesh, P())


def describe(mesh):
    return " x ".join(f"{a}={mesh.shape[a]}" for a in mesh.axis_names) + \
        f" ({np.prod(list(mesh.shape.values()))} devices, {jax.process_count()} processes)"
