"""The one timing loop of the benchmarks (clip_jax.benchmark and benchmarks/*.py).

Pure Python (no JAX), so the PyTorch side of benchmarks/side_by_side.py uses it too.
"""
import statistics
import time


def timings(fn, repeats, warmup=1):
    """Calls `fn` `warmup` times untimed (compiling, warming caches), then returns the wall
    times in seconds of `repeats` more calls. `fn` must block until its work is done."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def median_time(fn, repeats, warmup=1):
    """The median of `timings(fn, repeats, warmup)`."""
    return statistics.median(timings(fn, repeats, warmup))


def timed(fn):
    """(fn's result, its wall time in seconds) for one call."""
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0
