"""Evaluation: `python -m clip_jax.evaluate TASK --workdir=RUN (or --checkpoint=PATH) --data=SPEC`.

Tasks (evaluators chosen by name: clip_jax/evals/registry.py):
  zeroshot      top-1, top-5 and mean per-class accuracy of the prompt-ensembled text
                classifier, and the per-class table (clip_jax/evals/zeroshot.py)
  retrieval     image->text and text->image Recall@1/5/10 over images with one or more
                captions each (clip_jax/evals/retrieval.py)
  linear_probe  L-BFGS logistic regression on frozen image features of --train-data, L2
                strength chosen on a held-out split of it, scored on --data
                (clip_jax/evals/linear_probe.py)
--group-by ATTRIBUTE (zeroshot, linear_probe) adds accuracy per value of the attribute and
the gap between the best and worst group: the paper's bias probe for any labelled data.
What --data accepts is in clip_jax/evals/data.py. With --json the last line printed is a
JSON object of every figure. On several processes (--distributed, as training's) each
decodes and embeds only its share of the images; the figures are those of one process.

The same evaluators run during training for each entry of `config.evals`
(`TrainingEvaluators`), every `config.eval_every` steps and at the end, logging
`<task>/<name>/<figure>` (and `zeroshot/top1`, the mean top-1 of the zero-shot entries).

NaN or infinite embeddings are never scored (an argmax over NaN logits makes a plausible
figure): the encoders raise `inference.NonFiniteEmbeddings` naming the checkpoint. The
command line stops with that error; during training the entry's figures are logged as NaN
with a WARNING line and training goes on -- whether the run itself is lost is for its own
non-finite guard (`config.max_bad_steps`) to decide, not for an evaluation.
"""
import argparse
import json
import sys

import numpy as np

from clip_jax import checkpoint, distributed, inference
from clip_jax.data import spec as spec_lib
from clip_jax.evals import registry

COMMAND_LINE = "python -m clip_jax.evaluate"


# ----------------------------------------------------------------------------- training

def uses_synthetic(config):
    return str(config.data.source) == "synthetic"


def training_evaluators(config):
    """[(name, Evaluator)] of `config.evals`; entries on synthetic[:ATTR] data run only when
    training on the synthetic data (they measure the embedded task)."""
    evaluators = []
    for name, entry in config.get("evals", {}).items():
        entry = dict(entry)
        task, spec = entry.pop("task", ""), str(entry.pop("data", ""))
        if not spec:
            raise ValueError(f"config.evals.{name}: needs data")
        if spec_lib.names_synthetic(spec) and not uses_synthetic(config):
            continue
        evaluators.append((name, registry.create(task, spec, config, entry, f"config.evals.{name}")))
    return evaluators


class TrainingEvaluators:
    """`config.evals`, run on the training state: state -> {metric name: value}."""

    def __init__(self, config, tokenizer, mesh, rules):
        self.evaluators = training_evaluators(config)
        # At most the training batch (CLIPModel rounds it to the mesh's batch shards).
        self.model = inference.CLIPModel(config, None, tokenizer, mesh, rules, min(256, config.batch_size))

    def __bool__(self):
        return bool(self.evaluators)

    def __call__(self, state):
        params, batch_stats = state.params, state.batch_stats
        self.model.variables = {"params": params, "batch_stats": batch_stats} if batch_stats else {"params": params}
        out, averaged = {}, {}
        try:
            for name, evaluator in self.evaluators:
                try:
                    result = evaluator.run(self.model, progress=False)
                except inference.NonFiniteEmbeddings as e:
                    distributed.log(f"WARNING: evaluation {evaluator.task}/{name} logged as NaN: {e}")
                    result = {key: float("nan") for key in evaluator.figures()}
                for key in evaluator.logged:
                    if key in result:
                        out[f"{evaluator.task}/{name}/{key}"] = float(result[key])
                for key in evaluator.averaged:
                    averaged.setdefault(f"{evaluator.task}/{key}", []).append(result[key])
        finally:
            self.model.variables = None
        out.update({key: float(np.mean(values)) for key, values in averaged.items()})
        return out


# ----------------------------------------------------------------------------- command line

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
    p.add_argument("--data", required=True, help="the evaluation data: an ImageFolder, an ingested "
                   "directory, a CSV file, tfds:NAME[:VERSION]:SPLIT or synthetic[:ATTR] (see "
                   "clip_jax/evals/data.py)")
    for key, option in registry.all_options().items():
        p.add_argument(registry.flag(key), type=type(option.default), default=option.default,
                       help=_help(key, option))
    p.add_argument("--batch-size", type=int, default=256, help="images or texts per device batch "
                   "across the mesh (default 256)")
    p.add_argument("--cache-dir", default="", help="store image features here and reuse them for "
                   "the same checkpoint and data (default: no cache)")
    p.add_argument("--distributed", choices=("auto", "on", "off"), default="auto",
                   help="run on several processes (hosts) with jax.distributed, each decoding "
                   "its share of the images: 'auto' when the three options below are given or "
                   "JAX detects a cluster (as python -m clip_jax.train)")
    p.add_argument("--coordinator-address", default=None, help="host:port of process 0's coordinator")
    p.add_argument("--num-processes", type=int, default=None, help="number of processes")
    p.add_argument("--process-id", type=int, default=None, help="this process's index")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print every figure as a JSON object on the last line")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    import absl.logging
    absl.logging.set_verbosity(absl.logging.ERROR)   # orbax's notes on reading a checkpoint
    options = {key: getattr(args, key) for key in registry.all_options()}
    try:
        options = registry.check(args.task, options, COMMAND_LINE, flags=True)
        distributed.initialize(args.distributed, args.coordinator_address, args.num_processes,
                               args.process_id)
        model = inference.load(args.workdir or args.checkpoint, batch_size=args.batch_size)
        evaluator = registry.get(args.task)(args.data, model.config, **options)
        result = evaluator.run(model, cache_dir=args.cache_dir, progress=not args.no_progress)
    except (ValueError, OSError, checkpoint.CheckpointError) as e:
        sys.exit(f"error: {e}")
    result["checkpoint"] = model.source
    if distributed.is_main():          # every process has the figures; one prints them
        print_report(result)
        if args.json:
            print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
