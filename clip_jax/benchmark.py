"""Benchmarks: `python -m clip_jax.benchmark [MODE] --config=configs/X.py [options]`.

  train (default)  compiles the real train step of the config and times --steps steps on a
                   device-resident batch after --warmup steps (blocking on each step's
                   result), --repeats times. Reports samples/s, step times (median/min/max),
                   the FLOP/s executed (XLA's cost analysis of the step, recomputed forward
                   passes included), the model's FLOP/s (the step without rematerialisation,
                   plain model code; both `summary.step_flops`, towers unrolled) and
                   MFU = model FLOP/s / (peak x devices), the peak
                   per device given by --peak_tflops or measured here: the best rate of
                   square matmuls of several sizes in the compute dtype
                   (`measure_peak_tflops`); HFU uses executed FLOPs.
  data             times the input pipeline alone: this process's host batches (read,
                   decode, crop, tokenise) for `--source` (default: the config's
                   data.source), with each worker count in --workers. Reports images/s,
                   and images/s per core (in this process) with the pipeline's JPEG decoder
                   (simplejpeg) and with PIL alone, in alternating windows.
  evaluate         evaluation throughput of the config's model (randomly initialised) on
                   --source (an ImageFolder, ingested directory or CSV; default:
                   --images generated 500x375 JPEGs): image features from the files end to
                   end, decoding + centre crop alone, the image tower alone, and prompt
                   texts through the text tower. Reports images/s and texts/s.
  checkpoint       saves the config's freshly initialised train state --repeats times into
                   --checkpoint_dir (default: a temporary directory) and restores it
                   (optimiser moments filled with random values, like a trained state's).
                   Reports the blocking part of a save (what training waits for), the
                   whole save, the restore (with its checksum verification), and the size.
  loss             compiled memory per device of each contrastive loss + its backward
                   (--losses; the embeddings, scale and bias only: no towers) at each global
                   batch in --global_batches (--embed_dim, float32), compiled ahead of time
                   from shapes (nothing runs), and the largest global batch whose peak fits
                   in --budget_gib per device. Peak = XLA's argument + output + temp bytes
                   of the compiled program (`compiled.memory_analysis()`). The batch is split
                   over all devices JAX sees; the config is not used. For N simulated
                   devices on a CPU machine, start it with
                   XLA_FLAGS=--xla_force_host_platform_device_count=N in the environment.

Figures are medians over --repeats timing windows; with --json the last line printed is
one JSON object holding them (`samples_per_sec` for train, `images_per_sec` per worker
count for data). The config's keys can be overridden as in training
(`--config.batch_size=32`).
"""
import json
import os
import statistics
import sys
import time

import jax
import numpy as np

from clip_jax import config_lib

DEFAULT_CONFIG = "configs/smoke.py"


def benchmark_data(config, workers_list, batches, repeats):
    """{workers: {'images_per_sec', 'batch_seconds_median'}} of the host pipeline."""
    import tempfile
    from clip_jax.data import pipeline, tokenizer as tokenizer_lib
    with tempfile.TemporaryDirectory() as workdir:    # a workdir tokenizer, trained afresh
        tokenizer = tokenizer_lib.get_tokenizer(config, workdir)
    results = {}
    for workers in workers_list:
        config.data.workers = workers
        it = iter(pipeline.make_host_dataset(config, tokenizer))
        next(it)                                         # start-up (worker processes, first reads)
        windows = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(batches):
                next(it)
            windows.append(time.perf_counter() - t0)
        getattr(it, "close", lambda: None)()
        per_batch = statistics.median(windows) / batches
        results[str(workers)] = {"images_per_sec": config.batch_size / per_batch,
                                 "batch_seconds_median": per_batch}
    return results, _per_core_by_decoder(config, tokenizer, batches, repeats)


def _per_core_by_decoder(config, tokenizer, batches, repeats):
    """{decoder: images/s} of the pipeline in this process (one core): JPEGs decoded by
    simplejpeg (what the pipeline does) and by PIL alone, in alternating timing windows."""
    from unittest import mock
    from clip_jax.data import images, pipeline
    config.data.workers = 0
    it = iter(pipeline.make_host_dataset(config, tokenizer))
    next(it)
    windows = {"simplejpeg": [], "pil": []}
    for r in range(repeats):
        for decoder in (("simplejpeg", "pil") if r % 2 == 0 else ("pil", "simplejpeg")):
            fast = images._decode_jpeg if decoder == "simplejpeg" else (lambda data, size: None)
            with mock.patch.object(images, "_decode_jpeg", fast):
                t0 = time.perf_counter()
                for _ in range(batches):
                    next(it)
                windows[decoder].append(time.perf_counter() - t0)
    return {decoder: config.batch_size * batches / statistics.median(w)
            for decoder, w in windows.items()}


def timings(fn, repeats):
    """Calls `fn` once (compiling, warming caches), then returns the wall times in seconds of
    `repeats` more calls. `fn` must block until its work is done."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


# Square product sizes tried for the measured peak. XLA:CPU's rate depends on the size by
# more than 10% and not monotonically (bfloat16 on the 2-vCPU VM of BUILD_NOTES: ~360 GFLOP/s
# at 2048 and 4096, ~405 at 2560; float32 best at 1024), so a peak taken from one or two
# sizes understates the machine and overstates MFU.
PEAK_SIZES = {"cpu": (1024, 1536, 2048, 2560, 3072, 3584, 4096)}
PEAK_SIZES_OTHER = (2048, 4096, 8192)


def measure_peak_tflops(dtype, sizes=None, repeats=5):
    """The machine's matmul peak in TFLOP/s for the compute `dtype`: the best, over `sizes`
    (None: PEAK_SIZES for the default backend), of the median time of an n x n x n product
    (bfloat16: float32 accumulation, rounded, the form the models use), on the default
    device."""
    import jax.numpy as jnp
    dtype = jnp.dtype(dtype)
    if sizes is None:
        sizes = PEAK_SIZES.get(jax.default_backend(), PEAK_SIZES_OTHER)
    best = 0.0
    for n in sizes:
        a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), dtype)
        f = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32).astype(dtype))
        times = timings(lambda: f(a, a).block_until_ready(), repeats)
        best = max(best, 2 * n ** 3 / statistics.median(times) / 1e12)
    return best


def xla_flops(staged):
    """FLOPs of a lowered or compiled program by XLA's cost analysis (0 when it has none)."""
    from clip_jax.summary import xla_cost
    cost = xla_cost(staged)
    return float(cost.get("flops", 0.0)) if cost else 0.0


def synthetic_batch(run):
    """A random global batch of the run's config (uint8 pixels normalised, token ids), laid out
    on the run's mesh as the input pipeline lays out real ones."""
    from clip_jax import sharding
    from clip_jax.data import pipeline
    config = run.config
    size = config.model.vision.image_size
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (config.batch_size, size, size, 3), dtype=np.uint8)
    tokens = rng.integers(1, config.model.text.vocab_size,
                          (config.batch_size, config.model.text.context_length), dtype=np.int32)
    data_sharding = sharding.batch_sharding(run.mesh, run.rules)
    return {"images": jax.device_put(pipeline.normalize_images(images), data_sharding),
            "tokens": jax.device_put(tokens, data_sharding)}


def benchmark_train(config, steps, warmup, repeats, peak_tflops=None):
    """Samples/s of the compiled train step on a fixed device-resident batch, its FLOP/s
    (XLA's cost analysis of the compiled step) and MFU against `peak_tflops` per device
    (None: measured with `measure_peak_tflops`)."""
    from clip_jax import summary, train
    run = train.build(config)
    batch = synthetic_batch(run)
    state = run.init_state()
    step_times = []
    with run.context():
        t0 = time.perf_counter()
        compiled = run.train_step.lower(state, batch).compile()
        compile_s = time.perf_counter() - t0
        state, m = compiled(state, batch)
        jax.block_until_ready(m)
        for _ in range(warmup):
            state, m = compiled(state, batch)
        jax.block_until_ready(m)
        windows = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(steps):
                t_step = time.perf_counter()
                state, m = compiled(state, batch)
                jax.block_until_ready(m)
                step_times.append(time.perf_counter() - t_step)
            windows.append(time.perf_counter() - t0)
    # XLA's counts of the whole step, towers unrolled (a loop's body counts once).
    flops = summary.step_flops(config)
    model_flops = summary.step_flops(config, model_flops=True)
    del state
    per_step = statistics.median(windows) / steps
    devices = run.mesh.size
    peak_source = "given" if peak_tflops else "measured"
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
            "dtype": config.model.dtype, "remat": bool(config.model.remat),
            "devices": devices, "backend": jax.default_backend(),
            # The host allocator's settings the figure was measured under (launch/cpu_env.sh).
            "glibc_tunables": os.environ.get("GLIBC_TUNABLES", "")}


def _dir_bytes(path):
    import os
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)


def _randomize_floats(tree):
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.key(0), len(leaves))
    return treedef.unflatten([
        jax.random.normal(k, x.shape, x.dtype) if jax.numpy.issubdtype(x.dtype, jax.numpy.floating)
        else x for k, x in zip(keys, leaves)])


def benchmark_checkpoint(config, repeats, directory=None):
    """Save/restore times (s) and size (bytes) of the config's whole train state."""
    import os
    import tempfile

    from clip_jax import checkpoint, sharding, train
    run = train.build(config)
    with run.context():
        fresh = run.init_state()
        # A trained state: fresh AdamW moments are zeros, which compress to almost nothing
        # and would flatter the size and the times. Random values stand in for trained ones.
        state = train.state_to_dict(fresh.replace(opt_state=jax.jit(
            _randomize_floats, out_shardings=run.state_shardings.opt_state)(fresh.opt_state)))
    jax.block_until_ready(state)
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        ckpt = checkpoint.Checkpointer(os.path.join(tmp, "checkpoints"), repeats + 1, run.mesh)
        blocking, total, restore = [], [], []
        replicated = sharding.replicated(run.mesh)
        for i in range(1, repeats + 1):
            state["step"] = jax.device_put(np.int32(i), replicated)
            t0 = time.perf_counter()
            ckpt.save(state, {"next_batch": i})
            blocking.append(time.perf_counter() - t0)
            ckpt.wait()
            total.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            with run.context():
                restored = ckpt.restore_latest(train.state_to_dict(run.abstract_state))
            jax.block_until_ready(restored[0])
            restore.append(time.perf_counter() - t0)
            del restored
        size = _dir_bytes(os.path.join(ckpt.directory, str(repeats)))
        ckpt.close()
    n_params = sum(x.size for x in jax.tree.leaves(state["params"]))
    return {"save_blocking_seconds": statistics.median(blocking),
            "save_seconds": statistics.median(total), "restore_seconds": statistics.median(restore),
            "checkpoint_bytes": size, "state_bytes": sum(x.nbytes for x in jax.tree.leaves(state)),
            "parameters": n_params, "devices": jax.device_count(), "backend": jax.default_backend()}


def _photo_folder(directory, n, width=500, height=375):
    """An ImageFolder of n JPEG 'photos' (smooth colour fields plus noise, 10 classes)."""
    import os
    from PIL import Image
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width]
    for i in range(n):
        folder = os.path.join(directory, f"class_{i % 10}")
        os.makedirs(folder, exist_ok=True)
        base = rng.uniform(0, 255, 3)
        pixels = (base + 80 * np.sin(x[..., None] / (20 + i % 30) + np.arange(3))
                  + 60 * np.cos(y[..., None] / (15 + i % 17)) + rng.normal(0, 12, (height, width, 3)))
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
            os.path.join(folder, f"{i}.jpg"), quality=90)
    return directory


def benchmark_evaluate(config, source, num_images, repeats, batch_size):
    """Evaluation throughput of the config's (randomly initialised) model: image features from
    files end to end, their two halves (decode + crop, the image tower), and prompt texts."""
    import tempfile

    import flax.linen as nn
    import jax.numpy as jnp

    from clip_jax import sharding
    from clip_jax.data import tokenizer as tokenizer_lib
    from clip_jax.data.pipeline import normalize_images
    from clip_jax.evals import data as data_lib, features
    from clip_jax.inference import CLIPModel
    from clip_jax.models import abstract_variables, build_model, input_specs

    mesh, rules = sharding.make_mesh(config.mesh), tuple(tuple(r) for r in config.sharding_rules)
    model = build_model(config.model)
    shardings = jax.tree.map(lambda x: x.sharding, abstract_variables(model, config.model, mesh, rules))
    images, tokens = (jnp.zeros(x.shape, x.dtype) for x in input_specs(config.model))
    with sharding.mesh_context(mesh, rules):
        variables = jax.jit(lambda r: nn.unbox(model.init(r, images, tokens)),
                            out_shardings=shardings)(jax.random.key(0))
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = tokenizer_lib.get_tokenizer(config, tmp)
        clip = CLIPModel(config, variables, tokenizer, mesh, rules, batch_size)
        data = data_lib.open_eval_data(source or _photo_folder(tmp + "/photos", num_images)).head(num_images)
        views = features._Views(data, clip.image_size)

        def timed(fn):                                    # the first call compiles, warms the file cache
            return statistics.median(timings(fn, repeats))

        pixels = normalize_images(np.stack([views[i] for i in range(len(data))]))
        prompts = [f"a photo of a {i % 1000} thing." for i in range(4 * len(data))]
        end_to_end = timed(lambda: features.image_features(clip, data, progress=False))
        decode = timed(lambda: list(features.decoded_batches(data, clip.image_size, clip.batch_size)))
        encode = timed(lambda: clip.encode_image(pixels))
        text = timed(lambda: features.text_features(clip, prompts, progress=False))
    n = len(data)
    return {"images": n, "image_size": clip.image_size, "batch_size": clip.batch_size,
            "images_per_sec": n / end_to_end, "decode_images_per_sec": n / decode,
            "encode_images_per_sec": n / encode, "texts_per_sec": len(prompts) / text,
            "decode_threads": features.DECODE_THREADS, "devices": jax.device_count(),
            "backend": jax.default_backend(), "data": source or f"{n} generated 500x375 JPEGs"}


LOSS_BATCHES = [1024 * 2 ** i for i in range(7)]    # 1k .. 64k


def _loss_memory(name, batch, embed_dim, block_size, mesh, batch_axes):
    """XLA's compiled-memory figures (bytes per device) of value_and_grad of loss `name` with
    respect to both embeddings and the scale (and bias), for a global `batch`: compiled
    ahead of time from shapes, nothing is allocated or run."""
    import jax.numpy as jnp
    import ml_collections

    from clip_jax import losses, sharding
    loss = losses.make_loss(ml_collections.ConfigDict(dict(name=name, block_size=block_size)),
                            mesh, batch_axes)
    split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(batch_axes))
    embeds = jax.ShapeDtypeStruct((batch, embed_dim), jnp.float32, sharding=split)
    scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=sharding.replicated(mesh))
    if name == "siglip":
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
    import ml_collections

    from clip_jax import sharding
    from clip_jax.aot import search_largest
    from clip_jax.config_lib import DEFAULT_RULES
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


def main():
    from absl import app, flags
    from ml_collections import config_flags

    # Before the config flag is defined: with a default file, config_flags applies the
    # --config.* overrides at definition time and would fail there with a bare AttributeError.
    config_lib.check_cli_overrides_or_exit(sys.argv, default=DEFAULT_CONFIG)
    sys.argv = [a.replace("--peak-tflops", "--peak_tflops", 1) if a.startswith("--peak-tflops") else a
                for a in sys.argv]

    config_flag = config_flags.DEFINE_config_file(
        "config", DEFAULT_CONFIG, "Config file; override keys with --config.key=value.",
        lock_config=True)
    flags.DEFINE_integer("steps", 10, "train: timed steps per repeat")
    flags.DEFINE_integer("warmup", 2, "train: untimed steps after compilation")
    flags.DEFINE_integer("batches", 20, "data: timed batches per repeat")
    flags.DEFINE_integer("repeats", 3, "timing windows; the median is reported")
    flags.DEFINE_string("source", None, "data: the data source (default: the config's data.source)")
    flags.DEFINE_list("workers", None, "data: Grain worker counts to time, e.g. 0,2 "
                      "(default: the config's data.workers)")
    flags.DEFINE_integer("images", 512, "evaluate: how many images to time (generated or "
                         "the first of --source)")
    flags.DEFINE_integer("eval_batch_size", 256, "evaluate: images or texts per batch")
    flags.DEFINE_string("checkpoint_dir", None, "checkpoint: where to write (default: a temporary "
                        "directory); point it at the filesystem your runs use")
    flags.DEFINE_list("losses", ["clip", "clip_blockwise", "siglip"], "loss: the losses to measure")
    flags.DEFINE_list("global_batches", [str(b) for b in LOSS_BATCHES],
                      "loss: global batch sizes (multiples of the device count)")
    flags.DEFINE_integer("embed_dim", 512, "loss: embedding dimension")
    flags.DEFINE_integer("block_size", 1024, "loss: clip_blockwise's column block")
    flags.DEFINE_float("budget_gib", 16.0, "loss: per-device memory budget in GiB (2^30 bytes) "
                       "for the largest-batch search")
    flags.DEFINE_integer("search_max", 2 ** 24, "loss: largest global batch the search tries "
                         "(0: report only the largest fitting batch of --global_batches)")
    flags.DEFINE_float("peak_tflops", None, "train: peak TFLOP/s of one device for MFU (e.g. 989 "
                       "for an H100's dense bfloat16); default: measured here, the best rate of square "
                       "matmuls of several sizes in the config's compute dtype. Also spelled --peak-tflops")
    flags.DEFINE_bool("json", False, "print the figures as one JSON object on the last line")
    FLAGS = flags.FLAGS

    def run(argv):
        config_lib.quiet_absl_logging()
        mode = argv[1] if len(argv) > 1 else "train"
        if mode not in ("train", "data", "evaluate", "checkpoint", "loss") or len(argv) > 2:
            sys.exit("error: usage: python -m clip_jax.benchmark [train|data|evaluate|checkpoint|loss] "
                     f"[flags]; got {argv[1:]}")
        if mode == "loss":                  # no config: the loss alone, on synthetic shapes
            try:
                result = {"mode": "loss", **benchmark_loss(
                    FLAGS.losses, [int(b) for b in FLAGS.global_batches], FLAGS.embed_dim,
                    FLAGS.block_size, FLAGS.budget_gib, FLAGS.search_max)}
            except ValueError as e:
                sys.exit(f"error: {e}")
            print_loss_table(result)
            if FLAGS.json:
                print(json.dumps(result))
            return
        config = config_flag.value
        try:
            with config.unlocked():
                if FLAGS.source:
                    config.data.source = FLAGS.source
            from clip_jax import validation   # imports the evaluators: only for these modes
            validation.validate(config, jax.device_count())
            if mode == "evaluate":
                result = {"mode": "evaluate", **benchmark_evaluate(
                    config, FLAGS.source, FLAGS.images, FLAGS.repeats, FLAGS.eval_batch_size)}
                print(f"evaluate: {result['images_per_sec']:.0f} images/s from files "
                      f"(decode + crop {result['decode_images_per_sec']:.0f}/s on "
                      f"{result['decode_threads']} threads, image tower "
                      f"{result['encode_images_per_sec']:.0f}/s), text tower "
                      f"{result['texts_per_sec']:.0f} texts/s ({result['image_size']}px, "
                      f"{result['devices']} {result['backend']} devices)")
            elif mode == "data":
                workers = [int(w) for w in (FLAGS.workers or [config.data.workers])]
                by_workers, per_core = benchmark_data(config, workers, FLAGS.batches, FLAGS.repeats)
                result = {"mode": "data", "source": config.data.source, "batch_size": config.batch_size,
                          "image_size": config.model.vision.image_size,
                          "workers": by_workers, "per_core": per_core}
                for w, r in result["workers"].items():
                    print(f"data: {r['images_per_sec']:.0f} images/s with {w} workers "
                          f"(batch {config.batch_size}, {config.model.vision.image_size}px)")
                print(f"data: {per_core['simplejpeg']:.0f} images/s per core (in-process); "
                      f"{per_core['pil']:.0f} with PIL decoding the JPEGs "
                      f"({per_core['simplejpeg'] / per_core['pil']:.2f}x)")
            elif mode == "checkpoint":
                result = {"mode": "checkpoint", **benchmark_checkpoint(config, FLAGS.repeats,
                                                                        FLAGS.checkpoint_dir)}
                print(f"checkpoint: {result['parameters']:,} parameters, "
                      f"{result['checkpoint_bytes'] / 1e6:.1f} MB on disk "
                      f"({result['state_bytes'] / 1e6:.1f} MB in memory); save blocks "
                      f"{result['save_blocking_seconds']:.2f} s, completes in "
                      f"{result['save_seconds']:.2f} s; restore {result['restore_seconds']:.2f} s")
            else:
                result = {"mode": "train", **benchmark_train(config, FLAGS.steps, FLAGS.warmup,
                                                             FLAGS.repeats, FLAGS.peak_tflops)}
                r = result
                print(f"train: {r['samples_per_sec']:.2f} samples/s, step median "
                      f"{r['step_seconds_median'] * 1e3:.1f} ms (min {r['step_seconds_min'] * 1e3:.1f}, "
                      f"max {r['step_seconds_max'] * 1e3:.1f}; batch {config.batch_size}, "
                      f"{r['dtype']}, remat {r['remat']}, {r['devices']} {r['backend']} devices)\n"
                      f"       {r['achieved_tflops'] * 1e3:.1f} GFLOP/s executed "
                      f"({r['flops_per_step'] / 1e9:.0f} GFLOP/step, XLA cost analysis), model "
                      f"{r['model_tflops'] * 1e3:.1f} GFLOP/s; peak {r['peak_tflops_per_device'] * 1e3:.0f} "
                      f"GFLOP/s per device ({r['peak_source']}): MFU {100 * r['mfu']:.1f}%, "
                      f"HFU {100 * r['hfu']:.1f}%")
        except (config_lib.ConfigError, ValueError) as e:
            sys.exit(f"error: {e}")
        if FLAGS.json:
            print(json.dumps(result))

    app.run(run)


if __name__ == "__main__":
    main()
