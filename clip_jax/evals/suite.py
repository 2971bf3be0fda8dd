"""A benchmark suite: several datasets, each with the tasks its data supports, written as
CLIP_benchmark writes them: `python -m clip_jax.evaluate suite --datasets=A,B,...`, or a
`config.evals` entry with task "suite" (its `data` the same list) during training.

Each entry of the list is either a name of a dataset whose zero-shot metadata ships
(`zeroshot_metadata`: imagenet1k, cifar10, pets, ...), found as DIR/NAME under `data_root`
(an ImageFolder, or its `test/` or `val/` split folder, or CLIP_benchmark's WebDataset
folder), or any data spec `--data` takes (a folder, CLIP_benchmark's shards, a CSV, an
ingested directory, `tfds:NAME:SPLIT`). A known name brings its templates and, where they
ship and fit the data's classes (ImageNet's wnid folders included), its class names; a
folder holding CLIP_benchmark's `classnames.txt` or `zeroshot_classification_templates.txt`
uses those instead (`{c}` read as `{}`).

Tasks (`tasks`, default all three), each where the dataset has what it needs:
  zeroshot      labels
  retrieval     captions
  linear_probe  labels and a training split beside the evaluated one: DIR/NAME/train
                next to its test/ or val/ folder, or the train/ shards of CLIP_benchmark's
                folder (not looked for with tfds: specs: evaluate it alone with --train-data)

Results: one JSON per dataset and task in CLIP_benchmark's schema and file name,
`{dataset}_{pretrained}_{model}_{language}_{task}.json` with {"dataset", "model",
"pretrained", "task", "metrics", "language"}: zero-shot classification's `acc1`, `acc5`,
`mean_per_class_recall`, retrieval's `image_retrieval_recall@5` (text -> image, as
CLIP_benchmark names it) and `text_retrieval_recall@5` (image -> text), the linear probe's
`lp_acc1`, `lp_acc5`, `lp_mean_per_class_recall` (our probe: the paper's L-BFGS and C search;
CLIP_benchmark's own probe trains by SGD with a weight-decay search, so those figures are
comparable, not equal); and one table of all of them, `suite.csv` and `suite.md`, in `out`
(the command line's default: suite_results; in training: none unless set). Top-5 is NaN
below 5 classes, as CLIP_benchmark. In training each figure is logged as
suite/<entry>/<dataset>/<metric>.
"""
import csv
import dataclasses
import io
import json

from clip_jax import distributed, paths
from clip_jax.data import prompts, zeroshot_metadata
from clip_jax.data import spec as spec_lib
from clip_jax.evals import data as data_lib
from clip_jax.evals.evaluator import DATA_OPTIONS, Evaluator, Option
from clip_jax.evals.linear_probe import LinearProbe
from clip_jax.evals.retrieval import Retrieval
from clip_jax.evals.zeroshot import ZeroShot

# Our task -> CLIP_benchmark's name of it, and the names of its metrics.
TASKS = {"zeroshot": "zeroshot_classification", "retrieval": "zeroshot_retrieval",
         "linear_probe": "linear_probe"}
METRICS = {"zeroshot": ("acc1", "acc5", "mean_per_class_recall"),
           "linear_probe": ("lp_acc1", "lp_acc5", "lp_mean_per_class_recall"),
           "retrieval": ("image_retrieval_recall@5", "text_retrieval_recall@5")}
LANGUAGE = "en"
TRAIN_SPLIT = "train"
EVAL_SPLITS = ("test", "val")
DEFAULT_OUT = "suite_results"     # the command line's --out
EVALUATORS = {"zeroshot": ZeroShot, "retrieval": Retrieval, "linear_probe": LinearProbe}


def cb_metrics(result):
    """CLIP_benchmark's metrics (METRICS) of one of our results."""
    if result["task"] == "retrieval":    # CLIP_benchmark's image retrieval: text -> image
        values = (result["text_to_image_R@5"], result["image_to_text_R@5"])
    else:                                # as CLIP_benchmark: no top-5 below 5 classes
        values = (result["top1"], result["top5"] if result["classes"] >= 5 else float("nan"),
                  result["mean_per_class"])
    return dict(zip(METRICS[result["task"]], values))


@dataclasses.dataclass
class Entry:
    dataset: str          # the name in file names and the table
    spec: str             # what --data would take
    known: str = ""       # the shipped metadata's name, if any
    classnames_file: str = ""
    templates_file: str = ""
    train_spec: str = ""  # the training split beside it (linear probe), if any


def _is_imagefolder(path):
    return paths.isdir(path) and any(paths.isdir(paths.join(path, c)) for c in paths.listdir(path))


def _is_wds_split(path):
    return paths.isfile(paths.join(path, spec_lib.WDS_SHARD_COUNT))


def _train_split(spec):
    """The training split beside evaluation data `spec` (the module docstring), or ""."""
    if spec.startswith("tfds:") or not paths.isdir(spec):
        return ""
    spec = spec.rstrip("/")
    if _is_wds_split(paths.join(spec, "test")):                 # CLIP_benchmark's dataset folder
        candidate = paths.join(spec, TRAIN_SPLIT)
    elif spec.rsplit("/", 1)[-1] in EVAL_SPLITS:
        candidate = paths.join(paths.dirname(spec), TRAIN_SPLIT)
    else:
        return ""
    return candidate if _is_wds_split(candidate) or _is_imagefolder(candidate) else ""


def resolve(entry, data_root=""):
    """The `Entry` of one item of the dataset list (the module docstring)."""
    entry = entry.strip()
    if spec_lib.names_synthetic(entry):          # the embedded data's held-out split
        return Entry(entry.replace(":", "_"), entry)
    plain_name = entry and "/" not in entry and ":" not in entry and not entry.endswith(".csv")
    if plain_name and data_root:
        path = paths.join(data_root, entry)
        if not paths.isdir(path):
            raise ValueError(f"--datasets {entry}: no folder {path} under --data-root")
        for split in EVAL_SPLITS:
            if _is_imagefolder(paths.join(path, split)):
                path = paths.join(path, split)
                break
        spec, dataset = path, entry
    elif plain_name and not paths.exists(entry):
        raise ValueError(f"--datasets {entry}: not a file or folder; a dataset name needs "
                         "--data-root=DIR holding DIR/" + entry)
    else:
        spec = entry
        dataset = entry.split(":")[1] if entry.startswith("tfds:") else \
            entry.rstrip("/").rsplit("/", 1)[-1].removesuffix(".csv")
    known = dataset if zeroshot_metadata.is_templates_name(dataset) else \
        (zeroshot_metadata.for_tfds(dataset) or "")
    found = {}
    for key, name in (("classnames_file", data_lib.WDS_CLASSNAMES),
                      ("templates_file", data_lib.WDS_TEMPLATES)):
        for folder in {spec, paths.dirname(spec.rstrip("/"))}:
            if not entry.startswith("tfds:") and paths.isfile(paths.join(folder, name)):
                found[key] = paths.join(folder, name)
                break
    return Entry(dataset, spec, known, train_spec=_train_split(spec), **found)


def _templates(entry):
    """(templates or None, where from)."""
    if entry.templates_file:
        return prompts.load_templates(entry.templates_file, "{c}"), entry.templates_file
    if entry.known and zeroshot_metadata.is_templates_name(entry.known):
        return zeroshot_metadata.templates(entry.known), f"{entry.known}, shipped"
    return None, ""


def _classnames(entry, data):
    if entry.classnames_file:
        return data_lib.read_classnames(entry.classnames_file, data)
    if entry.known and zeroshot_metadata.is_classnames_name(entry.known):
        try:
            return zeroshot_metadata.classnames_for(entry.known, data.classnames)
        except ValueError:
            return data.classnames      # another class set than shipped: the data's own names
    return data.classnames


class Suite(Evaluator):
    """The evaluators of every task of every dataset of the list, their data opened once."""

    task = "suite"
    options = {
        "data_root": Option("", "where named datasets are, DIR/NAME"),
        "tasks": Option(",".join(TASKS), "the tasks to run where a dataset has their "
                        f"data (default {','.join(TASKS)})"),
        "out": Option("", f"the folder for the JSON files and the table (command line "
                      f"default {DEFAULT_OUT}; in training none unless set)"),
        "model_name": Option("clip_jax", "the `model` of the JSON files"),
        "pretrained": Option("", "the `pretrained` of the JSON files (default: the "
                             "checkpoint's folder name)"),
        **DATA_OPTIONS,
    }

    @classmethod
    def data_specs(cls, data, options):
        entries = [resolve(e, options.get("data_root", "")) for e in str(data).split(",") if e.strip()]
        return [(e.spec, "data") for e in entries] + [(e.train_spec, "data") for e in entries if e.train_spec]

    def open_data(self, spec, origin="--datasets"):
        """[(Entry, [(task, Evaluator)])] of the comma-separated list `spec`."""
        tasks = [t.strip() for t in self.settings["tasks"].split(",") if t.strip()]
        for t in tasks:
            if t not in TASKS:
                raise ValueError(f"suite: --tasks {t!r}: not a task of the suite ({', '.join(TASKS)})")
        settings = {k: self.settings[k] for k in DATA_OPTIONS}
        suite = []
        for item in (e for e in str(spec).split(",") if e.strip()):
            entry = resolve(item, self.settings["data_root"])
            data = Evaluator(entry.spec, self.config, **settings).data
            evaluators = []
            if data.labels is not None and "zeroshot" in tasks:
                zeroshot = ZeroShot(data, self.config, **settings)
                zeroshot.data = dataclasses.replace(data, classnames=_classnames(entry, data))
                templates, source = _templates(entry)
                if templates:
                    zeroshot.templates, zeroshot.templates_from = templates, source
                evaluators.append(("zeroshot", zeroshot))
            if data.captions is not None and "retrieval" in tasks:
                evaluators.append(("retrieval", Retrieval(data, self.config, **settings)))
            if data.labels is not None and entry.train_spec and "linear_probe" in tasks:
                evaluators.append(("linear_probe", LinearProbe(data, self.config, train_data=entry.train_spec,
                                                               **settings)))
            if not evaluators:
                raise ValueError(f"{origin} {entry.dataset}: {data.name} has nothing for the tasks "
                                 f"{','.join(tasks)} (labels: zeroshot; captions: retrieval; labels "
                                 "and a train/ split beside it: linear_probe)")
            suite.append((entry, evaluators))
        if not suite:
            raise ValueError(f"{origin}: no datasets")
        return suite

    @property
    def logged(self):
        return tuple(f"{entry.dataset}/{metric}" for entry, evaluators in self.data
                     for task, _ in evaluators for metric in METRICS[task])

    def run(self, model, cache_dir="", progress=True):
        from tqdm import tqdm
        out_dir = self.settings["out"] if distributed.is_main() else ""   # one process writes
        pretrained = self.settings["pretrained"] or (model.source or "").rstrip("/").rsplit("/", 1)[-1]
        if out_dir:
            paths.makedirs(out_dir)
        rows, results, figures = [], [], {}
        for entry, evaluators in tqdm(self.data, desc="suite", unit="dataset", disable=not progress):
            for task, evaluator in evaluators:
                result = evaluator.run(model, cache_dir, progress)
                metrics = cb_metrics(result)
                dump = {"dataset": entry.dataset, "model": self.settings["model_name"],
                        "pretrained": pretrained, "task": TASKS[task], "metrics": metrics,
                        "language": LANGUAGE}
                if out_dir:
                    name = f"{entry.dataset}_{pretrained}_{dump['model']}_{LANGUAGE}_{TASKS[task]}.json"
                    paths.write_text(paths.join(out_dir, name.replace("/", "_")), json.dumps(dump))
                rows.append({"dataset": entry.dataset, "task": TASKS[task], **metrics,
                             "n": result.get("n", result.get("images"))})
                results.append(result)
                figures.update({f"{entry.dataset}/{k}": v for k, v in metrics.items()})
        if out_dir:
            write_table(rows, out_dir)
        return {"task": "suite", "data": ",".join(e.dataset for e, _ in self.data), "out": self.settings["out"],
                "rows": rows, "results": results, **figures}

    @classmethod
    def format_result(cls, result):
        reports = [EVALUATORS[r["task"]].format_result(r) for r in result["results"]]
        return "\n".join(reports + [markdown_table(result["rows"]).rstrip()])


def _columns(rows):
    return ["dataset", "task", "n"] + sorted({k for r in rows for k in r} - {"dataset", "task", "n"})


def markdown_table(rows):
    """The rows as a markdown table, figures in percent."""
    columns = _columns(rows)
    cell = lambda v: "" if v is None else (f"{100 * v:.2f}" if isinstance(v, float) else str(v))  # noqa: E731
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_table(rows, out_dir):
    """suite.csv and suite.md: one row per dataset and task, a column per metric."""
    text = io.StringIO()
    writer = csv.DictWriter(text, _columns(rows))
    writer.writeheader()
    writer.writerows(rows)
    paths.write_text(paths.join(out_dir, "suite.csv"), text.getvalue())
    paths.write_text(paths.join(out_dir, "suite.md"), markdown_table(rows))
