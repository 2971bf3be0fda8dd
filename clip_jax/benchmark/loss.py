"""`loss` mode: compiled memory per device of each contrastive loss + its backward.

The embeddings, scale and bias only (no towers), float32, at each global batch, compiled
ahead of time from shapes (nothing runs), and the largest global batch whose peak fits a
per-device budget. Peak = XLA's argument + output + temp bytes of the compiled program
(`compiled.memory_analysis()`). The batch is split over all devices JAX sees.
"""
import jax
import jax.numpy as jnp
import ml_collections

from clip_jax import losses, sharding
from clip_jax.cost import search_largest
from clip_jax.config_lib import DEFAULT_RULES

LOSS_BATCHES = [1024 * 2 ** i for i in range(7)]    # 1k .. 64k


def _loss_memory(name, batch, embed_dim, block_size, mesh, batch_axes):
    """XLA's compiled-memory figures (bytes per device) of value_and_grad of loss `name` with
    respect to both embeddings and the scale (and bias), for a global `batch`: compiled
    ahead of time from shapes, nothing is allocated or run."""
    loss = losses.make_loss(ml_collections.ConfigDict(dict(name=name, block_size=block_size)),
                            mesh, batch_axes)
    split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(batch_axes))
    embeds = jax.ShapeDtypeStruct((batch, embed_dim), jnp.float32, sharding=split)
    scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=sharding.replicated(mesh))
    if losses.get(name).learns_bias:
        fn, args = jax.value_and_grad(loss, argnums=(0, 1, 2, 3)), (embeds, embeds, scalar, scalar)
    else:
        fn = jax.value_and_grad(lambda i, t, s: loss(i, t, s, None), argnums=(0, 1, 2))
        args = (embeds, embeds, scalar)
    stats = jax.jit(fn).lower(*args).compile().memory_analysis()
    out = {"argument_bytes": int(stats.argument_size_in_bytes),
           "output_bytes": int(stats.output_size_in_bytes),
           "temp_bytes": int(stats.temp_size_in_bytes)}
    out["peak_bytes"] = out["argument_bytes"] + out["output_bytes"] + out["temp_bytes"]
    return out


def benchmark_loss(names, batches, embed_dim, block_size, budget_gib, search_max):
    """Per-device compiled memory of each loss + its backward at each global batch, and the
    largest global batch (a multiple of min(batches), up to `search_max`) whose peak
    estimate fits in `budget_gib` GiB, found by doubling then bisection."""
    mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1, model=1)))
    batch_axes = sharding.batch_axes(DEFAULT_RULES)
    devices = jax.device_count()
    if any(b % devices for b in batches):
        raise ValueError(f"--global_batches must be multiples of the {devices} devices, got {batches}")
    budget = budget_gib * 2 ** 30
    step = min(batches)
    results, largest = {}, {}
    for name in names:
        peak = {}

        def measure(b):
            if b not in peak:
                peak[b] = _loss_memory(name, b, embed_dim, block_size, mesh, batch_axes)
            return peak[b]["peak_bytes"]

        for b in batches:
            measure(b)
        results[name] = {str(b): peak[b] for b in batches}
        fitting = [b for b in batches if peak[b]["peak_bytes"] <= budget]
        lo, _ = search_largest(lambda b: measure(b) <= budget, step, max(fitting, default=step),
                               limit=max(search_max, max(fitting, default=0)))
        largest[name] = {"global_batch": lo, "local_batch": lo // devices,
                         "peak_bytes": peak[lo]["peak_bytes"] if lo else None,
                         "capped": bool(search_max) and lo >= search_max // step * step}
    return {"devices": devices, "backend": jax.default_backend(), "embed_dim": embed_dim,
            "block_size": block_size, "dtype": "float32", "budget_gib": budget_gib,
            "search_step": step, "search_max": search_max, "results": results,
            "largest_fitting": largest}


def print_loss_table(r):
    mib = lambda x: f"{x / 2 ** 20:,.1f}"
    names = list(r["results"])
    print(f"loss: compiled memory per device (MiB) of value_and_grad(loss) wrt the embeddings, "
          f"scale (and bias); {r['devices']} {r['backend']} devices, embed_dim {r['embed_dim']}, "
          f"float32, clip_blockwise block {r['block_size']}; peak = argument + output + temp")
    print("| global batch | local batch | " + " | ".join(f"{n} peak (temp)" for n in names) + " |")
    print("|---:|---:|" + "---:|" * len(names))
    for b in r["results"][names[0]]:
        cells = [f"{mib(r['results'][n][b]['peak_bytes'])} ({mib(r['results'][n][b]['temp_bytes'])})"
                 for n in names]
        print(f"| {int(b):,} | {int(b) // r['devices']:,} | " + " | ".join(cells) + " |")
    for n, f in r["largest_fitting"].items():
        limit = f" (search capped at {r['search_max']:,})" if f["capped"] else ""
        print(f"largest global batch within {r['budget_gib']:g} GiB per device, {n}: "
              f"{f['global_batch']:,} (local {f['local_batch']:,}; resolution {r['search_step']:,}){limit}")
