"""Ingest: a user's images and captions -> ArrayRecord shards for training and evaluation.

    python -m clip_jax.ingest FORMAT SOURCE --out DIR [options]

The output directory holds `data-NNNNN.array_record` shards of records (JPEG, RGB, short
side at most --max-size; caption; key; optional label and meta), `skipped.jsonl` and
`manifest.json`, in the format of `clip_jax/data/records.py`. Read it back with
`records.IngestedSource(DIR)`.

Formats
  csv          SOURCE is a CSV file with a header row (a .tsv file is tab-separated). One
               row per image: --image-column (default filepath) holds the image path,
               relative paths are resolved against the CSV file's folder; --caption-column
               (default caption) the caption. The other columns are kept as the record's
               `meta` (column -> text), e.g. for grouping evaluation results. A row with more
               or fewer fields than the header is skipped (`bad_row`); blank lines are not
               rows. Invalid UTF-8 in a caption or meta field is replaced by U+FFFD and the
               row is kept; the image path keeps its exact bytes. A UTF-8 byte-order mark is
               ignored.
  captions     SOURCE is a folder tree of images (.jpg .jpeg .png .webp .bmp .gif .tif .tiff,
               any case), each captioned by a sidecar text file with the same stem
               (cat.jpg + cat.txt). Several images with one stem share its sidecar.
               Folders are read in sorted order, a folder's files before its sub-folders.
  imagefolder  SOURCE/<class>/**/<image>: one class per sub-folder of SOURCE (sorted names;
               label = index, as torchvision's ImageFolder). The caption is a prompt template
               filled with the class name, '_' read as a space ("golden_retriever" -> "a photo
               of a golden retriever."). The template is picked by crc32(record key) % number
               of templates, so a file always gets the same one. --templates FILE replaces the
               defaults of `clip_jax.data.prompts` (one template with '{}' per line).
  wds          SOURCE is one or more WebDataset tar shards: paths, globs and brace ranges
               (shards-{00000..00099}.tar), matched files sorted; every pattern must match a
               file. Plain or compressed tars are read as streams. Members are grouped into
               samples as webdataset does: consecutive members with the same key (path up to
               the first '.' of the file name); the image is the jpg/jpeg/png/webp/... member,
               the caption the txt member. The record key is <shard file name>/<sample key>.
  tfds         SOURCE is a TFDS dataset name (name or name:version) already prepared on local
               disk in the array_record file format (TensorFlow is not needed). --split
               (default train, as for a training source: clip_jax/data/spec.py), --data-dir,
               --image-key (default image; an Image feature) and either --caption-key
               (default caption; a Text feature) or --label-key (a ClassLabel feature:
               captions from the class names and the templates, as imagefolder). Record
               key: <split>/<example index>.

Options (all formats)
  --max-size       short side of the stored image at most this (default 256); smaller images
                   are never enlarged. Resizing is bicubic with antialiasing.
  --min-size       skip images whose short side is below this (default 32)
  --max-pixels     skip images with more pixels than this (default 100 million); only the
                   image header has been read then, so a decompression bomb costs no memory
  --max-bytes      skip files larger than this (default 64 MiB): image files, caption
                   sidecars, wds members, TFDS images; the size is checked before reading,
                   and no more than this is ever read of a file (one may grow meanwhile)
  --quality        JPEG quality of the stored images (default 95)
  --records-per-shard  records per ArrayRecord shard (default 5000)
  --workers        processes decoding and encoding images (default: all CPUs; 0 = in-process)
  --overwrite      replace a previous ingest in --out (its manifest, shards and skipped.jsonl;
                   other files are left alone). Without it, an --out holding a manifest or
                   shards is refused.

Skipped rows
  A bad row never stops the run: it is skipped, logged in skipped.jsonl as {"row" (0-based
  input row), "source" (file, tar sample or TFDS example), "reason", "detail"} and counted
  in the manifest's `skipped` by reason:
    bad_row          csv: wrong number of fields, or a line the csv module cannot parse
    missing_file     the image file does not exist (or the path field is empty)
    unreadable_file  the image file (or a caption sidecar, or a folder) cannot be read
    not_a_file       the path names a FIFO, a device (/dev/zero), a socket or a folder: it
                     is not opened (a FIFO would hang the ingest, a device never end)
    file_too_large   the image file, caption sidecar, wds member or TFDS image has more than
                     --max-bytes
    missing_caption  captions: image without sidecar; wds: sample without a txt member
    missing_image    captions: sidecar without image; wds: sample without an image member
    empty_caption    the caption is empty or whitespace only
    missing_label    tfds --label-key: the label is not a class (e.g. -1 on a test split)
    corrupt_archive  wds: the shard is truncated, corrupt or unreadable; the samples before
                     the damage are kept, the rest of the shard counts as this one row
    empty_file, not_an_image, too_large, too_small, corrupt_image
                     the image cannot be used (see clip_jax/data/images.py)
    unexpected_error reading, decoding or encoding the row raised an error nothing above
                     names (the detail says which); the row is skipped, the ingest goes on
  A row with several problems is counted once, under the first found, in this order:
  caption, reading the file, decoding the image. Every row is either a record or skipped:
  num_records + sum(skipped) == rows.

Repairs
  Kept rows that needed a repair are counted in the manifest's `repaired`: the image
  conversions of `images.to_rgb` (cmyk, 16bit, palette, alpha, grayscale, ...) and
  invalid_utf8 (invalid UTF-8 in a caption, a CSV meta field or a CSV path as shown in the
  record key, replaced by U+FFFD; the file is still opened by its exact bytes). Captions are
  stripped of surrounding whitespace; long captions are kept whole (the tokenizer truncates).

Order and parallelism
  Records are written in input-row order, so the output does not depend on --workers (it is
  byte-identical for any count). The main process streams the input (it never lists all
  rows) in chunks of up to 32 rows (8 MiB of image bytes for wds, whose tar members the
  main process reads and ships), with at most 4 chunks per worker in flight; workers read,
  check, convert, resize and encode the images, and the main process writes the results in
  submission order. TFDS workers open the dataset themselves and read their chunk's
  examples by index. manifest.json is written last: a directory without one is not a
  dataset.
"""
import collections
import concurrent.futures
import contextlib
import csv
import fnmatch
import functools
import glob
import io
import json
import multiprocessing
import os
import posixpath
import sys
import tarfile
import zlib

from tqdm import tqdm

from clip_jax import paths
from clip_jax.data import images, ingest_beam, ingest_rows, prompts, records, sources
from clip_jax.data import spec as spec_lib
# Rows and the work on each, shared with the Beam driver (its chunk size too:
# ingest_rows.CHUNK_ROWS, read there by both drivers).
from clip_jax.data.ingest_rows import Prepared, Row, Settings, process_chunk

IMAGE_EXTENSIONS = images.IMAGE_EXTENSIONS
# webdataset member extensions, in order of preference when a sample has several images.
WDS_IMAGE_EXTENSIONS = tuple(ext[1:] for ext in IMAGE_EXTENSIONS)
WDS_CAPTION_EXTENSION = "txt"

CHUNK_BYTES = 8 << 20           # ... or fewer, once the chunk holds this many image bytes (wds)
CHUNKS_PER_WORKER = 4           # chunks in flight per worker: the bound on memory
TFDS_PART_ROWS = 10_000         # TFDS examples per part of the input (a Beam worker's read)
SHARD_GLOB = "data-*.array_record"


class OptionError(ValueError):
    """A bad option or input, found before any work: nothing has been written."""


# ----------------------------------------------------------------------------- text helpers

def _decode_text(data):
    """UTF-8 bytes -> (str, whether invalid bytes were replaced by U+FFFD)."""
    try:
        return data.decode("utf-8"), False
    except UnicodeDecodeError:
        return data.decode("utf-8", "replace"), True


def _display(path):
    """A path (str, possibly with surrogate escapes, or bytes) as valid text."""
    return os.fsencode(path).decode("utf-8", "replace")


def _repairs(*repaired):
    return ("invalid_utf8",) if any(repaired) else ()


def _is_image(name):
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _templates(path):
    if path is None:
        return prompts.DEFAULT_TEMPLATES
    try:
        return prompts.load_templates(path)
    except ValueError as e:
        raise OptionError(str(e)) from None


# ----------------------------------------------------------------------------- csv

def _csv_delimiter(path, delimiter):
    if delimiter is None:
        return "\t" if path.lower().endswith(".tsv") else ","
    delimiter = {"\\t": "\t", "tab": "\t"}.get(delimiter, delimiter)
    if len(delimiter) != 1:
        raise OptionError(f"--delimiter must be one character (or \\t), got {delimiter!r}")
    return delimiter


def _open_csv(path):
    # surrogateescape: invalid UTF-8 survives as escapes, repaired per field.
    if paths.is_remote(path):
        return io.TextIOWrapper(paths.path(path).open("rb"), newline="", encoding="utf-8-sig",
                                errors="surrogateescape")
    return open(path, newline="", encoding="utf-8-sig", errors="surrogateescape")


def prepare_csv(input_spec, image_column="filepath", caption_column="caption", delimiter=None):
    source = input_spec.path
    delimiter = _csv_delimiter(source, delimiter)
    if not paths.is_remote(source) and os.path.exists(source) and not os.path.isfile(source):
        raise OptionError(f"the CSV file {source!r} is not a regular file (a pipe, a device or "
                          "a folder); it is read twice: write it to a file first")
    try:
        with _open_csv(source) as f:
            header = next(csv.reader(f, delimiter=delimiter), [])
    except (OSError, csv.Error) as e:
        raise OptionError(f"cannot read the CSV file {source!r}: {e}") from None
    for option, column in (("--image-column", image_column), ("--caption-column", caption_column)):
        if column not in header:
            raise OptionError(f"{source}: no column {column!r} ({option}) in the header; "
                              f"its columns are: {', '.join(map(repr, header)) or 'none'}")
    rows = functools.partial(_csv_rows, source, delimiter, header.index(image_column),
                             header.index(caption_column))
    options = {"image_column": image_column, "caption_column": caption_column,
               "delimiter": delimiter}
    return Prepared([rows], options)


def _field_text(field):
    """A CSV field read with surrogateescape -> (str, whether invalid UTF-8 was replaced)."""
    return _decode_text(field.encode("utf-8", "surrogateescape"))


def _csv_rows(path, delimiter, image_at, caption_at):
    # A local CSV's folder as bytes (a path field's exact bytes are joined to it); a remote
    # one's as a URL.
    folder = paths.dirname(path) if paths.is_remote(path) else os.fsencode(paths.dirname(path))
    with _open_csv(path) as f:
        reader = csv.reader(f, delimiter=delimiter)
        header = [_field_text(name)[0] for name in next(reader)]
        while True:
            try:
                fields = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                yield Row(f"{path}, line {reader.line_num}", skip=("bad_row", str(e)))
                continue
            if not fields:
                continue
            if len(fields) != len(header):
                yield Row(f"{path}, line {reader.line_num}",
                          skip=("bad_row", f"{len(fields)} fields, the header has {len(header)}"))
                continue
            yield _csv_row(path, reader.line_num, folder, header, fields, image_at, caption_at)


def _csv_row(csv_path, line, folder, header, fields, image_at, caption_at):
    written = os.fsencode(fields[image_at])          # the exact bytes of the path field
    if not written:
        return Row(f"{csv_path}, line {line}", skip=("missing_file", "empty image path"))
    field = fields[image_at]
    if paths.is_remote(field):                       # an image URL
        path = field
    elif isinstance(folder, str) and not field.startswith("/"):   # relative to a remote CSV
        path = f"{folder}/{field}"
    else:
        path = os.path.join(os.fsencode(folder), written)
    key, bad_key = _decode_text(written)
    caption, bad_caption = _field_text(fields[caption_at])
    meta, bad_meta = {}, False
    for at, (column, field) in enumerate(zip(header, fields)):
        if at not in (image_at, caption_at):
            meta[column], bad = _field_text(field)
            bad_meta |= bad
    return Row(_display(path), key=key, caption=caption, path=path, meta=meta,
               repairs=_repairs(bad_key, bad_caption, bad_meta))


# ----------------------------------------------------------------------------- folders

def _check_folder(source):
    if paths.is_remote(source):
        raise OptionError(f"{source!r}: folder sources are read from this machine's file system "
                          "(csv and wds sources may be remote); copy the folder here, or mount "
                          "the bucket (gcsfuse) and give the mount's path")
    if not os.path.isdir(source):
        raise OptionError(f"{source!r} is not a folder")


def _walk(top):
    """(folder, sorted file names, None) for each folder under `top`, depth-first in sorted
    order (a folder's files before its sub-folders); a folder that cannot be listed comes as
    (folder, [], OSError)."""
    errors = []
    for folder, subfolders, names in os.walk(top, onerror=errors.append):
        yield from ((error.filename, [], error) for error in errors)
        errors.clear()
        subfolders.sort()
        yield folder, sorted(names), None
    yield from ((error.filename, [], error) for error in errors)


def _unreadable_folder(folder, error):
    return Row(_display(folder), skip=("unreadable_file", f"folder: {error.strerror}"))


def _file_row(top, path, caption="", **fields):
    """The row of image file `path` under `top`: key = its relative path with '/'."""
    key = _display(os.path.relpath(path, top)).replace(os.sep, "/")
    return Row(_display(path), key=key, caption=caption, path=path, **fields)


def prepare_captions(input_spec, max_bytes=images.DEFAULT_MAX_BYTES):
    source = input_spec.path
    _check_folder(source)
    return Prepared([functools.partial(_caption_rows, source, max_bytes)], {})


def _caption_rows(top, max_bytes):
    for folder, names, error in _walk(top):
        if error:
            yield _unreadable_folder(folder, error)
            continue
        image_stems = {os.path.splitext(name)[0] for name in names if _is_image(name)}
        sidecars = {os.path.splitext(name)[0]: name for name in names
                    if os.path.splitext(name)[1].lower() == ".txt"}
        for name in names:
            stem = os.path.splitext(name)[0]
            if _is_image(name):
                yield _captioned_row(top, folder, name, sidecars.get(stem), max_bytes)
            elif sidecars.get(stem) == name and stem not in image_stems:
                yield _file_row(top, os.path.join(folder, name),
                                skip=("missing_image", f"no image named {_display(stem)}.*"))


def _captioned_row(top, folder, name, sidecar, max_bytes):
    path = os.path.join(folder, name)
    if sidecar is None:
        return _file_row(top, path, skip=("missing_caption",
                                          f"no {_display(os.path.splitext(name)[0])}.txt"))
    try:
        caption, repaired = _decode_text(ingest_rows.read_file(os.path.join(folder, sidecar),
                                                               max_bytes))
    except (ingest_rows.RowSkipped, images.BadImage) as e:
        return _file_row(top, path, skip=(e.reason, f"{_display(sidecar)}: {e.detail}"))
    return _file_row(top, path, caption, repairs=_repairs(repaired))


def prepare_imagefolder(input_spec, templates=None):
    source = input_spec.path
    _check_folder(source)
    classes = sorted(entry.name for entry in os.scandir(source) if entry.is_dir())
    if not classes:
        raise OptionError(f"{source!r} has no class folders (expected SOURCE/<class>/<images>)")
    templates = _templates(templates)
    names = [_display(folder) for folder in classes]
    classnames = [prompts.readable_classname(name) for name in names]
    rows = functools.partial(_imagefolder_rows, source, classes, classnames, templates)
    return Prepared([rows], {"templates": list(templates)},
                    {"classes": names, "classnames": classnames})


def _imagefolder_rows(top, class_folders, classnames, templates):
    for label, (class_folder, classname) in enumerate(zip(class_folders, classnames)):
        for folder, names, error in _walk(os.path.join(top, class_folder)):
            if error:
                yield _unreadable_folder(folder, error)
                continue
            for name in filter(_is_image, names):
                row = _file_row(top, os.path.join(folder, name), label=label)
                yield row._replace(caption=prompts.caption_for(classname, row.key, templates))


# ----------------------------------------------------------------------------- wds

def _expand_shards(patterns):
    import braceexpand
    shards = set()
    for pattern in patterns:
        for expanded in braceexpand.braceexpand(pattern):
            matches = _matching_files(expanded)
            if not matches:
                origin = f" (from {pattern!r})" if expanded != pattern else ""
                raise OptionError(f"no file matches {expanded!r}{origin}")
            shards.update(matches)
    return sorted(shards)


def _matching_files(pattern):
    if not paths.is_remote(pattern):
        return [path for path in glob.glob(pattern) if os.path.isfile(path)]
    if not glob.has_magic(pattern):
        return [pattern] if paths.isfile(pattern) else []
    folder, name = pattern.rsplit("/", 1)
    if glob.has_magic(folder):
        raise OptionError(f"{pattern!r}: in a remote path only the file name may hold wildcards")
    return [f"{folder}/{n}" for n in paths.listdir(folder) if fnmatch.fnmatchcase(n, name)
            and paths.isfile(f"{folder}/{n}")] if paths.isdir(folder) else []


def prepare_wds(input_spec, max_bytes=images.DEFAULT_MAX_BYTES):
    shards = _expand_shards(input_spec.patterns)
    return Prepared([functools.partial(_wds_shard_rows, shard, max_bytes) for shard in shards],
                    {"files": shards})


def _member_key(name):
    """webdataset's split of a member path: (key, lowercased extension), or None."""
    folder, base = posixpath.split(name)
    stem, dot, extension = base.partition(".")
    if not stem or not dot:
        return None
    return posixpath.join(folder, stem), extension.lower()


class _TooLarge(int):
    """A tar member over max_bytes, left unread: its size."""


def _tar_samples(path, max_bytes):
    """(key, {extension: bytes or None}) for each run of consecutive members with one key.
    Only image and caption members are read, those over max_bytes not (`_TooLarge`); the
    others are listed with None. Only regular members count (tarfile creates nothing)."""
    wanted = {*WDS_IMAGE_EXTENSIONS, WDS_CAPTION_EXTENSION}
    key, members = None, {}
    remote = paths.path(path).open("rb") if paths.is_remote(path) else None
    with remote or contextlib.nullcontext(), \
            tarfile.open(path if remote is None else None, "r|*", fileobj=remote) as tar:
        for member in tar:
            split = _member_key(member.name) if member.isfile() else None
            if split is None:
                continue
            if split[0] != key:
                if members:
                    yield key, members
                key, members = split[0], {}
            if split[1] not in wanted:
                members[split[1]] = None
            elif member.size > max_bytes:
                members[split[1]] = _TooLarge(member.size)
            else:
                members[split[1]] = tar.extractfile(member).read()
    if members:
        yield key, members


def _wds_shard_rows(shard, max_bytes):
    try:
        for key, members in _tar_samples(shard, max_bytes):
            yield _wds_row(shard, key, members, max_bytes)
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        yield Row(_display(shard), skip=("corrupt_archive",
                                         f"{_display(shard)}: {type(e).__name__}: {e}"))


def _wds_row(shard, key, members, max_bytes):
    row = Row(f"{_display(shard)}:{_display(key)}",
              key=f"{_display(os.path.basename(shard))}/{_display(key)}")
    image = next((ext for ext in WDS_IMAGE_EXTENSIONS if ext in members), None)
    found = f"members: {', '.join(sorted(members))}"
    if image is None:
        return row._replace(skip=("missing_image", found))
    if WDS_CAPTION_EXTENSION not in members:
        return row._replace(skip=("missing_caption", found))
    for ext in (image, WDS_CAPTION_EXTENSION):
        if isinstance(members[ext], _TooLarge):
            return row._replace(skip=("file_too_large", f"member {_display(key)}.{ext}: "
                                      f"{members[ext]} bytes > max_bytes={max_bytes}"))
    caption, repaired = _decode_text(members[WDS_CAPTION_EXTENSION])
    return row._replace(caption=caption, image=members[image], repairs=_repairs(repaired))


# ----------------------------------------------------------------------------- tfds

def prepare_tfds(input_spec, data_dir=None, image_key="image", caption_key=None,
                 label_key=None, templates=None):
    source, split = input_spec.name, input_spec.split
    if caption_key is not None and label_key is not None:
        raise OptionError("give --caption-key or --label-key, not both")
    if templates is not None and label_key is None:
        raise OptionError("--templates needs --label-key (captions from class names)")
    caption_key = None if label_key else (caption_key or "caption")
    args = (source, split, data_dir or "", image_key, caption_key or "", label_key or "",
            _templates(templates) if label_key else None)
    try:
        data = sources.TfdsSource(*args)
    except ValueError as e:
        raise OptionError(str(e)) from None
    options = {"split": split, "data_dir": data_dir, "image_key": image_key}
    extra = {}
    if label_key:
        extra = {"classes": data.classes, "classnames": data.classnames}
        options.update(label_key=label_key, templates=list(data.templates))
    else:
        options.update(caption_key=caption_key)
    parts = [functools.partial(_tfds_rows, source, split, start, min(start + TFDS_PART_ROWS, len(data)))
             for start in range(0, len(data), TFDS_PART_ROWS)]
    return Prepared(parts, options, extra, TfdsExamples(args), len(data))


def _tfds_rows(name, split, start, stop):
    """One row per example of [start, stop), in order (which `TfdsExamples` reads)."""
    for i in range(start, stop):
        yield Row(f"{name}/{split}/{i}", key=f"{split}/{i}", example=i)


class TfdsExamples:
    """Fills a chunk of tfds rows with their examples' image bytes and captions.

    Picklable: each worker process opens the data source itself, once, and reads its
    chunk's examples by index with one batched read. Images stay encoded.
    """

    def __init__(self, source_args):
        self.source_args = source_args
        self._data = None

    def __getstate__(self):
        return {"source_args": self.source_args, "_data": None}

    def __call__(self, rows):
        if self._data is None:
            self._data = sources.TfdsSource(*self.source_args)
        raws = self._data.read([row.example for row in rows])
        return [self._fill(row, raw) for row, raw in zip(rows, raws)]

    def _fill(self, row, raw):
        try:
            example = self._data.to_example(row.example, raw)
        except sources.LabelOutOfRange as e:
            return row._replace(skip=("missing_label", str(e)))
        return row._replace(image=example["image"], caption=example["caption"],
                            label=example.get("label"),
                            repairs=_repairs(example["caption_repaired"]))


# The prepare function of each kind of `spec.for_ingest`.
FORMATS = {"csv": prepare_csv, "captions": prepare_captions, "imagefolder": prepare_imagefolder,
           "wds": prepare_wds, "tfds": prepare_tfds}


# ----------------------------------------------------------------------------- workers

_WORKER_SETTINGS = None


def _init_worker(settings):
    global _WORKER_SETTINGS
    _WORKER_SETTINGS = settings


def _process_chunk_in_worker(rows):
    return process_chunk(rows, _WORKER_SETTINGS)


def _chunks(rows):
    """Numbers the rows and groups them: ingest_rows.CHUNK_ROWS rows or CHUNK_BYTES of image bytes."""
    chunk, size = [], 0
    for index, row in enumerate(rows):
        chunk.append(row._replace(index=index))
        size += len(row.image or b"")
        if len(chunk) == ingest_rows.CHUNK_ROWS or size >= CHUNK_BYTES:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _processed(chunks, settings, workers):
    """Each chunk's results, in submission order; at most CHUNKS_PER_WORKER x workers
    chunks are in flight, so the input is read only as fast as it is processed."""
    if workers == 0:
        yield from (process_chunk(chunk, settings) for chunk in chunks)
        return
    pool = concurrent.futures.ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context("spawn"),
        initializer=_init_worker, initargs=(settings,))
    try:
        pending = collections.deque()
        for chunk in chunks:
            pending.append(pool.submit(_process_chunk_in_worker, chunk))
            if len(pending) >= CHUNKS_PER_WORKER * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(cancel_futures=True)


# ----------------------------------------------------------------------------- output

def _previous_outputs(out):
    """The files of an earlier ingest in `out`: manifest, shards, skipped log."""
    present = paths.listdir(out) if paths.isdir(out) else []
    names = [n for n in (records.MANIFEST, records.SKIPPED_LOG) if n in present]
    names += [n for n in present if fnmatch.fnmatchcase(n, SHARD_GLOB)]
    return [paths.join(out, n) for n in names if paths.isfile(paths.join(out, n))]


def _check_output(out, overwrite):
    if paths.exists(out) and not paths.isdir(out):
        raise OptionError(f"--out {out!r} exists and is not a folder")
    dataset = [path for path in _previous_outputs(out)
               if not path.endswith(records.SKIPPED_LOG)]
    if dataset and not overwrite:
        raise OptionError(f"--out {out!r} already holds an ingested dataset "
                          f"({dataset[0].rsplit('/', 1)[-1]}, ...); pass --overwrite to replace it")


def _clear_output(out):
    paths.makedirs(out)
    for path in _previous_outputs(out):   # the manifest first: a half-cleared dir is no dataset
        paths.path(path).unlink()


def _check_settings(max_size, min_size, max_pixels, max_bytes, quality, records_per_shard, workers):
    for option, value, low in (("--max-size", max_size, 1), ("--min-size", min_size, 1),
                               ("--max-pixels", max_pixels, 1), ("--max-bytes", max_bytes, 1),
                               ("--quality", quality, 1),
                               ("--records-per-shard", records_per_shard, 1),
                               ("--workers", workers, 0)):
        if value < low:
            raise OptionError(f"{option} must be at least {low}, got {value}")
    if quality > 100:
        raise OptionError(f"--quality must be at most 100, got {quality}")


RUNNERS = ("local", "beam")


def run(format, source, out, *, max_size=256, min_size=images.DEFAULT_MIN_SIZE,
        max_pixels=images.DEFAULT_MAX_PIXELS, max_bytes=images.DEFAULT_MAX_BYTES, quality=95,
        records_per_shard=5000, workers=None,
        overwrite=False, progress=False, runner="local", beam_args=(), **format_options):
    """Ingests `source` (see the module docstring) into the folder `out`; returns the manifest.

    `format_options` are the format's own options (`prepare_<format>`'s keywords).
    `runner`: 'local' (this machine's `workers` processes) or 'beam' (an Apache Beam
    pipeline, `clip_jax.data.ingest_beam`, with Beam's own options `beam_args`); both write
    the same output. Raises OptionError, before anything is written, for a bad option or an
    unusable input.
    """
    workers = os.cpu_count() if workers is None else workers
    _check_settings(max_size, min_size, max_pixels, max_bytes, quality, records_per_shard, workers)
    try:
        input_spec = spec_lib.for_ingest(format, source, format_options.pop("split", None))
    except spec_lib.SpecError as e:
        raise OptionError(str(e)) from None
    if runner not in RUNNERS:
        raise OptionError(f"unknown runner {runner!r}; one of {', '.join(RUNNERS)}")
    if runner == "beam":
        try:
            import apache_beam  # noqa: F401
        except ImportError:
            raise OptionError("--runner=beam needs Apache Beam: pip install -e '.[beam]'") from None
    if input_spec.kind in ("captions", "wds"):   # they read caption files, tar members
        format_options["max_bytes"] = max_bytes
    prepared = FORMATS[input_spec.kind](input_spec, **format_options)
    _check_output(out, overwrite)
    settings = Settings(max_size, min_size, max_pixels, quality, prepared.fetch, max_bytes)
    manifest_fields = {**prepared.extra,
                       "max_size": max_size, "min_size": min_size, "max_pixels": max_pixels,
                       "max_bytes": max_bytes,
                       "quality": quality, "records_per_shard": records_per_shard,
                       "source": {"format": format, "source": source, **prepared.options}}
    _clear_output(out)
    if runner == "beam":
        return ingest_beam.run(prepared, out, settings, records_per_shard, manifest_fields,
                               beam_args)
    counts = _write(prepared, out, settings, records_per_shard, workers, progress)
    records.write_manifest(out, {**counts, **manifest_fields})
    return records.read_manifest(out)


def _write(prepared, out, settings, records_per_shard, workers, progress):
    """Processes every row; writes the shards and skipped.jsonl. Returns the counts."""
    skipped, repaired = collections.Counter(), collections.Counter()
    writer = records.ShardWriter(out, records_per_shard)
    rows = 0
    try:
        with paths.staged(paths.join(out, records.SKIPPED_LOG)) as log_file, \
                open(log_file, "w", encoding="utf-8") as log, \
                tqdm(total=prepared.total, unit=" rows", file=sys.stderr,
                     disable=not progress) as bar:
            for results in _processed(_chunks(prepared.rows), settings, workers):
                for result in results:
                    if result.record is not None:
                        writer.write(result.record)
                        repaired.update(result.repairs)
                    else:
                        skipped[result.skip[0]] += 1
                        log.write(json.dumps({"row": result.index, "source": result.source,
                                              "reason": result.skip[0],
                                              "detail": result.skip[1]}) + "\n")
                rows += len(results)
                bar.update(len(results))
                bar.set_postfix(skipped=sum(skipped.values()), refresh=False)
    finally:
        shards = writer.close()
    return {"num_records": rows - sum(skipped.values()), "rows": rows, "shards": shards,
            "skipped": dict(sorted(skipped.items())), "repaired": dict(sorted(repaired.items()))}
