"""Zero-shot class names and prompt templates shipped as data, chosen by name.

The files (clip_jax/data/zeroshot/, provenance and licences in its README) are
CLIP_benchmark's English class names (17 datasets) and templates (33 datasets), the 7-template
ImageNet subset of OpenAI's notebook, and the ImageNet-1k WordNet ids in class order:
- `templates(name)`: 'imagenet1k' is the paper's 80 templates, 'imagenet1k_7' its 7-template
  subset, and every dataset name of CLIP_benchmark ('cifar10', 'food101', ...) its own;
- `classnames(name)`: 'imagenet1k' is OpenAI's curated ImageNet class names, and the other
  datasets CLIP_benchmark names;
- `classnames_for(name, data_classnames)`: those names in a dataset's own class order: an
  ImageFolder whose class folders are ImageNet wnids (all 1,000 or some of them) gets each
  folder's name; otherwise the names apply in order and their count must match;
- `for_tfds(tfds_name)`: the metadata name of a TFDS dataset ('imagenet2012' ->
  'imagenet1k', 'oxford_iiit_pet' -> 'pets', ...), which zero-shot uses without being asked.

A template is written with `{}` for the class name (CLIP_benchmark's `{c}` is converted).
"""
import functools
import importlib.resources
import json
import re

_WNID = re.compile(r"^n\d{8}$")

# TFDS dataset name -> the metadata name (CLIP_benchmark's) of the same data.
TFDS_NAMES = {
    "imagenet2012": "imagenet1k", "imagenet_v2": "imagenet1k", "imagenet2012_real": "imagenet1k",
    "cifar10": "cifar10", "cifar100": "cifar100", "food101": "food101", "stl10": "stl10",
    "sun397": "sun397", "cars196": "cars", "oxford_iiit_pet": "pets", "dtd": "dtd",
    "caltech101": "caltech101", "oxford_flowers102": "flowers", "mnist": "mnist",
    "eurosat": "eurosat", "svhn_cropped": "svhn", "patch_camelyon": "pcam",
    "resisc45": "resisc45", "voc": "voc2007", "clevr": "clevr_count_all",
}


def _read(name):
    return importlib.resources.files("clip_jax").joinpath("data", "zeroshot", name).read_text()


@functools.cache
def _templates():
    table = json.loads(_read("en_zeroshot_classification_templates.json"))
    table.update(json.loads(_read("clip_jax_templates.json")))
    table.pop("dummy", None)
    return {name: tuple(t.replace("{c}", "{}") for t in ts) for name, ts in table.items()}


@functools.cache
def _classnames():
    return {name: list(names) for name, names in json.loads(_read("en_classnames.json")).items()}


@functools.cache
def imagenet_wnids():
    return [line.strip() for line in _read("imagenet1k_wnids.txt").splitlines() if line.strip()]


def template_names():
    return sorted(_templates())


def classname_names():
    return sorted(_classnames())


def templates(name):
    """The templates shipped under `name`; ValueError listing the names otherwise."""
    if name not in _templates():
        raise ValueError(f"no templates named {name!r}; the shipped ones: {', '.join(template_names())}")
    return _templates()[name]


def classnames(name):
    """The class names shipped under `name`; ValueError listing the names otherwise."""
    if name not in _classnames():
        raise ValueError(f"no class names named {name!r}; the shipped ones: {', '.join(classname_names())}")
    return list(_classnames()[name])


def classnames_for(name, data_classnames, where="--classnames"):
    """The shipped class names `name` in the order of a dataset's classes `data_classnames`
    (the module docstring)."""
    names = classnames(name)
    if name == "imagenet1k" and data_classnames and all(_WNID.match(c) for c in data_classnames):
        index = {wnid: i for i, wnid in enumerate(imagenet_wnids())}
        unknown = [c for c in data_classnames if c not in index]
        if unknown:
            raise ValueError(f"{where} {name}: class folder(s) {unknown[:5]} are not ImageNet-1k wnids")
        return [names[index[c]] for c in data_classnames]
    if len(names) != len(data_classnames):
        raise ValueError(f"{where} {name}: {len(names)} names for the {len(data_classnames)} classes "
                         "of the data (ImageNet-1k class folders may be named by wnid, n01440764 ...)")
    return names


def for_tfds(tfds_name):
    """The metadata name of TFDS dataset `tfds_name` ('imagenet2012' -> 'imagenet1k'), or None."""
    return TFDS_NAMES.get(tfds_name.split("/")[0])


def is_templates_name(value):
    return value in _templates()


def is_classnames_name(value):
    return value in _classnames()
