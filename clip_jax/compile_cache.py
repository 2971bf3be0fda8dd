"""JAX's persistent compilation cache for training and evaluation: a restarted run reads its
compiled programs (the train step, the evaluators) instead of compiling them again.

`use(setting, workdir)` points JAX at the cache before the first compile: 'workdir' is
WORKDIR/compile_cache (`config.compile_cache`'s default; `python -m clip_jax.evaluate
--workdir` uses the run's), a directory (local or gs://) is that directory, '' is off. A
cache directory JAX has already (JAX_COMPILATION_CACHE_DIR, jax.config, or an earlier run
in the same process: JAX opens its cache once per process) is kept and named.

JAX caches on every platform it runs (CPU, GPU, TPU): programs that took at least
`jax_persistent_cache_min_compile_time_secs` (1 s) to compile, written by process 0 of a
multi-process run, keyed on the program, the devices and the compiler version. Compile-only
programs (`clip_jax.aot`) are not cached. The cache is code the process will run: keep it
where only the run writes.
"""
import jax

from clip_jax import paths
from clip_jax.distributed import log


def use(setting, workdir=None):
    """Returns the cache directory in use, or None."""
    current = jax.config.jax_compilation_cache_dir
    if current or not setting:
        if current:
            log(f"compile cache: {current}")
        return current or None
    if setting == "workdir" and not workdir:
        return None
    path = paths.join(paths.resolve(workdir), "compile_cache") if setting == "workdir" else setting
    jax.config.update("jax_compilation_cache_dir", path)
    log(f"compile cache: {path}")
    return path
