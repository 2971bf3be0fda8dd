"""Evaluation data: what `--data` (or an entry of `config.evals`) names, opened as `EvalData`.
The spec strings are parsed by `clip_jax/data/spec.py`, the grammar training and ingest share.

  DIR                 an ImageFolder, DIR/<class>/**/<image> (torchvision's layout): label =
                      index of the class folder in sorted order, class name = folder name
                      with '_' read as a space; files without an image extension are ignored,
                      and a class folder with no image is an error, as in torchvision (it
                      would be an extra class no image belongs to)
  DIR                 a directory made by `python -m clip_jax.ingest` (it has manifest.json):
                      labels and class names from an imagefolder or labelled-TFDS ingest;
                      records with the same key (one image, several caption rows) are one
                      image with several captions; CSV columns kept as `meta` are attributes
  DIR                 CLIP_benchmark's WebDataset shards (`clip_benchmark_export_wds`): a
                      split folder holding nshards.txt and the shards 0.tar ... N-1.tar, or
                      a dataset folder whose test/ holds them (name DIR/train for another
                      split). A sample is the tar members KEY.EXT (EXT: from the first dot
                      of the name, as webdataset splits it): its image, the first of
                      webp, png, jpg, jpeg it has, and KEY.cls, its label (an integer), or
                      for a retrieval set KEY.txt, its captions one per line; key =
                      SHARD/KEY (0.tar/s0000000). In the split folder, else the dataset
                      folder (where CLIP_benchmark writes them): classnames.txt (one name
                      per line, by label), zeroshot_classification_templates.txt (its `{c}`
                      read as `{}`) and dataset_type.txt: classification (the default) or
                      retrieval; multilabel is refused
  FILE.csv / .tsv     a header row; --image-column (default filepath, relative to the file's
                      folder) and --caption-column (default caption); rows naming the same
                      image give it several captions; --label-column makes it labelled
                      (classes = the sorted distinct values); other columns are attributes
  tfds:NAME[:VERSION]:SPLIT
                      a TFDS dataset prepared on local disk (array_record); the SPLIT is
                      required (training's default, train, is rarely what an evaluation
                      means); labels from the ClassLabel --label-key (default label),
                      captions from the Text --caption-key (default caption) if present
  synthetic[:ATTR]    the embedded dataset's held-out split (shape/colour combinations never
                      seen in training), labelled by ATTR: shape (default) or color; with
                      the run's seed and `data.synthetic.num_eval` -- the set the training
                      run's zero-shot figures are logged on

Attributes for `--group-by`: the CSV / meta columns, the synthetic data's size,
position and background, and `level:N` -- component N of the image's relative path
(level:0 is an ImageFolder's class folder, level:1 the sub-folder below it).

Unlike training, a broken image is an error here: an evaluation must not quietly change
its data. Images are read lazily (`EvalData.image(i)`); everything else at open time.
"""
import csv
import dataclasses
import hashlib
import io
import posixpath
import tarfile
from typing import Optional

import numpy as np

from clip_jax import distributed, paths
from clip_jax.data import images, prompts, records, synthetic, zeroshot_metadata
from clip_jax.data import spec as spec_lib
from clip_jax.data.sources import TfdsSource

IMAGE_EXTENSIONS = images.IMAGE_EXTENSIONS
# CLIP_benchmark's WebDataset layout: a sample's image is the first of these members it has.
WDS_IMAGE_EXTENSIONS = ("webp", "png", "jpg", "jpeg")
WDS_CLASSNAMES = "classnames.txt"
WDS_TEMPLATES = "zeroshot_classification_templates.txt"
WDS_TYPE = "dataset_type.txt"


@dataclasses.dataclass
class EvalData:
    name: str
    reader: object                       # reader[i] -> encoded image bytes or uint8 [H, W, 3]
    keys: list                           # per image: its relative path / record key
    labels: Optional[np.ndarray] = None  # int64 [n], or None if unlabelled
    classnames: Optional[list] = None
    captions: Optional[list] = None      # per image: list of captions (retrieval)
    attributes: dict = dataclasses.field(default_factory=dict)   # name -> list[str] per image
    templates: Optional[tuple] = None    # the dataset's own zero-shot prompts, if any
    # Where `templates` came from, for the report: the shipped zero-shot metadata
    # (`zeroshot_metadata`) a known TFDS dataset took them (and class names, where shipped)
    # from, or the file they were read from (CLIP_benchmark's shards); "" if none.
    metadata: str = ""
    presized: bool = False               # images are at the model's size already (synthetic)
    fingerprint: str = ""                # identifies the data for the feature cache

    def __len__(self):
        return len(self.keys)

    def image(self, i):
        return self.reader[int(i)]

    def need_labels(self, task):
        if self.labels is None:
            raise ValueError(f"{task}: --data {self.name} has no labels; it needs an ImageFolder, "
                             "a labelled ingest (imagefolder, tfds --label-key), a CSV with "
                             "--label-column, tfds:NAME with a ClassLabel, or synthetic")

    def need_captions(self, task):
        if not self.captions or not all(self.captions):
            raise ValueError(f"{task}: --data {self.name} has no captions for every image")

    def group_values(self, attribute):
        """The value of `attribute` (see the module docstring) for each image, as str."""
        if attribute.startswith("level:"):
            try:
                level = int(attribute[len("level:"):])
            except ValueError:
                raise ValueError(f"--group-by {attribute!r}: expected level:N with N an integer") from None
            parts = [k.split("/")[:-1] for k in self.keys]
            if level < 0 or any(len(p) <= level for p in parts):
                bad = next(k for k, p in zip(self.keys, parts) if len(p) <= level or level < 0)
                raise ValueError(f"--group-by {attribute}: image {bad!r} has no folder at level {level}")
            return [p[level] for p in parts]
        if attribute not in self.attributes:
            names = sorted(self.attributes) + ["level:N"]
            raise ValueError(f"--group-by {attribute!r}: {self.name} has no such attribute "
                             f"(it has: {', '.join(names)})")
        return [str(v) for v in self.attributes[attribute]]

    def head(self, n):
        """The first n images (for a quick, smaller evaluation); n <= 0 keeps all."""
        if n <= 0 or n >= len(self):
            return self
        cut = lambda x: None if x is None else x[:n]
        return dataclasses.replace(
            self, keys=self.keys[:n], labels=cut(self.labels), captions=cut(self.captions),
            attributes={k: v[:n] for k, v in self.attributes.items()},
            fingerprint=f"{self.fingerprint}:head{n}")


def _digest(*parts):
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:20]


# ----------------------------------------------------------------------------- readers

class FileReader:
    """reader[i] -> the bytes of file i; `images.BadImage` for a FIFO or device (never opened:
    it would hang or never end) or a file over `images.DEFAULT_MAX_BYTES`."""

    def __init__(self, paths):
        self.paths = list(paths)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return images.read_file(self.paths[i])


class RecordReader:
    """reader[i] -> the image bytes of record indices[i] of an ingested directory."""

    def __init__(self, source, indices):
        self.source, self.indices = source, list(indices)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        return self.source[self.indices[i]]["image"]


class TarMemberReader:
    """reader[i] -> the bytes of tar member i, given as (shard, data offset, size): read when
    asked, from local or remote shards (`clip_jax.paths`); `images.BadImage` for a member
    over `images.DEFAULT_MAX_BYTES`."""

    def __init__(self, members):
        self.members = list(members)

    def __len__(self):
        return len(self.members)

    def __getitem__(self, i):
        shard, offset, size = self.members[i]
        if size > images.DEFAULT_MAX_BYTES:
            raise images.BadImage("file_too_large", f"{size} bytes > max_bytes={images.DEFAULT_MAX_BYTES}")
        with _open(shard) as f:
            f.seek(offset)
            data = f.read(size)
        if len(data) != size:
            raise OSError(f"{shard}: {len(data)} bytes at offset {offset}, the tar header says {size}")
        return data


def _open(path):
    return paths.path(path).open("rb") if paths.is_remote(path) else open(path, "rb")


class TfdsReader(RecordReader):
    def __getitem__(self, i):
        return self.source.read([self.indices[i]])[0][self.source.image_key]


class SyntheticReader:
    def __init__(self, seed, image_size):
        self.seed, self.image_size = seed, image_size

    def __getitem__(self, i):
        return synthetic.example(i, self.seed, self.image_size, "heldout")["image"]


# ----------------------------------------------------------------------------- openers

def open_imagefolder(directory, origin="--data"):
    """With several processes each walks only its share of the class folders (`read_shared`)."""
    classes = [c for c in paths.listdir(directory) if paths.isdir(paths.join(directory, c))]
    if not classes:
        raise ValueError(f"{origin} {directory}: no class folders (expected DIR/<class>/<images>)")

    def walk(labels):       # per class: [(key, size, mtime)] of its images
        return [[(f"{classes[label]}/{rel}",) + _stat(paths.join(directory, classes[label], rel))
                 for rel in paths.walk_files(paths.join(directory, classes[label]))
                 if rel.lower().endswith(IMAGE_EXTENSIONS)] for label in labels]

    found = distributed.read_shared(len(classes), walk)
    empty = [cls for cls, images in zip(classes, found) if not images]
    stats = [image for images in found for image in images]
    if not stats:
        raise ValueError(f"{origin} {directory}: no images ({', '.join(IMAGE_EXTENSIONS)}) in its class folders")
    if empty:
        shown = ", ".join(empty[:10]) + (f" (+{len(empty) - 10} more)" if len(empty) > 10 else "")
        raise ValueError(f"{origin} {directory}: {len(empty)} class folder(s) hold no images "
                         f"({', '.join(IMAGE_EXTENSIONS)}): {shown}; each would be a class no image "
                         "belongs to: remove the folder or add its images")
    keys = [key for key, _, _ in stats]
    labels = [label for label, images in enumerate(found) for _ in images]
    return EvalData(directory, FileReader([paths.join(directory, k) for k in keys]), keys,
                    np.array(labels, np.int64), [prompts.readable_classname(c) for c in classes],
                    fingerprint=_digest(stats))


def _stat(path):
    return paths.size(path), int(paths.mtime(path))


def open_ingested(directory):
    """With several processes each reads only its share of the records (`read_shared`)."""
    source = records.IngestedSource(directory)

    def read(indices):
        return [(r["key"], r["caption"], r.get("label", -1), r.get("meta", {}))
                for r in (source[i] for i in indices)]

    first, captions, labels, meta = {}, [], [], {}    # first: key -> (record, image position)
    for i, (key, caption, label, record_meta) in enumerate(distributed.read_shared(len(source), read)):
        if key not in first:
            first[key] = (i, len(captions))
            captions.append([])
            labels.append(label)
            for column, value in record_meta.items():
                meta.setdefault(column, {})[len(captions) - 1] = value
        captions[first[key][1]].append(caption)
    keys = list(first)
    manifest = source.manifest
    labelled = "classnames" in manifest and all(label >= 0 for label in labels)
    attributes = {c: [v.get(j, "") for j in range(len(keys))] for c, v in meta.items()}
    return EvalData(directory, RecordReader(source, [r for r, _ in first.values()]), keys,
                    np.array(labels, np.int64) if labelled else None,
                    list(manifest["classnames"]) if labelled else None, captions, attributes,
                    fingerprint=_digest(manifest.get("num_records"), manifest.get("shards"),
                                        paths.mtime(paths.join(directory, records.MANIFEST))))


def index_wds_shard(path, retrieval=False, origin="--data"):
    """The samples of one CLIP_benchmark shard (an uncompressed tar), in its order, as
    (key, image data offset, image size, label or None, captions or None): labels from the
    cls members, or captions from the txt members where `retrieval`. Only the tar headers
    and those small members are read, not the images."""
    samples = {}                                  # key -> {extension: TarInfo}
    try:
        with _open(path) as f, tarfile.open(fileobj=f, mode="r:") as tar:
            for member in tar:
                folder, base = posixpath.split(member.name)
                stem, dot, extension = base.partition(".")
                if member.isfile() and stem and dot:
                    samples.setdefault(posixpath.join(folder, stem), {})[extension.lower()] = member
            return [_wds_sample(tar, key, members, retrieval, f"{origin} {path}, sample {key!r}")
                    for key, members in samples.items()]
    except tarfile.TarError as e:
        raise ValueError(f"{origin} {path}: not a readable (uncompressed) tar file: {e}") from None


def _wds_sample(tar, key, members, retrieval, where):
    image = next((ext for ext in WDS_IMAGE_EXTENSIONS if ext in members), None)
    text = "txt" if retrieval else "cls"
    for absent, what in ((image is None, f"image ({', '.join(WDS_IMAGE_EXTENSIONS)})"),
                         (text not in members, text)):
        if absent:
            raise ValueError(f"{where}: no {what} member; it has: {', '.join(sorted(members))}")
    raw = tar.extractfile(members[text]).read()
    try:             # as webdataset: the text as UTF-8, cls as int() reads it
        value = raw.decode("utf-8").splitlines() if retrieval else int(raw.decode("utf-8"))
        if not retrieval and value < 0:
            raise ValueError
    except ValueError:
        raise ValueError(f"{where}: its {text} member {raw[:40]!r} is not "
                         f"{'UTF-8 text' if retrieval else 'a label (an integer >= 0)'}") from None
    return (key, members[image].offset_data, members[image].size,
            None if retrieval else value, value if retrieval else None)


def open_wds(split_dir, origin="--data"):
    """CLIP_benchmark's WebDataset shards (the module docstring): `split_dir` holds
    nshards.txt; its metadata files are read from it, else from its parent (the dataset
    folder, where CLIP_benchmark writes them)."""
    def find(name):
        found = [paths.join(d, name) for d in (split_dir, paths.dirname(split_dir))]
        return next((p for p in found if paths.isfile(p)), "")

    count_file = paths.join(split_dir, spec_lib.WDS_SHARD_COUNT)
    count = paths.read_text(count_file).strip()
    if not count.isdigit() or int(count) < 1:
        raise ValueError(f"{origin} {count_file}: {count!r} is not a number of shards (>= 1)")
    type_file = find(WDS_TYPE)
    dataset_type = paths.read_text(type_file).strip().lower() if type_file else "classification"
    if dataset_type not in ("classification", "retrieval"):
        raise ValueError(f"{origin} {type_file}: dataset type {dataset_type!r} is not supported "
                         "(classification or retrieval; multilabel is not)")
    retrieval = dataset_type == "retrieval"
    names = [f"{i}.tar" for i in range(int(count))]
    shards = [paths.join(split_dir, n) for n in names]
    for p in paths.missing_files(shards):
        raise ValueError(f"{origin} {split_dir}: shard {p} does not exist ({count_file} says {count})")
    keys, members, labels, captions = [], [], [], []
    indexed = distributed.read_shared(      # each process indexes only its share of the shards
        len(shards), lambda share: [index_wds_shard(shards[i], retrieval, origin) for i in share])
    for name, shard, samples in zip(names, shards, indexed):
        for key, offset, size, label, texts in samples:
            keys.append(f"{name}/{key}")
            members.append((shard, offset, size))
            labels.append(label)
            captions.append(texts)
    if not keys:
        raise ValueError(f"{origin} {split_dir}: its {count} shard(s) hold no samples")
    fingerprint = _digest([(n, paths.size(p), int(paths.mtime(p))) for n, p in zip(names, shards)])
    if retrieval:
        return EvalData(split_dir, TarMemberReader(members), keys, captions=captions,
                        fingerprint=fingerprint)
    names_file = find(WDS_CLASSNAMES)
    if not names_file:
        raise ValueError(f"{origin} {split_dir}: no {WDS_CLASSNAMES} in it or in "
                         f"{paths.dirname(split_dir)} (the class names, one per line, by label)")
    classnames = [line.strip() for line in paths.read_text(names_file).rstrip().splitlines()]
    top = int(np.argmax(labels))
    if labels[top] >= len(classnames):
        raise ValueError(f"{origin} {names_file}: {len(classnames)} class names, but sample "
                         f"{keys[top]} has label {labels[top]} (one name per line, by label)")
    templates_file = find(WDS_TEMPLATES)
    templates = prompts.load_templates(templates_file, "{c}") if templates_file else None
    return EvalData(split_dir, TarMemberReader(members), keys, np.array(labels, np.int64), classnames,
                    templates=templates, metadata=templates_file,
                    fingerprint=fingerprint)


def open_csv(path, image_column="filepath", caption_column="caption", label_column="",
             origin="--data"):
    delimiter = "\t" if path.lower().endswith(".tsv") else ","
    text = paths.read_bytes(path).decode("utf-8-sig")
    rows = list(csv.reader(io.StringIO(text, newline=""), delimiter=delimiter))
    if not rows:
        raise ValueError(f"{origin} {path}: empty file (expected a header row)")
    header = rows[0]
    for option, column in (("--image-column", image_column), ("--caption-column", caption_column),
                           ("--label-column", label_column)):
        if column and column not in header:
            raise ValueError(f"{origin} {path}: no column {column!r} ({option}); the header has "
                             f"{', '.join(header)}")
    at = {c: header.index(c) for c in header}
    folder = paths.dirname(path)
    index, files, captions, attributes = {}, [], [], {c: [] for c in header
                                                       if c not in (image_column, caption_column)}
    for line, fields in enumerate(rows[1:], start=2):
        if not fields:
            continue
        if len(fields) != len(header):
            raise ValueError(f"{origin} {path}, line {line}: {len(fields)} fields, the header has {len(header)}")
        image = fields[at[image_column]]
        if image not in index:
            index[image] = len(files)
            files.append(paths.join(folder, image))
            captions.append([])
            for c in attributes:
                attributes[c].append(fields[at[c]])
        if caption_column:
            captions[index[image]].append(fields[at[caption_column]])
    for p in paths.missing_files(files):
        raise ValueError(f"{origin} {path}: image file {p} does not exist")
    labels = classnames = None
    if label_column:
        classnames = sorted(set(attributes[label_column]))
        labels = np.array([classnames.index(v) for v in attributes[label_column]], np.int64)
    return EvalData(path, FileReader(files), list(index), labels, classnames, captions, attributes,
                    fingerprint=_digest(path, paths.mtime(path), len(rows)))


def open_tfds(tfds_spec, data_dir="", image_key="image", label_key="label", caption_key="caption"):
    """`tfds_spec`: a `spec.DataSpec` of kind tfds (its split given: `spec.parse`)."""
    # lazy: tensorflow_datasets takes seconds to import; only TFDS data needs it
    import tensorflow_datasets as tfds
    spec, name, split = tfds_spec.text, tfds_spec.name, tfds_spec.split
    try:   # labelled if label_key is a ClassLabel; else TfdsSource insists on the caption
        source = TfdsSource(name, split, data_dir, image_key, label_key=label_key)
    except ValueError as e:
        if "label_key" not in str(e):
            raise
        source = TfdsSource(name, split, data_dir, image_key, caption_key=caption_key)
    features = source.features
    has = lambda key, kind: key in features and isinstance(features[key], kind)
    use_label = bool(source.label_key)
    use_caption = has(caption_key, tfds.features.Text)

    def read(indices):      # (label, [caption]) of records `indices`, read 256 at a time
        out, indices = [], list(indices)
        for start in range(0, len(indices), 256):
            for raw in source.read(indices[start:start + 256]):
                c = raw[caption_key] if use_caption else b""
                out.append((int(raw[label_key]) if use_label else None,
                            [c.decode("utf-8", "replace") if isinstance(c, bytes) else str(c)]))
        return out

    # each process reads only its share of the records
    rows = distributed.read_shared(len(source), read)
    labels = [label for label, _ in rows] if use_label else []
    captions = [caption for _, caption in rows] if use_caption else []
    classnames = [prompts.readable_classname(c) for c in features[label_key].names] if use_label else None
    # A dataset the shipped metadata knows takes its templates, and its curated class names
    # where they are shipped and fit (e.g. imagenet2012's wnids -> OpenAI's names).
    known = zeroshot_metadata.for_tfds(name) if use_label else None
    templates = zeroshot_metadata.templates(known) if known and zeroshot_metadata.is_templates_name(known) else None
    if known and zeroshot_metadata.is_classnames_name(known):
        try:
            classnames = zeroshot_metadata.classnames_for(known, classnames, f"tfds:{name}")
        except ValueError:
            pass            # another number of classes than shipped: the dataset's own names
    n = len(source)
    return EvalData(spec, TfdsReader(source, range(n)), [f"{split}/{i}" for i in range(n)],
                    np.array(labels, np.int64) if use_label else None, classnames,
                    captions if use_caption else None, templates=templates,
                    metadata=known if templates is not None else "",
                    fingerprint=_digest(spec, data_dir, n, label_key, caption_key))


def open_synthetic(synthetic_spec, seed, image_size, num_eval):
    """`synthetic_spec`: a `spec.DataSpec` of kind synthetic (its attribute checked)."""
    spec, attribute = synthetic_spec.text, synthetic_spec.attribute
    classnames, templates = synthetic.zeroshot_tasks()[attribute]
    attrs = [synthetic.attributes(i, seed, "heldout") for i in range(num_eval)]
    groups = {"size": synthetic.SIZES, "position": synthetic.POSITIONS,
              "background": synthetic.BACKGROUNDS}
    return EvalData(
        spec, SyntheticReader(seed, image_size), [f"heldout/{i}" for i in range(num_eval)],
        np.array([a[attribute] for a in attrs], np.int64), list(classnames),
        [[a["caption"]] for a in attrs],
        {name: [values[a[name]] for a in attrs] for name, values in groups.items()},
        templates=tuple(templates), presized=True, fingerprint=_digest(spec, seed, num_eval))


def open_eval_data(spec, config=None, data_dir="", image_key="image", label_key="label",
                   caption_key="caption", image_column="filepath", caption_column="caption",
                   label_column="", classnames="", origin="--data"):
    """The EvalData `spec` names (see the module docstring). `config` (the model's run
    config) supplies the synthetic data's seed, image size and size. `classnames`: a file
    with one class name per line, replacing the dataset's (same count and order).
    `origin`: the flag or config key `spec` came from, for messages."""
    data_spec = spec_lib.parse(spec, "eval", origin)
    if data_spec.kind == "synthetic":
        if config is None:
            raise ValueError(f"{origin} {spec}: needs the run's config")
        data = open_synthetic(data_spec, int(config.seed), int(config.model.vision.image_size),
                              int(config.data.synthetic.num_eval))
    elif data_spec.kind == "tfds":
        data = open_tfds(data_spec, data_dir, image_key, label_key, caption_key)
    elif data_spec.kind == "csv":
        data = open_csv(data_spec.path, image_column, caption_column, label_column, origin)
    elif data_spec.kind == "ingested":
        data = open_ingested(data_spec.path)
    elif data_spec.kind == "wds":
        data = open_wds(data_spec.path, origin)
    else:
        assert data_spec.kind == "imagefolder", data_spec   # what spec.parse gives for eval
        data = open_imagefolder(data_spec.path, origin)
    if classnames:
        data = dataclasses.replace(data, classnames=read_classnames(classnames, data))
    return data


def read_classnames(path, data):
    """The class names of `--classnames` (a file, else a shipped name) for `data`."""
    if not paths.isfile(path) and zeroshot_metadata.is_classnames_name(path):
        data.need_labels("--classnames")
        return zeroshot_metadata.classnames_for(path, data.classnames)
    try:
        names = [line.strip() for line in paths.read_text(path).splitlines() if line.strip()]
    except OSError as e:
        raise ValueError(f"--classnames {path}: {e.strerror or e}") from None
    data.need_labels("--classnames")
    if len(names) != len(data.classnames):
        raise ValueError(f"--classnames {path}: {len(names)} names for the {len(data.classnames)} "
                         f"classes of {data.name} (one per line, in the dataset's class order)")
    return names
