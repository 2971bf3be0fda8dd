"""One grammar for data specs: what `config.data.source` (training), `--data` and
`config.evals.*.data` (evaluation) and `python -m clip_jax.ingest FORMAT SOURCE` (ingest)
name, parsed into a `DataSpec` that each user dispatches on by `kind`.

  synthetic                    the embedded procedural dataset (`synthetic.py`)
  synthetic:ATTR               evaluation only: its held-out split labelled by ATTR, shape
                               (the default) or color
  tfds:NAME[:VERSION][:SPLIT]  a TFDS dataset prepared on local disk (array_record); VERSION
                               as TFDS writes it (1.0.0, 3.*.*); SPLIT may use TFDS slicing
                               (train[:90%])
  DIR                          a directory made by `python -m clip_jax.ingest` (it holds
                               manifest.json); in evaluation a directory without one is an
                               ImageFolder, DIR/<class>/**/<image>, unless it holds
                               CLIP_benchmark's WebDataset shards: a split folder with
                               nshards.txt, or a dataset folder whose test/ has one (the
                               test split is read; name DIR/train for another)
  FILE                         evaluation only: a CSV file (.tsv: tab-separated)

Training takes a comma-separated list of these (a mixture, `parse_sources`). Ingest names
its input by format instead (`for_ingest`): csv FILE, captions DIR, imagefolder DIR, wds
PATTERN..., tfds NAME[:VERSION] with the split in --split. Paths may be remote (gs://...):
they are looked at through `clip_jax.paths`.

The TFDS split: a spec without one means `train` (TRAIN_SPLIT) for training and ingest.
Evaluation refuses to guess and asks for it ("tfds:cifar10 needs a split for evaluation:
write tfds:cifar10:test"): a default of its own would silently evaluate on other data than
training or ingest read for the same spec.
"""
import dataclasses
import functools
import re

from clip_jax import paths
from clip_jax.data import records, synthetic

TRAIN_SPLIT = "train"            # the TFDS split of a training or ingest spec without one
SYNTHETIC_ATTRIBUTE = "shape"    # the label of `synthetic` as evaluation data
KINDS = ("synthetic", "tfds", "ingested", "imagefolder", "csv", "captions", "wds")
INGEST_FORMATS = ("csv", "captions", "imagefolder", "wds", "tfds")
WDS_SHARD_COUNT = "nshards.txt"  # marks a CLIP_benchmark WebDataset split folder (evaluation)
# TFDS's version syntax: a part of a tfds: spec that matches it is the version, not a split
# (split names are identifiers, so the two never collide).
_VERSION = re.compile(r"\d+\.(\d+|\*)\.(\d+|\*)")

FORMS = {
    "train": ("synthetic", f"tfds:NAME[:VERSION][:SPLIT] (SPLIT defaults to {TRAIN_SPLIT})",
              "DIR, a directory made by `python -m clip_jax.ingest`"),
    "eval": (f"synthetic[:ATTR] (ATTR: {' or '.join(synthetic.zeroshot_tasks())}, "
             f"default {SYNTHETIC_ATTRIBUTE})",
             "tfds:NAME[:VERSION]:SPLIT (the split is required)",
             "DIR, an ImageFolder or a directory made by `python -m clip_jax.ingest`",
             "DIR, CLIP_benchmark's WebDataset shards: a split folder holding nshards.txt, "
             "or a dataset folder whose test/ holds it",
             "FILE, a CSV (or .tsv) file"),
    "ingest": ("csv FILE", "captions DIR", "imagefolder DIR", "wds PATTERN...",
               f"tfds NAME[:VERSION] (--split, default {TRAIN_SPLIT})"),
}
_WHAT = {"train": "a training source", "eval": "evaluation data", "ingest": "an ingest input"}


class SpecError(ValueError):
    """A spec that names no data: the message names the spec, where it came from and the
    forms accepted there."""


@dataclasses.dataclass(frozen=True)
class DataSpec:
    kind: str               # one of KINDS
    text: str               # the spec as written
    path: str = ""          # ingested, imagefolder, csv, captions: the directory or file;
                            # wds in evaluation: CLIP_benchmark's split folder (nshards.txt)
    name: str = ""          # tfds: the dataset, NAME or NAME:VERSION (TFDS's own syntax)
    split: str = ""         # tfds: the split
    attribute: str = ""     # synthetic, as evaluation data: the label
    patterns: tuple = ()    # wds in ingest: shard paths, globs or brace ranges


def error(text, use, origin, problem):
    """The SpecError for `text` (from `origin`: a config key or flag, '' if unknown)."""
    named = f"{origin} {text!r}" if origin else repr(text)
    return SpecError(f"{named}: {problem}; {_WHAT[use]} is one of: {'; '.join(FORMS[use])}")


def names_synthetic(text):
    """Whether `text` names the embedded dataset (`synthetic` or `synthetic:ATTR`), told
    without looking at anything else (no path is checked)."""
    return str(text).strip().partition(":")[0] == "synthetic"


def parse(text, use, origin=""):
    """The DataSpec of one spec string for `use` ('train' or 'eval'); raises SpecError.
    A path is looked at (it must exist; in evaluation its type picks the kind)."""
    if use not in ("train", "eval"):
        raise ValueError(f"use must be 'train' or 'eval' (ingest: for_ingest), got {use!r}")
    text = str(text).strip()
    if not text:
        raise error(text, use, origin, "empty")
    head, colon, rest = text.partition(":")
    if names_synthetic(text):
        return _synthetic(text, rest if colon else "", use, origin)
    if head == "tfds" and colon:
        return _tfds(text, rest, use, origin)
    return _path(text, use, origin)


def parse_sources(text, origin="config.data.source"):
    """The DataSpecs of a training source list, 'a,b' (a mixture), as a tuple; raises
    SpecError. Parsed once per text (a path's existence is looked at then): validation
    checks `config.data.source` and `sources.make_source` opens the same frozen specs."""
    return _parse_sources(str(text), origin)


@functools.lru_cache(maxsize=64)
def _parse_sources(text, origin):
    entries = [entry.strip() for entry in text.split(",")]
    if not all(entries):
        raise SpecError(f"{origin}={text!r} has an empty entry; {_WHAT['train']} is one of: "
                        f"{'; '.join(FORMS['train'])}")
    return tuple(parse(entry, "train", f"{origin} entry") for entry in entries)


def for_ingest(format, source, split=None, origin="SOURCE"):
    """The DataSpec of an ingest input: FORMAT and SOURCE as the command line takes them;
    `split` (tfds only): the --split flag, TRAIN_SPLIT when not given."""
    text = source if isinstance(source, str) else " ".join(source)
    if format not in INGEST_FORMATS:
        raise error(text, "ingest", origin, f"unknown format {format!r}")
    if split is not None and format != "tfds":
        raise error(text, "ingest", origin, f"--split applies to tfds, not {format}")
    if format == "wds":
        patterns = (source,) if isinstance(source, str) else tuple(source)
        if not patterns:
            raise error(text, "ingest", origin, "no shard pattern")
        return DataSpec("wds", text, patterns=patterns)
    if not isinstance(source, str):
        raise error(text, "ingest", origin, f"{format} reads one SOURCE, got {len(source)}")
    if format != "tfds":
        return DataSpec(format, text, path=source)
    name, version, extra = _name_and_version(source)
    if not name or extra:
        raise error(text, "ingest", origin, "expected NAME or NAME:VERSION (the split goes in --split)")
    return DataSpec("tfds", text, name=name + version, split=split or TRAIN_SPLIT)


def _synthetic(text, attribute, use, origin):
    if use == "train":
        if attribute:
            raise error(text, use, origin, "synthetic:ATTR names evaluation data (a labelled "
                                           "held-out split); train on 'synthetic'")
        return DataSpec("synthetic", text)
    attribute = attribute or SYNTHETIC_ATTRIBUTE
    if attribute not in synthetic.zeroshot_tasks():
        raise error(text, use, origin, f"the synthetic data has no label {attribute!r}")
    return DataSpec("synthetic", text, attribute=attribute)


def _name_and_version(rest):
    """'NAME[:VERSION][:MORE]' -> (NAME, ':VERSION' or '', MORE)."""
    name, _, tail = rest.partition(":")
    first, _, after = tail.partition(":")
    if _VERSION.fullmatch(first):
        return name, f":{first}", after
    return name, "", tail


def _tfds(text, rest, use, origin):
    name, version, split = _name_and_version(rest)
    if not name:
        raise error(text, use, origin, "no dataset NAME after 'tfds:'")
    if not split:
        if use == "eval":
            raise error(text, use, origin, f"{text} needs a split for evaluation: write "
                                           f"{text}:test (or the split you mean)")
        split = TRAIN_SPLIT
    return DataSpec("tfds", text, name=name + version, split=split)


def _path(text, use, origin):
    if use == "train":
        if not paths.exists(text):
            raise error(text, use, origin, "no such directory")
        return DataSpec("ingested", text, path=text)
    if paths.isfile(text):
        return DataSpec("csv", text, path=text)
    if paths.isdir(text):
        if paths.exists(paths.join(text, records.MANIFEST)):
            return DataSpec("ingested", text, path=text)
        for split in (text, paths.join(text, "test")):      # CLIP_benchmark's WebDataset layout
            if paths.isfile(paths.join(split, WDS_SHARD_COUNT)):
                return DataSpec("wds", text, path=split)
        return DataSpec("imagefolder", text, path=text)
    raise error(text, use, origin, "no such file or directory")
