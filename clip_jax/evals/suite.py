"""A benchmark suite: several datasets, each with the tasks its data supports, written as
CLIP_benchmark writes them (`python -m clip_jax.evaluate suite`).

Each entry of `--datasets` is either a name of a dataset whose zero-shot metadata ships
(`zeroshot_metadata`: imagenet1k, cifar10, pets, ...), found as DIR/NAME under
`--data-root` (an ImageFolder, or its `test/` or `val/` split folder), or any data spec
`--data` takes (a folder, a CSV, an ingested directory, `tfds:NAME:SPLIT`). A dataset with
labels is scored zero-shot, one with captions by retrieval (both when it has both). A known
name brings its templates and, where they ship and fit the folder's classes (ImageNet's wnid
folders included), its class names; a folder holding CLIP_benchmark's `classnames.txt` or
`zeroshot_classification_templates.txt` uses those instead (its `{c}` read as `{}`).

Results: one JSON per dataset and task in CLIP_benchmark's schema and file name,
`{dataset}_{pretrained}_{model}_{language}_{task}.json` with {"dataset", "model",
"pretrained", "task", "metrics", "language"}: zero-shot classification's `acc1`, `acc5`,
`mean_per_class_recall`, retrieval's `image_retrieval_recall@5` (text -> image, as
CLIP_benchmark names it) and `text_retrieval_recall@5` (image -> text); and one table of all
of them, `suite.csv` and `suite.md`. Not yet read: CLIP_benchmark's WebDataset shards
(convert them to a folder), and linear probes.
"""
import csv
import dataclasses
import io
import json

from clip_jax import paths
from clip_jax.data import prompts, zeroshot_metadata
from clip_jax.evals import data as data_lib, registry

# Our task -> CLIP_benchmark's, and its metrics from ours.
TASKS = {"zeroshot": "zeroshot_classification", "retrieval": "zeroshot_retrieval"}
LANGUAGE = "en"


def cb_metrics(result):
    """CLIP_benchmark's metrics of one of our results."""
    if result["task"] == "zeroshot":       # as CLIP_benchmark: no top-5 below 5 classes
        return {"acc1": result["top1"], "acc5": result["top5"] if result["classes"] >= 5 else float("nan"),
                "mean_per_class_recall": result["mean_per_class"]}
    return {"image_retrieval_recall@5": result["text_to_image_R@5"],
            "text_retrieval_recall@5": result["image_to_text_R@5"]}


@dataclasses.dataclass
class Entry:
    dataset: str          # the name in file names and the table
    spec: str             # what --data would take
    known: str = ""       # the shipped metadata's name, if any
    classnames_file: str = ""
    templates_file: str = ""


def _is_imagefolder(path):
    return paths.isdir(path) and any(paths.isdir(paths.join(path, c)) for c in paths.listdir(path))


def resolve(entry, data_root=""):
    """The `Entry` of one item of `--datasets` (the module docstring)."""
    entry = entry.strip()
    plain_name = entry and "/" not in entry and ":" not in entry and not entry.endswith(".csv")
    if plain_name and data_root:
        path = paths.join(data_root, entry)
        if not paths.isdir(path):
            raise ValueError(f"--datasets {entry}: no folder {path} under --data-root")
        for split in ("test", "val"):
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
    for key, name in (("classnames_file", "classnames.txt"),
                      ("templates_file", "zeroshot_classification_templates.txt")):
        for folder in {spec, paths.dirname(spec.rstrip("/"))}:
            if not entry.startswith("tfds:") and paths.isfile(paths.join(folder, name)):
                found[key] = paths.join(folder, name)
                break
    return Entry(dataset, spec, known, **found)


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


def run(model, entries, out_dir, model_name="clip_jax", pretrained="", cache_dir="", progress=True,
        on_result=None):
    """Every task of every entry (`resolve`d) on `model`; writes the JSON files and the table
    into `out_dir` and returns the table's rows. `on_result(entry, result)` after each."""
    from tqdm import tqdm
    paths.makedirs(out_dir)
    rows = []
    for entry in tqdm(entries, desc="suite", unit="dataset", disable=not progress):
        zeroshot = registry.get("zeroshot")(entry.spec, model.config)
        data = zeroshot.data
        tasks = (["zeroshot"] if data.labels is not None else []) + \
            (["retrieval"] if data.captions is not None else [])
        if not tasks:
            raise ValueError(f"--datasets {entry.dataset}: {data.name} has neither labels nor captions")
        for task in tasks:
            if task == "zeroshot":
                zeroshot.data = dataclasses.replace(data, classnames=_classnames(entry, data))
                templates, source = _templates(entry)
                if templates:
                    zeroshot.templates, zeroshot.templates_from = templates, source
                result = zeroshot.run(model, cache_dir, progress)
            else:
                result = registry.get("retrieval")(entry.spec, model.config).run(model, cache_dir, progress)
            dump = {"dataset": entry.dataset, "model": model_name, "pretrained": pretrained,
                    "task": TASKS[task], "metrics": cb_metrics(result), "language": LANGUAGE}
            name = f"{entry.dataset}_{pretrained}_{model_name}_{LANGUAGE}_{TASKS[task]}.json"
            paths.write_text(paths.join(out_dir, name.replace("/", "_")), json.dumps(dump))
            rows.append({"dataset": entry.dataset, "task": TASKS[task], **dump["metrics"],
                         "n": result.get("n", result.get("images"))})
            if on_result is not None:
                on_result(entry, result)
    write_table(rows, out_dir)
    return rows


def write_table(rows, out_dir):
    """suite.csv and suite.md: one row per dataset and task, a column per metric."""
    columns = ["dataset", "task", "n"] + sorted({k for r in rows for k in r} - {"dataset", "task", "n"})
    text = io.StringIO()
    writer = csv.DictWriter(text, columns)
    writer.writeheader()
    writer.writerows(rows)
    paths.write_text(paths.join(out_dir, "suite.csv"), text.getvalue())
    cell = lambda v: "" if v is None else (f"{100 * v:.2f}" if isinstance(v, float) else str(v))  # noqa: E731
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    paths.write_text(paths.join(out_dir, "suite.md"), "\n".join(lines) + "\n")
