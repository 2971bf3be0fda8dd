"""`data` mode: images/s of the host input pipeline alone (read, decode, crop, tokenise).

Per Grain worker count, and per core in this process with the pipeline's JPEG decoder
(simplejpeg) and with PIL alone, timed in alternating windows so both see the same machine.
"""
import statistics
import tempfile
from unittest import mock

from clip_jax.benchmark.timing import timed, timings
from clip_jax.data import images, pipeline, tokenizer as tokenizer_lib


def benchmark_data(config, workers_list, batches, repeats):
    """({workers: {'images_per_sec', 'batch_seconds_median'}}, {decoder: images/s per core})."""
    with tempfile.TemporaryDirectory() as workdir:    # a workdir tokenizer, trained afresh
        tokenizer = tokenizer_lib.get_tokenizer(config, workdir)
    results = {}
    for workers in workers_list:
        config.data.workers = workers
        it = iter(pipeline.make_host_dataset(config, tokenizer))
        next(it)                                         # start-up (worker processes, first reads)
        windows = timings(lambda: [next(it) for _ in range(batches)], repeats, warmup=0)
        getattr(it, "close", lambda: None)()
        per_batch = statistics.median(windows) / batches
        results[str(workers)] = {"images_per_sec": config.batch_size / per_batch,
                                 "batch_seconds_median": per_batch}
    return results, _per_core_by_decoder(config, tokenizer, batches, repeats)


def _per_core_by_decoder(config, tokenizer, batches, repeats):
    """{decoder: images/s} of the pipeline in this process (one core): JPEGs decoded by
    simplejpeg (what the pipeline does) and by PIL alone, in alternating timing windows."""
    config.data.workers = 0
    it = iter(pipeline.make_host_dataset(config, tokenizer))
    next(it)
    windows = {"simplejpeg": [], "pil": []}
    for r in range(repeats):
        for decoder in (("simplejpeg", "pil") if r % 2 == 0 else ("pil", "simplejpeg")):
            fast = images._decode_jpeg if decoder == "simplejpeg" else (lambda data, size: None)
            with mock.patch.object(images, "_decode_jpeg", fast):
                windows[decoder].append(timed(lambda: [next(it) for _ in range(batches)])[1])
    return {decoder: config.batch_size * batches / statistics.median(w)
            for decoder, w in windows.items()}


def print_data(result):
    for w, r in result["workers"].items():
        print(f"data: {r['images_per_sec']:.0f} images/s with {w} workers "
              f"(batch {result['batch_size']}, {result['image_size']}px)")
    per_core = result["per_core"]
    print(f"data: {per_core['simplejpeg']:.0f} images/s per core (in-process); "
          f"{per_core['pil']:.0f} with PIL decoding the JPEGs "
          f"({per_core['simplejpeg'] / per_core['pil']:.2f}x)")
