"""Random-access data sources named by `config.data.source` (its grammar: `spec.py`).

  synthetic            the embedded procedural dataset (`synthetic.py`), rendered at the
                       model's image size; its images are used as drawn (no augmentation)
  DIR                  a directory written by `python -m clip_jax.ingest` (`records.py`)
  tfds:NAME[:VERSION][:SPLIT]
                       a TFDS dataset prepared on local disk in array_record format
                       (`config.data.tfds`: data_dir, image_key, caption_key or label_key);
                       SPLIT defaults to 'train' and may use TFDS slicing ('train[:90%]')
  A,B,...              several of the above: a mixture. With `config.data.weights` empty
                       the sources are concatenated and shuffled together (each record
                       equally likely); with weights, each batch row comes from source j
                       with probability weights[j] (Grain's `MapDataset.mix`).

Every source has `len()` and `[i]` -> {'image': encoded bytes or uint8 [H, W, 3],
'caption': str}, may carry 'label', and is picklable (Grain worker processes). A source
whose `presized` attribute is true (synthetic) yields images at the model's size, used
as they are; all others are decoded and cropped by the pipeline. A source may have
`record_files(indices)` -> the files holding those records (ingested data: its shards), which
the pipeline names when it gives up on a run of unreadable records.
"""

import numpy as np

from clip_jax import paths
from clip_jax.data import prompts, records, synthetic
from clip_jax.data import spec as spec_lib


class LabelOutOfRange(ValueError):
    """A labelled example whose label is not one of the classes (e.g. -1 on a test split)."""


class TfdsSource:
    """A prepared TFDS dataset (array_record file format), read without TensorFlow.

    Images come back encoded (`SkipDecoding`), so the same decoder, checks and crops as
    ingested data apply. Captions come from the Text feature `caption_key`, or, when
    `label_key` names a ClassLabel feature, from its class names through `templates`
    (`prompts.caption_for`, keyed by '<split>/<index>': ingest and training give an
    example the same caption). Shared by the pipeline and `clip_jax.ingest tfds`.
    """

    def __init__(self, name, split=spec_lib.TRAIN_SPLIT, data_dir="", image_key="image", caption_key="caption",
                 label_key="", templates=None):
        # lazy: tensorflow_datasets takes seconds to import; only TFDS sources need it
        import tensorflow_datasets as tfds
        self.args = (name, split, data_dir, image_key, caption_key, label_key, templates)
        if paths.is_remote(data_dir):
            raise ValueError(f"TFDS data_dir={data_dir}: TFDS reads its ArrayRecord files with the "
                             "ArrayRecord reader, which opens local files only "
                             "(google/array_record#120): copy the dataset here or mount the "
                             "bucket (gcsfuse)")
        try:
            self._ds = tfds.data_source(name, split=split, data_dir=data_dir or None,
                                        decoders={image_key: tfds.decode.SkipDecoding()})
        except Exception as e:   # DatasetNotFoundError lists every dataset: keep its first line
            raise ValueError(f"cannot open TFDS dataset {name!r} split {split!r} "
                             f"(data_dir={data_dir or 'default'}): {type(e).__name__}: "
                             f"{(str(e).splitlines() or [''])[0]}") from None
        self.split, self.image_key, self.caption_key, self.label_key = split, image_key, caption_key, label_key
        self.features = features = self._ds.dataset_info.features
        self._check_feature(features, image_key, tfds.features.Image, "image_key")
        self.classes = self.classnames = None
        if label_key:
            self.classes = list(self._check_feature(features, label_key, tfds.features.ClassLabel,
                                                    "label_key").names)
            self.classnames = [prompts.readable_classname(c) for c in self.classes]
            self.templates = tuple(templates or prompts.DEFAULT_TEMPLATES)
        else:
            self._check_feature(features, caption_key, tfds.features.Text, "caption_key")

    @staticmethod
    def _check_feature(features, key, kind, option):
        if key not in features:
            raise ValueError(f"the TFDS dataset has no feature {key!r} ({option}); "
                             f"its features are: {', '.join(sorted(features.keys()))}")
        if not isinstance(features[key], kind):
            raise ValueError(f"TFDS feature {key!r} ({option}) is a {type(features[key]).__name__}, "
                             f"expected a tfds.features.{kind.__name__}")
        return features[key]

    def __len__(self):
        return len(self._ds)

    def read(self, indices):
        """The raw examples of `indices` (one batched read)."""
        return self._ds.__getitems__([int(i) for i in indices])

    def to_example(self, index, raw):
        """A raw example -> {'image': bytes, 'caption': str, 'caption_repaired': bool[, 'label']};
        raises LabelOutOfRange for a label that is not a class."""
        example = {"image": raw[self.image_key], "caption_repaired": False}
        if not self.label_key:
            caption = raw[self.caption_key]
            if isinstance(caption, bytes):
                try:
                    caption = caption.decode("utf-8")
                except UnicodeDecodeError:
                    caption, example["caption_repaired"] = caption.decode("utf-8", "replace"), True
            return {**example, "caption": str(caption)}
        label = int(raw[self.label_key])
        if not 0 <= label < len(self.classes):
            raise LabelOutOfRange(f"label {label} is not one of the {len(self.classes)} classes")
        caption = prompts.caption_for(self.classnames[label], f"{self.split}/{int(index)}", self.templates)
        return {**example, "caption": caption, "label": label}

    def __getitem__(self, index):
        return self.to_example(index, self.read([index])[0])

    def __getstate__(self):
        return {"args": self.args}

    def __setstate__(self, state):
        self.__init__(*state["args"])


class ConcatSource:
    """Several sources as one index space: [0, n0) is the first, [n0, n0 + n1) the second, ..."""

    def __init__(self, parts):
        self.parts = list(parts)
        self.sizes = [len(p) for p in self.parts]
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)
        self.presized = all(getattr(p, "presized", False) for p in self.parts)

    def __len__(self):
        return int(self.offsets[-1])

    def __getitem__(self, index):
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range [0, {len(self)})")
        part = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return self.parts[part][index - int(self.offsets[part])]

    def record_files(self, indices):
        """The files holding the records `indices`, from the parts that know theirs."""
        files = []
        for j, part in enumerate(self.parts):
            mine = [int(i) - int(self.offsets[j]) for i in indices
                    if self.offsets[j] <= int(i) < self.offsets[j + 1]]
            if mine and hasattr(part, "record_files"):
                files += part.record_files(mine)
        return files


def parse_weights(spec, num_sources):
    """'' -> None; '0.7,0.3' -> normalised float array; ValueError names the key."""
    if not str(spec).strip():
        return None
    try:
        weights = np.array([float(w) for w in str(spec).split(",")], np.float64)
    except ValueError:
        raise ValueError(f"config.data.weights={spec!r}: not a comma-separated list of numbers") from None
    if len(weights) != num_sources:
        raise ValueError(f"config.data.weights={spec!r} has {len(weights)} entries for "
                         f"{num_sources} sources in config.data.source")
    if not np.all(np.isfinite(weights)) or np.any(weights < 0) or weights.sum() <= 0:
        raise ValueError(f"config.data.weights={spec!r}: weights must be >= 0 and not all 0")
    return weights / weights.sum()


def open_one(source_spec, config, split="train"):
    """The source of one parsed entry of `config.data.source` (a `spec.DataSpec`)."""
    if source_spec.kind == "synthetic":
        s = config.data.synthetic
        return synthetic.SyntheticSource(split="train" if split == "train" else "heldout",
                                         image_size=config.model.vision.image_size,
                                         num_records=s.num_train if split == "train" else s.num_eval,
                                         seed=config.seed)
    if source_spec.kind == "tfds":
        t = config.data.tfds
        return TfdsSource(source_spec.name, source_spec.split, t.data_dir, t.image_key,
                          t.caption_key, t.label_key)
    assert source_spec.kind == "ingested", source_spec   # what spec.parse gives for training
    return records.IngestedSource(source_spec.path)


def make_source(config, split="train"):
    """(source, weights or None) for `config.data.source`; ValueError names the bad entry."""
    specs = spec_lib.parse_sources(config.data.source)
    weights = parse_weights(config.data.get("weights", ""), len(specs))
    parts = [open_one(s, config, split) for s in specs]
    return (parts[0] if len(parts) == 1 else ConcatSource(parts)), weights


def tokenizer_corpus(source, n):
    """Up to n captions to train a tokenizer on: the source's own corpus if it has one
    (synthetic), else the captions of n records spread evenly over the source. Unreadable
    records are skipped; ValueError if none of them can be read."""
    if hasattr(source, "tokenizer_corpus"):
        return source.tokenizer_corpus(n)
    if isinstance(source, ConcatSource):
        per = max(1, n // len(source.parts))
        return [c for p in source.parts for c in tokenizer_corpus(p, per)]
    size = len(source)
    indices = np.unique(np.linspace(0, size - 1, num=min(n, size)).astype(np.int64))
    out, error = [], None
    for i in indices:
        try:
            out.append(source[int(i)]["caption"])
        except Exception as e:   # a broken record: the pipeline replaces it; the corpus skips it
            error = error or e
    if error is not None and not out:
        raise ValueError(f"none of the {len(indices)} records of {source!r} read for the "
                         f"tokenizer's captions could be read (first error: {error}); the "
                         "dataset is broken")
    return out
