"""clip_jax: exact, sharded CLIP training in JAX/Flax.

Importing it changes nothing in the process (no environment variable, no JAX backend
started). Process-level settings that pay on CPU hosts are opt-in: launch/cpu_env.sh.
"""

__version__ = "0.1.0"


def load(path, batch_size=256, kernels="auto"):
    """A trained or converted CLIP ready for inference, on the kernels this host's devices
    suit (`kernels`: 'auto', 'xla' or 'cpu'); see `clip_jax.inference`."""
    # lazy: `import clip_jax` must not import JAX (tests/test_imports.py)
    from clip_jax.inference import load as _load
    return _load(path, batch_size=batch_size, kernels=kernels)
