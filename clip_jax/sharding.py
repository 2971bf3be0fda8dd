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
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "model")
_SPLIT_PHYSICAL_AXES = ("TPU v5 lite", "TPU v5e")


def mesh_shape(mesh_cfg, num_devices, slices=None):
    """The mesh's (data, fsdp, model) sizes. `mesh.data`, `fsdp` and `model` describe one
    slice (one may be -1: 'all the rest' of the slice's devices); the mesh's data axis is
    `slices` times the slice's, the slices outermost. `slices`: None takes `mesh.slices`
    (-1, 'as many as the devices span', counts as 1 here, where no devices are seen)."""
    if slices is None:
        slices = max(int(mesh_cfg.get("slices", -1)), 1)
    sizes = {a: int(mesh_cfg[a]) for a in MESH_AXES}
    free = [a for a, s in sizes.items() if s == -1]
    where = "" if slices == 1 else f" of each of the {slices} slices (config.mesh.slices)"
    if len(free) > 1:
        raise ValueError(f"config.mesh: at most one axis may be -1, got {dict(sizes)}")
    if any(s == 0 or s < -1 for s in sizes.values()):
        raise ValueError(f"config.mesh: sizes must be positive or -1, got {dict(sizes)}")
    if num_devices % slices:
        raise ValueError(f"config.mesh.slices: {num_devices} devices do not split into "
                         f"{slices} equal slices")
    per_slice = num_devices // slices
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if free:
        if per_slice % fixed:
            raise ValueError(f"config.mesh: the {per_slice} devices{where} are not divisible "
                             f"by the fixed axes {dict(sizes)}")
        sizes[free[0]] = per_slice // fixed
    if math.prod(sizes.values()) != per_slice:
        raise ValueError(f"config.mesh: {dict(sizes)} needs {math.prod(sizes.values())} "
                         f"devices, but {per_slice} are available{where}")
    return (sizes["data"] * slices, sizes["fsdp"], sizes["model"])


def device_slices(devices):
    """How many TPU slices `devices` span (by their `slice_index`; 1 where the platform names
    none: CPU, GPU)."""
    return len({getattr(d, "slice_index", 0) for d in devices})


def num_slices(mesh_cfg, devices):
    """How many slices the mesh's data axis spans: `mesh.slices`, or (-1) as many as the
    devices span (`device_slices`). On one slice (or a platform without slices: the hosts of
    a GPU cluster, joined by their data-centre network; CPU processes in tests),
    `mesh.slices > 1` takes each process as a slice. Raises naming `config.mesh.slices` where
    the devices cannot be split so."""
    want = int(mesh_cfg.get("slices", -1))
    found = device_slices(devices)
    if want == -1:
        return found
    if want < 1:
        raise ValueError(f"config.mesh.slices: must be positive or -1 (every slice the devices "
                         f"span), got {want}")
    if found > 1 and want != found:
        raise ValueError(f"config.mesh.slices={want}, but the devices span {found} TPU slices: "
                         f"set it to {found} (or -1)")
    processes = len({d.process_index for d in devices})
    if found == 1 and want > 1 and processes != want:
        raise ValueError(f"config.mesh.slices={want}, but the {len(devices)} devices are on one "
                         f"slice and {processes} processes (there, each process is a slice)")
    return want


def make_mesh(mesh_cfg, devices=None):
    """A (data, fsdp, model) mesh over `devices` (default: all, across processes).

    On several slices (`num_slices`) the mesh is MaxText's hybrid one: each slice holds a
    (data / slices, fsdp, model) mesh laid out on its own interconnect (ICI), and the data
    axis's outer factor runs across the slices (DCN); fsdp and model stay within a slice,
    so only the batch's collectives (the gradients' reduction, the loss's exchange) cross
    between slices."""
    devices = jax.devices() if devices is None else list(devices)
    slices = num_slices(mesh_cfg, devices)
    shape = mesh_shape(mesh_cfg, len(devices), slices)
    axis_types = (AxisType.Auto,) * len(shape)
    if slices == 1:
        return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
    grid = mesh_utils.create_hybrid_device_mesh(
        (shape[0] // slices,) + shape[1:], (slices, 1, 1), devices,
        process_is_granule=device_slices(devices) == 1,
        # as jax.make_mesh does for v5e slices (a 16x16 slice's axes split to fit the mesh)
        allow_split_physical_axes=devices[0].device_kind in _SPLIT_PHYSICAL_AXES)
    return Mesh(grid, MESH_AXES, axis_types=axis_types)


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


def describe(mesh, slices=1):
    """'data=8 x fsdp=1 x model=1 (8 devices, 2 processes)'; on several slices the data
    axis reads 'data=8 (2 slices x 4)'."""
    axes = [f"{a}={mesh.shape[a]}" for a in mesh.axis_names]
    if slices > 1:
        axes[0] += f" ({slices} slices x {mesh.shape['data'] // slices})"
    return " x ".join(axes) + \
        f" ({np.prod(list(mesh.shape.values()))} devices, {jax.process_count()} processes)"
