"""Evaluation: `python -m clip_jax.evaluate TASK --workdir=RUN (or --checkpoint=PATH) --data=SPEC`.

Tasks (evaluators chosen by name: clip_jax/evals/registry.py):
  zeroshot      top-1, top-5 and mean per-class accuracy of the prompt-ensembled text
                classifier, and the per-class table (clip_jax/evals/zeroshot.py)
  retrieval     image->text and text->image Recall@1/5/10 over images with one or more
                captions each (clip_jax/evals/retrieval.py)
  linear_probe  L-BFGS logistic regression on frozen image features of --train-data, L2
                strength chosen on a held-out split of it, scored on --data
                (clip_jax/evals/linear_probe.py)
  suite         several datasets in one command, each with the tasks its data supports,
                written as CLIP_benchmark's JSON files and one table (clip_jax/evals/suite.py):
                python -m clip_jax.evaluate suite --checkpoint=PATH --datasets=imagenet1k,cifar10
                    --data-root=DIR [--out=DIR]
--group-by ATTRIBUTE (zeroshot, linear_probe) adds accuracy per value of the attribute and
the gap between the best and worst group: the paper's bias probe for any labelled data.
What --data accepts is in clip_jax/evals/data.py. With --json the last line printed is a
JSON object of every figure. On several processes (--distributed, as training's) each
decodes and embeds only its share of the images; the figures are those of one process.

The same evaluators run during training for each entry of `config.evals`
(clip_jax/evals/training.py).

NaN or infinite embeddings are never scored (an argmax over NaN logits makes a plausible
figure): the encoders raise `inference.NonFiniteEmbeddings` naming the checkpoint, and the
command line stops with that error.
"""
import argparse
import json

from clip_jax import checkpoint, cli, compile_cache, distributed, inference
from clip_jax.evals import registry, suite

COMMAND_LINE = "python -m clip_jax.evaluate"


def print_report(result):
    print(registry.get(result["task"]).format_result(result))


def _help(key, option):
    """The option's help, prefixed with the tasks that take it when not all do."""
    tasks = [task for task, cls in registry.REGISTRY.items() if key in cls.options]
    return option.help if len(tasks) == len(registry.REGISTRY) else f"{', '.join(tasks)}: {option.help}"


def parse_args(argv):
    p = argparse.ArgumentParser(prog=COMMAND_LINE, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("task", choices=list(registry.REGISTRY))
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--workdir", help="a training run's directory: its newest checkpoint")
    src.add_argument("--checkpoint", help="a checkpoint step directory, or converted weights "
                     "(anything clip_jax.load opens)")
    p.add_argument("--data", help="the evaluation data: an ImageFolder, an ingested "
                   "directory, CLIP_benchmark's WebDataset folder (nshards.txt, or test/nshards.txt), "
                   "a CSV file, tfds:NAME[:VERSION]:SPLIT or synthetic[:ATTR] (see "
                   "clip_jax/evals/data.py)")
    p.add_argument("--datasets", help="suite: its comma-separated datasets, names under --data-root "
                   "(imagenet1k, cifar10, ...) or data specs as --data takes")
    for key, option in registry.all_options().items():
        p.add_argument(registry.flag(key), type=type(option.default), default=option.default,
                       help=_help(key, option))
    p.add_argument("--batch-size", type=int, default=256, help="images or texts per device batch "
                   "across the mesh (default 256)")
    p.add_argument("--cache-dir", default="", help="store image features here and reuse them for "
                   "the same checkpoint and data (default: no cache)")
    p.add_argument("--compile-cache", default="workdir", help="JAX's persistent compilation "
                   "cache: 'workdir' (default: WORKDIR/compile_cache with --workdir, none with "
                   "--checkpoint), a directory, or '' (off)")
    p.add_argument("--distributed", choices=("auto", "on", "off"), default="auto",
                   help="run on several processes (hosts) with jax.distributed, each decoding "
                   "its share of the images: 'auto' when the three options below are given or "
                   "JAX detects a cluster (as python -m clip_jax.train)")
    p.add_argument("--coordinator-address", default=None, help="host:port of process 0's coordinator")
    p.add_argument("--num-processes", type=int, default=None, help="number of processes")
    p.add_argument("--process-id", type=int, default=None, help="this process's index")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print every figure as a JSON object on the last line")
    args = p.parse_args(argv)
    if args.task == suite.Suite.task:
        args.data, args.out = args.datasets or args.data, args.out or suite.DEFAULT_OUT
    elif args.datasets:
        p.error(f"--datasets is the suite's list of datasets; {args.task} reads --data")
    if not args.data:
        p.error("the following arguments are required: " + ("--datasets" if args.task == "suite" else "--data"))
    return args


def main(argv=None):
    import sys
    args = parse_args(sys.argv[1:] if argv is None else list(argv))
    import absl.logging
    absl.logging.set_verbosity(absl.logging.ERROR)   # orbax's notes on reading a checkpoint
    options = {key: getattr(args, key) for key in registry.all_options()}
    with cli.stop_on(ValueError, OSError, checkpoint.CheckpointError):
        options = registry.check(args.task, options, COMMAND_LINE, flags=True)
        distributed.initialize(args.distributed, args.coordinator_address, args.num_processes,
                               args.process_id)
        compile_cache.use(args.compile_cache, args.workdir)
        model = inference.load(args.workdir or args.checkpoint, batch_size=args.batch_size)
        evaluator = registry.get(args.task)(args.data, model.config, **options)
        result = evaluator.run(model, cache_dir=args.cache_dir, progress=not args.no_progress)
    result["checkpoint"] = model.source
    if distributed.is_main():          # every process has the figures; one prints them
        print_report(result)
        if args.json:
            print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
