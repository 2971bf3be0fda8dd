"""Evaluation: `python -m clip_jax.evaluate TASK --workdir=RUN (or --checkpoint=PATH) --data=SPEC`.

Tasks (evaluators chosen by name, `EVALUATORS`):
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
"""
import argparse
import json
import sys

import numpy as np

from clip_jax.evals import data as data_lib

EVALUATORS = ("zeroshot", "retrieval", "linear_probe")
# Figures logged to metrics.jsonl / TensorBoard during training, per task.
LOGGED = {"zeroshot": ("top1", "top5", "mean_per_class", "group_gap"),
          "retrieval": ("image_to_text_R@1", "image_to_text_R@5", "image_to_text_R@10",
                        "text_to_image_R@1", "text_to_image_R@5", "text_to_image_R@10"),
          "linear_probe": ("top1", "mean_per_class", "group_gap")}
# config.evals entry keys (besides task and data) and CLI options, with their defaults.
OPTIONS = dict(train_data="", templates="", classnames="", group_by="", max_examples=0,
               val_fraction=0.2, data_dir="", image_key="image", label_key="label",
               caption_key="caption", image_column="filepath", caption_column="caption",
               label_column="")
COMMAND_LINE = "python -m clip_jax.evaluate"
TASK_OPTIONS = {"train_data": ("linear_probe",), "val_fraction": ("linear_probe",),
                "templates": ("zeroshot",), "classnames": ("zeroshot", "linear_probe"),
                "group_by": ("zeroshot", "linear_probe")}


def check_spec(task, options, where):
    """Raises ValueError (naming `where`) for an unknown task or an option it does not take.
    Options are named as flags (--train-data) when `where` is the command line."""
    cli = where == COMMAND_LINE
    name = (lambda key: "--" + key.replace("_", "-")) if cli else (lambda key: key)
    if task not in EVALUATORS:
        raise ValueError(f"{where}: unknown task {task!r} (available: {', '.join(EVALUATORS)})")
    for key, value in options.items():
        if key not in OPTIONS:
            raise ValueError(f"{where}: unknown option {key!r} (options: {', '.join(OPTIONS)})")
        if value != OPTIONS[key] and task not in TASK_OPTIONS.get(key, (task,)):
            raise ValueError(f"{where}: {name(key)} does not apply to {task}")
    if task == "linear_probe" and not options.get("train_data"):
        raise ValueError(f"{where}: linear_probe needs {name('train_data')}")


def open_data(spec, config, options):
    o = {**OPTIONS, **options}
    data = data_lib.open_eval_data(
        spec, config, data_dir=o["data_dir"], image_key=o["image_key"], label_key=o["label_key"],
        caption_key=o["caption_key"], image_column=o["image_column"],
        caption_column=o["caption_column"], label_column=o["label_column"],
        classnames=o["classnames"])
    return data.head(int(o["max_examples"]))


class Task:
    """One evaluation: its data opened once, run on whatever variables the model holds."""

    def __init__(self, task, data_spec, config, options, where=COMMAND_LINE):
        options = {k: v for k, v in options.items() if k in OPTIONS}
        check_spec(task, options, where)
        self.task, self.options = task, {**OPTIONS, **options}
        self.data = open_data(data_spec, config, options)
        self.train_data = (open_data(self.options["train_data"], config, options)
                           if task == "linear_probe" else None)
        self.templates = None
        if self.options["templates"]:
            from clip_jax.data import prompts
            self.templates = prompts.load_templates(self.options["templates"])
        if self.options["group_by"]:
            self.data.group_values(self.options["group_by"])   # a bad attribute fails now

    def __call__(self, model, cache_dir="", progress=True):
        from clip_jax.evals import linear_probe, retrieval, zeroshot
        o = self.options
        if self.task == "zeroshot":
            return zeroshot.evaluate(model, self.data, self.templates, o["group_by"], cache_dir, progress)
        if self.task == "retrieval":
            return retrieval.evaluate(model, self.data, cache_dir, progress)
        return linear_probe.evaluate(model, self.train_data, self.data, float(o["val_fraction"]),
                                     0, o["group_by"], cache_dir, progress)


# ----------------------------------------------------------------------------- training

def uses_synthetic(config):
    return str(config.data.source) == "synthetic"


def training_tasks(config):
    """[(name, Task)] of `config.evals`; entries on synthetic[:ATTR] data run only when
    training on the synthetic data (they measure the embedded task)."""
    tasks = []
    for name, entry in config.get("evals", {}).items():
        entry = dict(entry)
        task, spec = entry.pop("task", ""), str(entry.pop("data", ""))
        if not spec:
            raise ValueError(f"config.evals.{name}: needs data")
        if spec.split(":")[0] == "synthetic" and not uses_synthetic(config):
            continue
        tasks.append((name, Task(task, spec, config, entry, where=f"config.evals.{name}")))
    return tasks


class TrainingEvaluators:
    """`config.evals`, run on the training state: state -> {metric name: value}."""

    def __init__(self, config, tokenizer, mesh, rules):
        from clip_jax.inference import CLIPModel
        self.tasks = training_tasks(config)
        # At most the training batch (CLIPModel rounds it to the mesh's batch shards).
        self.model = CLIPModel(config, None, tokenizer, mesh, rules, min(256, config.batch_size))

    def __bool__(self):
        return bool(self.tasks)

    def __call__(self, state):
        params, batch_stats = state.params, state.batch_stats
        self.model.variables = {"params": params, "batch_stats": batch_stats} if batch_stats else {"params": params}
        out, zeroshot_top1 = {}, []
        try:
            for name, task in self.tasks:
                result = task(self.model, progress=False)
                for key in LOGGED[task.task]:
                    if key in result:
                        out[f"{task.task}/{name}/{key}"] = float(result[key])
                if task.task == "zeroshot":
                    zeroshot_top1.append(result["top1"])
        finally:
            self.model.variables = None
        if zeroshot_top1:
            out["zeroshot/top1"] = float(np.mean(zeroshot_top1))
        return out


# ----------------------------------------------------------------------------- command line

def print_report(result):
    from clip_jax.evals import report
    task = result["task"]
    if task == "retrieval":
        print(f"retrieval on {result['data']}: {result['images']} images, {result['texts']} captions")
        for way in ("image_to_text", "text_to_image"):
            print(f"  {way.replace('_', ' '):14s}" + "  ".join(
                f"R@{k} {100 * result[f'{way}_R@{k}']:6.2f}%" for k in (1, 5, 10)))
        return
    head = f"{task} on {result['data']}: {result['n']} images, {len(result['per_class'])} classes"
    if task == "linear_probe":
        head += (f"; trained on {result['train_data']} ({result['train_n']} images), C={result['C']:.3g} "
                 f"(held-out top-1 {100 * result['val_top1']:.2f}%, {result['C_tried']} values tried)")
    else:
        head += f", {result['templates']} prompt templates"
    print(head)
    print(f"  top-1 {100 * result['top1']:.2f}%  top-5 {100 * result['top5']:.2f}%  "
          f"mean per-class {100 * result['mean_per_class']:.2f}%")
    print(report.format_table(result["per_class"], ["class", "n", "top1"]))
    if "groups" in result:
        rows = [{"group": g, **v} for g, v in result["groups"].items()]
        print(f"by {result['group_by']}: gap {100 * result['group_gap']:.2f} points "
              f"(worst: {result['worst_group']})")
        print(report.format_table(rows, ["group", "n", "top1"]))


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m clip_jax.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("task", choices=EVALUATORS)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--workdir", help="a training run's directory: its newest checkpoint")
    src.add_argument("--checkpoint", help="a checkpoint step directory, or converted weights "
                     "(anything clip_jax.load opens)")
    p.add_argument("--data", required=True, help="the evaluation data: an ImageFolder, an ingested "
                   "directory, a CSV file, tfds:NAME[:SPLIT] or synthetic[:ATTR] (see "
                   "clip_jax/evals/data.py)")
    p.add_argument("--train-data", default="", help="linear_probe: the data the probe is trained on")
    p.add_argument("--templates", default="", help="zeroshot: a file of prompt templates, one per "
                   "line, '{}' marking the class name (default: the data's own, else a generic set)")
    p.add_argument("--classnames", default="", help="a file of class names, one per line in the "
                   "data's class order, replacing the folder/label names")
    p.add_argument("--group-by", default="", help="zeroshot, linear_probe: report accuracy per value "
                   "of this attribute (a CSV/meta column, level:N of the image path, or a "
                   "synthetic attribute: size, position, background)")
    p.add_argument("--val-fraction", type=float, default=0.2, help="linear_probe: the fraction of "
                   "--train-data held out to choose the regularisation (default 0.2)")
    p.add_argument("--max-examples", type=int, default=0, help="evaluate the first N images only "
                   "(default 0: all)")
    p.add_argument("--batch-size", type=int, default=256, help="images or texts per device batch "
                   "across the mesh (default 256)")
    p.add_argument("--cache-dir", default="", help="store image features here and reuse them for "
                   "the same checkpoint and data (default: no cache)")
    p.add_argument("--data-dir", default="", help="tfds: the TFDS data_dir")
    p.add_argument("--image-key", default="image", help="tfds: the Image feature (default image)")
    p.add_argument("--label-key", default="label", help="tfds: the ClassLabel feature (default label)")
    p.add_argument("--caption-key", default="caption", help="tfds: the Text feature (default caption)")
    p.add_argument("--image-column", default="filepath", help="CSV: the image path column (default filepath)")
    p.add_argument("--caption-column", default="caption", help="CSV: the caption column (default caption)")
    p.add_argument("--label-column", default="", help="CSV: a class column, for zeroshot/linear_probe")
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
    from clip_jax import distributed, inference
    options = {k: getattr(args, k) for k in OPTIONS if k != "max_examples"}
    options["max_examples"] = args.max_examples
    try:
        distributed.initialize(args.distributed, args.coordinator_address, args.num_processes,
                               args.process_id)
        model = inference.load(args.workdir or args.checkpoint, batch_size=args.batch_size)
        task = Task(args.task, args.data, model.config, options)
        result = task(model, cache_dir=args.cache_dir, progress=not args.no_progress)
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    result["checkpoint"] = model.source
    if distributed.is_main():          # every process has the figures; one prints them
        print_report(result)
        if args.json:
            print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
