"""`checkpoint` mode: save (blocking part and whole) and restore times, and the size, of the
config's train state, with optimiser moments filled with random values like a trained
state's (fresh AdamW moments are zeros, which compress to almost nothing and would flatter
the size and the times)."""
import os
import statistics
import tempfile

import jax
import numpy as np

from clip_jax import checkpoint, sharding, train
from clip_jax.benchmark.timing import timed


def _dir_bytes(path):
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)


def _randomize_floats(tree):
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.key(0), len(leaves))
    return treedef.unflatten([
        jax.random.normal(k, x.shape, x.dtype) if jax.numpy.issubdtype(x.dtype, jax.numpy.floating)
        else x for k, x in zip(keys, leaves)])


def benchmark_checkpoint(config, repeats, directory=None):
    """Save/restore times (s) and size (bytes) of the config's whole train state."""
    run = train.build(config)
    with run.context():
        fresh = run.init_state()
        state = train.state_to_dict(fresh.replace(opt_state=jax.jit(
            _randomize_floats, out_shardings=run.state_shardings.opt_state)(fresh.opt_state)))
    jax.block_until_ready(state)
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        ckpt = checkpoint.Checkpointer(os.path.join(tmp, "checkpoints"), repeats + 1, run.mesh)
        blocking, total, restore = [], [], []
        replicated = sharding.replicated(run.mesh)
        for i in range(1, repeats + 1):
            state["step"] = jax.device_put(np.int32(i), replicated)
            _, save_s = timed(lambda: ckpt.save(state, {"next_batch": i}))
            _, wait_s = timed(ckpt.wait)
            blocking.append(save_s)
            total.append(save_s + wait_s)

            def restore_latest():
                with run.context():
                    restored = ckpt.restore_latest(train.state_to_dict(run.abstract_state))
                jax.block_until_ready(restored[0])
            restore.append(timed(restore_latest)[1])
        size = _dir_bytes(os.path.join(ckpt.directory, str(repeats)))
        ckpt.close()
    n_params = sum(x.size for x in jax.tree.leaves(state["params"]))
    return {"save_blocking_seconds": statistics.median(blocking),
            "save_seconds": statistics.median(total), "restore_seconds": statistics.median(restore),
            "checkpoint_bytes": size, "state_bytes": sum(x.nbytes for x in jax.tree.leaves(state)),
            "parameters": n_params, "devices": jax.device_count(), "backend": jax.default_backend()}


def print_checkpoint(result):
    print(f"checkpoint: {result['parameters']:,} parameters, "
          f"{result['checkpoint_bytes'] / 1e6:.1f} MB on disk "
          f"({result['state_bytes'] / 1e6:.1f} MB in memory); save blocks "
          f"{result['save_blocking_seconds']:.2f} s, completes in "
          f"{result['save_seconds']:.2f} s; restore {result['restore_seconds']:.2f} s")
