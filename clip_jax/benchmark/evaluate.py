"""`evaluate` mode: evaluation throughput of the config's model (randomly initialised).

Image features from the files end to end, and their two halves timed apart (decoding +
centre crop on the evaluation's thread pool; the image tower on decoded pixels), then
prompt texts through the text tower. The default images are `photos.make_corpus`'s.
"""
import tempfile

import jax
import numpy as np

from clip_jax import models, sharding
from clip_jax.benchmark import photos
from clip_jax.benchmark.timing import median_time
from clip_jax.data import tokenizer as tokenizer_lib
from clip_jax.data.pipeline import normalize_images
from clip_jax.evals import data as data_lib, features, linear_probe
from clip_jax.inference import CLIPModel
from clip_jax.models import init_variables


def benchmark_evaluate(config, source, num_images, repeats, batch_size):
    """{'images_per_sec', 'decode_images_per_sec', 'encode_images_per_sec', 'texts_per_sec', ...}."""
    mesh, rules = sharding.make_mesh(config.mesh), tuple(tuple(r) for r in config.sharding_rules)
    model = models.from_config(config)
    variables = init_variables(model, config.model, jax.random.key(0), mesh, rules)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = tokenizer_lib.get_tokenizer(config, tmp)
        clip = CLIPModel(config, variables, tokenizer, mesh, rules, batch_size)
        spec = source or photos.make_corpus(tmp + "/photos", num_images)
        data = data_lib.open_eval_data(spec).head(num_images)
        views = features.Views(data, clip.image_size)
        pixels = normalize_images(np.stack([views[i] for i in range(len(data))]))
        prompts = [f"a photo of a {i % 1000} thing." for i in range(4 * len(data))]
        # Each first call compiles and warms the file cache; the medians are of the rest.
        end_to_end = median_time(lambda: features.image_features(clip, data, progress=False), repeats)
        decode = median_time(lambda: list(features.decoded_batches(data, clip.image_size,
                                                                   clip.batch_size)), repeats)
        encode = median_time(lambda: clip.encode_image(pixels), repeats)
        text = median_time(lambda: features.text_features(clip, prompts, progress=False), repeats)
    n = len(data)
    return {"images": n, "image_size": clip.image_size, "batch_size": clip.batch_size,
            "images_per_sec": n / end_to_end, "decode_images_per_sec": n / decode,
            "encode_images_per_sec": n / encode, "texts_per_sec": len(prompts) / text,
            "decode_threads": features.DECODE_THREADS, "devices": jax.device_count(),
            "backend": jax.default_backend(),
            "data": source or f"{n} generated photos (clip_jax.benchmark.photos)"}


def print_evaluate(result):
    print(f"evaluate: {result['images_per_sec']:.0f} images/s from files "
          f"(decode + crop {result['decode_images_per_sec']:.0f}/s on "
          f"{result['decode_threads']} threads, image tower "
          f"{result['encode_images_per_sec']:.0f}/s), text tower "
          f"{result['texts_per_sec']:.0f} texts/s ({result['image_size']}px, "
          f"{result['devices']} {result['backend']} devices)")


IMAGENET_TRAIN = 1_281_167      # ImageNet-1k's training images: the probe the estimate is for


def benchmark_probe(rows, dim, classes, iterations, repeats, sklearn=True):
    """The linear probe's solver (`linear_probe.JaxSolver`) timed for `iterations` L-BFGS
    iterations (never stopping early) on random features [rows, dim] of `classes` classes,
    on all devices; scikit-learn's solver for the same iterations beside it (`sklearn`).
    Each iteration costs ~ 4 x rows x dim x classes FLOPs (the loss and its gradient in one
    pass; more when the line search tries several steps), so time per iteration grows linearly with the rows: the
    estimate for ImageNet-1k's 1.28M training images is the measured time scaled by rows,
    and a probe's worst case is 16 fits (15 of the C search, the refit) x 1,000 iterations."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, classes, rows)
    x = (rng.standard_normal((classes, dim)) * 0.5)[y] + rng.standard_normal((rows, dim))
    x = x.astype(np.float32)
    solver = linear_probe.JaxSolver(x, y, max_iter=iterations, tol=0.0)

    def fit():
        params, done = solver.fit(1.0)
        jax.block_until_ready(params)
        assert done == iterations, done
    per_iteration = median_time(fit, repeats) / iterations
    flops = 4.0 * rows * dim * len(solver.classes_)
    out = {"rows": rows, "dim": dim, "classes": classes, "iterations": iterations,
           "seconds_per_iteration": per_iteration, "tflops_per_sec": flops / per_iteration / 1e12,
           "imagenet_seconds_per_iteration": per_iteration * IMAGENET_TRAIN / rows,
           "imagenet_worst_case_hours": per_iteration * IMAGENET_TRAIN / rows * 16 * 1000 / 3600,
           "devices": jax.device_count(), "backend": jax.default_backend()}
    if sklearn:
        out["sklearn_seconds_per_iteration"] = median_time(
            lambda: linear_probe.fit(x, y, 1.0, max_iter=iterations, tol=0.0), 1, warmup=0) / iterations
    return out


def print_probe(result):
    r = result
    line = (f"linear probe (JAX L-BFGS, {r['devices']} {r['backend']} devices): "
            f"{r['seconds_per_iteration']:.3f} s per iteration on {r['rows']:,} x {r['dim']} features, "
            f"{r['classes']} classes ({r['tflops_per_sec']:.2f} TFLOP/s)")
    if "sklearn_seconds_per_iteration" in r:
        line += (f"; scikit-learn {r['sklearn_seconds_per_iteration']:.3f} s "
                 f"({r['sklearn_seconds_per_iteration'] / r['seconds_per_iteration']:.1f}x)")
    print(line)
    print(f"  ImageNet-1k ({IMAGENET_TRAIN:,} rows) on these devices: "
          f"{r['imagenet_seconds_per_iteration']:.2f} s per iteration; worst case (16 fits x 1,000 "
          f"iterations) {r['imagenet_worst_case_hours']:.1f} h")
