"""The command line of `python -m clip_jax.benchmark [MODE]` (see the package docstring)."""
import json
import sys

import jax
from absl import flags

from clip_jax import cli, losses, validation
from clip_jax.benchmark import checkpoint, data, evaluate, loss, train

DEFAULT_CONFIG = "configs/smoke.py"
MODES = ("train", "data", "evaluate", "checkpoint", "loss")


def _define_flags():
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
    flags.DEFINE_integer("probe_rows", 20000, "evaluate: the linear probe's timed problem, rows "
                         "(0: no probe timing)")
    flags.DEFINE_integer("probe_dim", 768, "evaluate: the probe's feature dimension")
    flags.DEFINE_integer("probe_classes", 1000, "evaluate: the probe's classes")
    flags.DEFINE_integer("probe_iterations", 10, "evaluate: L-BFGS iterations per timed fit")
    flags.DEFINE_bool("probe_sklearn", True, "evaluate: time scikit-learn's solver beside it")
    flags.DEFINE_string("checkpoint_dir", None, "checkpoint: where to write (default: a temporary "
                        "directory); point it at the filesystem your runs use")
    flags.DEFINE_list("losses", list(losses.LOSSES), "loss: the losses to measure (default: all)")
    flags.DEFINE_list("global_batches", [str(b) for b in loss.LOSS_BATCHES],
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


def run_mode(mode, config, f):
    """The figures of `mode` as a dict (printed as a table or line on the way)."""
    if mode == "loss":                  # no config: the loss alone, on synthetic shapes
        result = loss.benchmark_loss(f.losses, [int(b) for b in f.global_batches], f.embed_dim,
                                     f.block_size, f.budget_gib, f.search_max)
        loss.print_loss_table(result)
        return result
    with config.unlocked():
        if f.source:
            config.data.source = f.source
    validation.validate(config, jax.device_count())
    if mode == "evaluate":
        result = evaluate.benchmark_evaluate(config, f.source, f.images, f.repeats, f.eval_batch_size)
        evaluate.print_evaluate(result)
        if f.probe_rows:
            result["probe"] = evaluate.benchmark_probe(f.probe_rows, f.probe_dim, f.probe_classes,
                                                       f.probe_iterations, f.repeats, f.probe_sklearn)
            evaluate.print_probe(result["probe"])
    elif mode == "data":
        workers = [int(w) for w in (f.workers or [config.data.workers])]
        by_workers, per_core = data.benchmark_data(config, workers, f.batches, f.repeats)
        result = {"source": config.data.source, "batch_size": config.batch_size,
                  "image_size": config.model.vision.image_size,
                  "workers": by_workers, "per_core": per_core}
        data.print_data(result)
    elif mode == "checkpoint":
        result = checkpoint.benchmark_checkpoint(config, f.repeats, f.checkpoint_dir)
        checkpoint.print_checkpoint(result)
    else:
        result = train.benchmark_train(config, f.steps, f.warmup, f.repeats, f.peak_tflops)
        train.print_train(result)
    return result


def main():
    sys.argv = [a.replace("--peak-tflops", "--peak_tflops", 1) if a.startswith("--peak-tflops") else a
                for a in sys.argv]
    config_flag = cli.config_flag(default=DEFAULT_CONFIG)
    _define_flags()

    def run(argv):
        mode = argv[1] if len(argv) > 1 else "train"
        if mode not in MODES or len(argv) > 2:
            cli.fail(f"usage: python -m clip_jax.benchmark [{'|'.join(MODES)}] [flags]; got {argv[1:]}")
        with cli.stop_on(ValueError):     # config_lib.ConfigError is one
            config = None if mode == "loss" else config_flag.value
            result = {"mode": mode, **run_mode(mode, config, flags.FLAGS)}
        if flags.FLAGS.json:
            print(json.dumps(result))

    cli.run(run)


if __name__ == "__main__":
    main()
