"""`train` mode: samples/s, FLOP/s and MFU of the config's compiled train step.

The step runs on one fixed device-resident batch (`synthetic_batch`), so the figure is the
step's alone, not the input pipeline's (the `data` mode times that). MFU counts the model's
FLOPs (the step without rematerialisation, towers unrolled; `cost.step_flops`) against
a peak per device given by the user, the data sheet's dense bfloat16 peak on an NVIDIA GPU
of `pod.GPUS` (H100 and H200 SXM: 989 TFLOP/s), or measured here (`measure_peak_tflops`); HFU counts
the FLOPs XLA executes, recomputed forward passes included.
"""
import os
import statistics

import jax
import jax.numpy as jnp
import numpy as np

from clip_jax import cost, pod, sharding, train
from clip_jax.models.layers import remat_policy
from clip_jax.benchmark.timing import timed, timings
from clip_jax.data import pipeline

# Square product sizes tried for the measured peak. XLA:CPU's rate depends on the size by
# more than 10% and not monotonically (bfloat16 on a 2-vCPU VM: ~360 GFLOP/s at 2048 and
# 4096, ~405 at 2560; float32 best at 1024), so a peak taken from one or two sizes
# understates the machine and overstates MFU.
PEAK_SIZES = {"cpu": (1024, 1536, 2048, 2560, 3072, 3584, 4096)}
PEAK_SIZES_OTHER = (2048, 4096, 8192)


def measure_peak_tflops(dtype, sizes=None, repeats=5):
    """The machine's matmul peak in TFLOP/s for the compute `dtype`: the best, over `sizes`
    (None: PEAK_SIZES for the default backend), of the median time of an n x n x n product
    (bfloat16: float32 accumulation, rounded, the form the models use), on the default
    device."""
    dtype = jnp.dtype(dtype)
    if sizes is None:
        sizes = PEAK_SIZES.get(jax.default_backend(), PEAK_SIZES_OTHER)
    best = 0.0
    for n in sizes:
        a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), dtype)
        f = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32).astype(dtype))
        seconds = statistics.median(timings(lambda: f(a, a).block_until_ready(), repeats))
        best = max(best, 2 * n ** 3 / seconds / 1e12)
    return best


def synthetic_batch(run):
    """A random global batch of the run's config (uint8 pixel rows, token ids), laid out on the
    run's mesh as the input pipeline lays out real ones."""
    config = run.config
    size = config.model.vision.image_size
    rng = np.random.default_rng(0)
    images = pipeline.pixel_rows(rng.integers(0, 256, (config.batch_size, size, size, 3),
                                              dtype=np.uint8))
    tokens = rng.integers(1, config.model.text.vocab_size,
                          (config.batch_size, config.model.text.context_length), dtype=np.int32)
    data_sharding = sharding.batch_sharding(run.mesh, run.rules)
    return pipeline.training_batch(jax.device_put(images, data_sharding),
                                   jax.device_put(tokens, data_sharding))


def benchmark_train(config, steps, warmup, repeats, peak_tflops=None):
    """Samples/s of the compiled train step on a fixed device-resident batch, its FLOP/s
    (XLA's cost analysis of the compiled step) and MFU against `peak_tflops` per device
    (None: the data sheet's dense bfloat16 peak on a GPU of `pod.GPUS`, else measured with
    `measure_peak_tflops`)."""
    run = train.build(config)
    batch = synthetic_batch(run)
    state = run.init_state()
    with run.context():
        compiled, compile_s = timed(lambda: run.train_step.lower(state, batch).compile())

        def step():
            nonlocal state
            state, metrics = compiled(state, batch)
            jax.block_until_ready(metrics)

        step_times = timings(step, repeats * steps, warmup=1 + warmup)
    windows = [sum(step_times[i * steps:(i + 1) * steps]) for i in range(repeats)]
    # XLA's counts of the whole step, towers unrolled (a loop's body counts once).
    flops = cost.step_flops(config)
    model_flops = cost.step_flops(config, model_flops=True)
    state = None      # freed before the peak's matmuls
    per_step = statistics.median(windows) / steps
    devices = run.mesh.size
    device_kind = run.mesh.devices.flat[0].device_kind
    peak_source = "given" if peak_tflops else "measured"
    if not peak_tflops and pod.gpu_peak_tflops(device_kind):
        peak_tflops, peak_source = pod.gpu_peak_tflops(device_kind), "data sheet"
    if not peak_tflops:
        peak_tflops = measure_peak_tflops(config.model.dtype)
    achieved = flops / per_step / 1e12
    return {"samples_per_sec": config.batch_size / per_step,
            "step_seconds_median": statistics.median(step_times),
            "step_seconds_min": min(step_times), "step_seconds_max": max(step_times),
            "compile_seconds": compile_s, "batch_size": config.batch_size,
            "flops_per_step": flops, "model_flops_per_step": model_flops,
            "achieved_tflops": achieved, "model_tflops": model_flops / per_step / 1e12,
            "peak_tflops_per_device": peak_tflops, "peak_source": peak_source,
            "mfu": model_flops / per_step / 1e12 / (peak_tflops * devices),
            "hfu": achieved / (peak_tflops * devices),
            "dtype": config.model.dtype, "remat": remat_policy(config.model.remat),
            "devices": devices, "backend": jax.default_backend(), "device_kind": device_kind,
            # The process settings the figure was measured under (launch/cpu_env.sh,
            # launch/gpu_env.sh).
            "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "xla_mem_fraction": os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "")}


def print_train(r):
    print(f"train: {r['samples_per_sec']:.2f} samples/s, step median "
          f"{r['step_seconds_median'] * 1e3:.1f} ms (min {r['step_seconds_min'] * 1e3:.1f}, "
          f"max {r['step_seconds_max'] * 1e3:.1f}; batch {r['batch_size']}, "
          f"{r['dtype']}, remat {r['remat']}, {r['devices']} {r['backend']} devices)\n"
          f"       {r['achieved_tflops'] * 1e3:.1f} GFLOP/s executed "
          f"({r['flops_per_step'] / 1e9:.0f} GFLOP/step, XLA cost analysis), model "
          f"{r['model_tflops'] * 1e3:.1f} GFLOP/s; peak {r['peak_tflops_per_device'] * 1e3:.0f} "
          f"GFLOP/s per device ({r['peak_source']}): MFU {100 * r['mfu']:.1f}%, "
          f"HFU {100 * r['hfu']:.1f}%")
