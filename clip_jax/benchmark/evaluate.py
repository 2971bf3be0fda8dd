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
from clip_jax.evals import data as data_lib, features
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
