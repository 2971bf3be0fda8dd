"""clip_jax: exact, sharded CLIP training in JAX/Flax."""
import os

__version__ = "0.1.0"

# XLA:CPU options clip_jax sets unless XLA_FLAGS already names them (they only touch the CPU
# backend; they take effect if clip_jax is imported before JAX starts its backends):
# convolutions left to XLA:CPU's own convolution thunks instead of YNNPACK, whose CPU
# convolutions ran RN50's 3x3 kernels at 80-175 GFLOP/s against 140-200 (BUILD_NOTES
# "Performance", findings 3 and 17). Set CLIP_JAX_XLA_DEFAULTS=0 to leave XLA_FLAGS alone.
XLA_CPU_DEFAULTS = {
    "xla_cpu_experimental_ynn_fusion_type": "-individual_convolution",
}


def _set_xla_defaults(environ=os.environ):
    if environ.get("CLIP_JAX_XLA_DEFAULTS", "1") == "0":
        return
    flags = environ.get("XLA_FLAGS", "")
    if any(f"--{name}" in flags for name in XLA_CPU_DEFAULTS):
        return
    extra = " ".join(f"--{name}={value}" for name, value in XLA_CPU_DEFAULTS.items())
    environ["XLA_FLAGS"] = f"{flags} {extra}".strip()


_set_xla_defaults()


def load(path, batch_size=256):
    """A trained or converted CLIP ready for inference; see `clip_jax.inference`."""
    from clip_jax.inference import load as _load
    return _load(path, batch_size=batch_size)
