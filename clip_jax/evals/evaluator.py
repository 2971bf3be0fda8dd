"""The evaluator interface: a task's options, its data and `run`.

As big_vision's evaluators: one is constructed with its data spec and option values,
opening the data then (so that a bad `config.evals` entry stops a training run before
any step), and `run(model)` returns its figures for whatever variables the model holds
at the time. One subclass per task, in the task's module (zeroshot.py, retrieval.py,
linear_probe.py), registered by task name in registry.py. This base is a module of its
own because the registry imports the evaluators, which import it.
"""
import dataclasses
from typing import Callable, Optional

from clip_jax import paths
from clip_jax.data import zeroshot_metadata
from clip_jax.evals import data as data_lib
from clip_jax.evals import report


@dataclasses.dataclass(frozen=True)
class Option:
    """A key of a `config.evals` entry and a flag of `python -m clip_jax.evaluate`
    (--flag-name, of the default's type)."""
    default: object
    help: str
    is_file: bool = False     # names a file that must exist (checked with the config)
    # A file, or else a name this accepts (`zeroshot_metadata`: shipped templates, class names).
    or_name: Optional[Callable[[str], bool]] = None

    def check_file(self, value):
        """Whether `value` is acceptable for an `is_file` option: an existing file, or a
        name `or_name` accepts."""
        return (not self.is_file or not value or paths.isfile(value)
                or (self.or_name is not None and self.or_name(value)))


# How --data (and --train-data) are read (clip_jax/evals/data.py): every task takes them.
DATA_OPTIONS = {
    "max_examples": Option(0, "evaluate the first N images only (default 0: all)"),
    "data_dir": Option("", "tfds: the TFDS data_dir"),
    "image_key": Option("image", "tfds: the Image feature (default image)"),
    "label_key": Option("label", "tfds: the ClassLabel feature (default label)"),
    "caption_key": Option("caption", "tfds: the Text feature (default caption)"),
    "image_column": Option("filepath", "CSV: the image path column (default filepath)"),
    "caption_column": Option("caption", "CSV: the caption column (default caption)"),
    "label_column": Option("", "CSV: a class column, for zeroshot/linear_probe"),
}


class Evaluator:
    """One evaluation: its data opened once, `run` on a model (a `CLIPModel`, or anything
    with its encoders) -> {figure: value}."""

    task = ""                 # its name: the registry key, the CLI's TASK, an entry's task
    options = DATA_OPTIONS    # name -> Option: everything an entry or the command line may set
    required = ()             # options that must be set (not left at their default)
    logged = ()               # figures logged in training, as <task>/<entry name>/<figure>
    averaged = ()             # figures also logged as <task>/<figure>: the mean over entries

    def __init__(self, data, config=None, **settings):
        """`data`: the --data spec; `config`: the model's run config (the synthetic data's
        seed and sizes); `settings`: values of `options`, the others at their defaults.
        Settings are checked by `registry.check` (which names the entry or the flag)."""
        unknown = set(settings) - set(self.options)
        if unknown:
            raise TypeError(f"{self.task}: no option(s) {sorted(unknown)}")
        self.config = config
        self.settings = {key: option.default for key, option in self.options.items()}
        self.settings.update(settings)
        self.data = self.open_data(data)

    def open_data(self, spec, origin="--data"):
        """The evaluation data `spec` names, read with this evaluator's data options;
        `origin` (the flag it came from) names it in messages. An `EvalData` (opened by
        another evaluator: the suite's tasks share their data) is taken as it is."""
        if isinstance(spec, data_lib.EvalData):
            return spec
        s = self.settings
        data = data_lib.open_eval_data(
            spec, self.config, data_dir=s["data_dir"], image_key=s["image_key"],
            label_key=s["label_key"], caption_key=s["caption_key"], image_column=s["image_column"],
            caption_column=s["caption_column"], label_column=s["label_column"],
            classnames=s.get("classnames", ""), origin=origin)
        return data.head(int(s["max_examples"]))

    @classmethod
    def data_specs(cls, data, options):
        """[(data spec, the entry key it came from)] an entry with `data` and `options` reads:
        what config validation parses before training starts."""
        return [(data, "data")] + ([(options["train_data"], "train_data")]
                                   if options.get("train_data") else [])

    def run(self, model, cache_dir="", progress=True):
        """{figure: value, ...}, with "task" and "data" (what the command line prints as JSON).
        Non-finite embeddings raise `inference.NonFiniteEmbeddings` (the model's encoders
        refuse them), naming the checkpoint: no figure is made of them."""
        raise NotImplementedError

    def figures(self):
        """The `logged` figures this evaluator's `run` returns with its settings."""
        return self.logged

    @classmethod
    def format_result(cls, result):
        """`run`'s result as the command line prints it."""
        raise NotImplementedError


class Classification(Evaluator):
    """What the evaluators that classify images share: class names, --group-by, the report."""

    options = {
        "classnames": Option("", "a file of class names, one per line in the data's class order, "
                             "replacing the folder/label names; or the name of shipped ones, e.g. "
                             "imagenet1k (OpenAI's curated ImageNet names; class folders named by "
                             "wnid are mapped)", is_file=True,
                             or_name=zeroshot_metadata.is_classnames_name),
        "group_by": Option("", "report accuracy per value of this attribute (a CSV/meta column, "
                           "level:N of the image path, or a synthetic attribute: size, position, "
                           "background)"),
        **DATA_OPTIONS,
    }
    logged = ("top1", "mean_per_class", "group_gap")

    def __init__(self, data, config=None, **settings):
        super().__init__(data, config, **settings)
        if self.settings["group_by"]:
            self.data.group_values(self.settings["group_by"])   # a bad attribute fails now

    def figures(self):
        return tuple(k for k in self.logged if k != "group_gap" or self.settings["group_by"])

    @classmethod
    def describe(cls, result):
        """What follows the classes in the report's first line."""
        return ""

    @classmethod
    def format_result(cls, result):
        with_images = len(result["per_class"])
        classes = f"{result['classes']} classes" + (
            f" ({with_images} with images)" if with_images != result["classes"] else "")
        lines = [f"{cls.task} on {result['data']}: {result['n']} images, "
                 f"{classes}{cls.describe(result)}",
                 f"  top-1 {100 * result['top1']:.2f}%  top-5 {100 * result['top5']:.2f}%  "
                 f"mean per-class {100 * result['mean_per_class']:.2f}%",
                 report.format_table(result["per_class"], ["class", "n", "top1"])]
        if "groups" in result:
            rows = [{"group": g, **v} for g, v in result["groups"].items()]
            lines += [f"by {result['group_by']}: gap {100 * result['group_gap']:.2f} points "
                      f"(worst: {result['worst_group']})",
                      report.format_table(rows, ["group", "n", "top1"])]
        return "\n".join(lines)
