"""The stored layout of the repeated blocks, and the per-block layout it replaced.

Stacked (the models' layout, `nn.scan`): a transformer's blocks but the last are one module
`resblocks` whose every array has a leading axis of length `layers - 1` (logical name
'layers'), the last block (which computes only the read-out rows) is `resblocks_last`; a
ResNet stage's blocks after its first (which changes the width) are `layer{s}_rest`, stacked
the same way, its first `layer{s}_0`.

Per block (checkpoints and converted weights written before the towers used `nn.scan`, and
the reference models' names): `resblocks_{i}` for i < layers, `layer{s}_{i}` for i < depth.

`to_stacked` and `to_per_block` turn any tree holding such dicts (variables, the optimiser
state's moments, checkpoint metadata; arrays, numpy arrays or `ShapeDtypeStruct`s) from one
into the other; `is_per_block` tells a tree of the old layout. The checkpoint readers convert
old trees when they load them (`checkpoint`), and weight conversion names the per-block view
(`convert`), so the name table stays the reference's.
"""
import re

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

# The logical axis name of the stacked blocks (config_lib.DEFAULT_RULES maps it to no mesh axis).
LAYERS = "layers"
_PER_BLOCK = re.compile(r"(resblocks|layer\d+)_(\d+)$")
_REST = re.compile(r"layer\d+_rest$")
# A path of the per-block layout, and of a stacked array, as `jax.tree_util.keystr` writes them.
_OLD_KEYSTR = re.compile(r"\['(resblocks_\d+|layer\d+_[1-9]\d*)'\]")
STACKED_KEYSTR = re.compile(r"\['(resblocks|layer\d+_rest)'\]")


class LayoutError(ValueError):
    """A tree that is neither layout (e.g. blocks whose arrays differ in structure)."""


def is_per_block(tree) -> bool:
    """True if `tree` (nested containers, or a {keystr: ...} table of one) has the per-block layout."""
    if tree and isinstance(tree, dict) and all(isinstance(k, str) and k.startswith("[") for k in tree):
        paths = tree
    else:
        paths = (jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0])
    return any(_OLD_KEYSTR.search(k) for k in paths)


def to_stacked(tree):
    """The stacked layout of a per-block tree (a stacked one is returned as it is)."""
    return _walk(tree, _stack_dict)


def to_per_block(tree):
    """The per-block layout of a stacked tree (a per-block one is returned as it is)."""
    return _walk(tree, _unstack_dict)


# ------------------------------------------------------------------------- internals

def _walk(node, on_dict):
    """`node` with every dict in it (innermost first) replaced by `on_dict(dict)`; tuples,
    named tuples (optax states) and lists are rebuilt around their converted items."""
    if isinstance(node, dict):
        return on_dict({k: _walk(v, on_dict) for k, v in node.items()})
    if isinstance(node, tuple) and hasattr(node, "_fields"):
        return type(node)(*(_walk(v, on_dict) for v in node))
    if isinstance(node, (list, tuple)):
        return type(node)(_walk(v, on_dict) for v in node)
    return node


def _groups(d):
    """{prefix: {index: key}} of the per-block keys of a dict."""
    groups = {}
    for k in d:
        m = _PER_BLOCK.fullmatch(k) if isinstance(k, str) else None
        if m:
            groups.setdefault(m.group(1), {})[int(m.group(2))] = k
    return groups


def _stack_dict(d):
    groups = _groups(d)
    if "resblocks" not in groups and not any(len(g) > 1 for g in groups.values()):
        return d
    out = {k: v for k, v in d.items() if not (isinstance(k, str) and _PER_BLOCK.fullmatch(k))}
    for prefix, keys in groups.items():
        n = len(keys)
        if sorted(keys) != list(range(n)):
            raise LayoutError(f"blocks {prefix}_*: indices {sorted(keys)} are not 0..{n - 1}")
        blocks = [d[keys[i]] for i in range(n)]
        if prefix == "resblocks":             # all but the last stacked; the last alone
            if n > 1:
                out["resblocks"] = _stack(blocks[:-1], f"{prefix}_0..{n - 2}")
            out["resblocks_last"] = blocks[-1]
        else:                                  # the first alone; the rest stacked
            out[f"{prefix}_0"] = blocks[0]
            if n > 1:
                out[f"{prefix}_rest"] = _stack(blocks[1:], f"{prefix}_1..{n - 1}")
    return out


def _unstack_dict(d):
    out = {}
    for k, v in d.items():
        if k == "resblocks":
            out.update({f"resblocks_{i}": b for i, b in enumerate(_unstack(v))})
        elif isinstance(k, str) and _REST.fullmatch(k):
            prefix = k[:-len("_rest")]
            out.update({f"{prefix}_{i + 1}": b for i, b in enumerate(_unstack(v))})
        elif k != "resblocks_last":
            out[k] = v
    if "resblocks_last" in d:
        out[f"resblocks_{_length(d.get('resblocks', {}))}"] = d["resblocks_last"]
    return out


def _stack(blocks, what):
    try:
        return jax.tree.map(lambda *xs: _stack_leaves(xs), *blocks)
    except ValueError as e:
        raise LayoutError(f"blocks {what} differ in structure and cannot be stacked: {e}") from None


def _stack_leaves(xs):
    x = next((v for v in xs if isinstance(v, jax.ShapeDtypeStruct)), xs[0])
    if isinstance(x, jax.ShapeDtypeStruct):
        sharding = x.sharding
        if isinstance(sharding, NamedSharding):
            sharding = NamedSharding(sharding.mesh, PartitionSpec(None, *sharding.spec))
        return jax.ShapeDtypeStruct((len(xs),) + tuple(x.shape), x.dtype, sharding=sharding)
    if isinstance(x, jax.Array):
        return jnp.stack(xs)
    return np.stack([np.asarray(v) for v in xs])


def _length(tree):
    """The number of blocks stacked in `tree` (0 for an empty one)."""
    leaves = jax.tree.leaves(tree)
    return leaves[0].shape[0] if leaves else 0


def _unstack(tree):
    return [jax.tree.map(lambda x: _take(x, i), tree) for i in range(_length(tree))]


def _take(x, i):
    if isinstance(x, jax.ShapeDtypeStruct):
        sharding = x.sharding
        if isinstance(sharding, NamedSharding):
            sharding = NamedSharding(sharding.mesh, PartitionSpec(*tuple(sharding.spec)[1:]))
        return jax.ShapeDtypeStruct(tuple(x.shape[1:]), x.dtype, sharding=sharding)
    return x[i]
