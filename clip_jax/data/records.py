"""The on-disk format of an ingested dataset: ArrayRecord shards of msgpack records + manifest.

A directory written by `clip_jax.ingest`:

  DIR/manifest.json          written last: a directory without it is not a dataset
  DIR/data-00000.array_record, data-00001.array_record, ...
  DIR/skipped.jsonl          one line per skipped input row: {"row", "source", "reason", "detail"}

Each record is a msgpack map:
  image    bytes   JPEG, RGB, short side <= the manifest's `max_size`
  caption  str     UTF-8, stripped, never empty
  key      str     where the row came from (relative path, tar member, TFDS index)
  label    int     optional: class index into manifest["classes"] (imagefolder, labelled TFDS)
  meta     map     optional: the input row's other columns, str -> str (CSV)

manifest.json holds at least `format`, `num_records`, `rows` (input rows seen), `shards`
(list of {"path", "num_records"}, paths relative to DIR), `skipped` (reason -> count) and
`repaired` (what was converted and kept -> count); `num_records + sum(skipped) == rows`.
"""
import concurrent.futures
import json
import os

import msgpack
import numpy as np

from clip_jax import paths

FORMAT = "clip_jax.ingest/1"
MANIFEST = "manifest.json"
SKIPPED_LOG = "skipped.jsonl"


def encode_record(image, caption, key, label=None, meta=None):
    record = {"image": bytes(image), "caption": str(caption), "key": str(key)}
    if label is not None:
        record["label"] = int(label)
    if meta:
        record["meta"] = {str(k): str(v) for k, v in meta.items()}
    return msgpack.packb(record, use_bin_type=True)


def decode_record(data):
    """bytes -> dict (see the module docstring). Raises ValueError on a malformed record."""
    try:
        record = msgpack.unpackb(data, raw=False)
    except Exception as e:
        raise ValueError(f"malformed record: {type(e).__name__}: {e}") from None
    if not isinstance(record, dict) or not isinstance(record.get("image"), bytes) \
            or not isinstance(record.get("caption"), str):
        raise ValueError("malformed record: needs bytes 'image' and str 'caption'")
    return record


def shard_name(index):
    return f"data-{index:05d}.array_record"


class ShardWriter:
    """Writes encoded records to consecutive ArrayRecord shards of `records_per_shard` each.

    Into a remote `directory`, each shard is written locally and uploaded when it is
    complete (`paths.staged`: the ArrayRecord writer writes local files only)."""

    def __init__(self, directory, records_per_shard):
        if records_per_shard <= 0:
            raise ValueError(f"records_per_shard must be positive, got {records_per_shard}")
        self.directory = directory
        self.records_per_shard = int(records_per_shard)
        self.shards = []          # [{"path", "num_records"}], closed shards and the open one
        self._writer = None
        self._stage = None        # the open shard's paths.staged, entered and left by hand

    def write(self, record_bytes):
        if self._writer is None or self.shards[-1]["num_records"] == self.records_per_shard:
            self._open_next()
        self._writer.write(record_bytes)
        self.shards[-1]["num_records"] += 1

    def _open_next(self):
        from array_record.python.array_record_module import ArrayRecordWriter
        self._close_current()
        name = shard_name(len(self.shards))
        # group_size:1 makes every record its own chunk: cheapest random access.
        self._stage = paths.staged(paths.join(self.directory, name))
        self._writer = ArrayRecordWriter(self._stage.__enter__(), "group_size:1")
        self.shards.append({"path": name, "num_records": 0})

    def _close_current(self):
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            self._stage.__exit__(None, None, None)     # uploads a remote shard

    def close(self):
        self._close_current()
        return list(self.shards)


def write_manifest(directory, manifest):
    """Writes manifest.json atomically (the dataset's completion marker)."""
    paths.write_text(paths.join(directory, MANIFEST),
                     json.dumps({"format": FORMAT, **manifest}, indent=2, sort_keys=True) + "\n")


def read_manifest(directory):
    """manifest.json of an ingested directory; raises ValueError naming the file if unusable."""
    path = paths.join(directory, MANIFEST)
    if not paths.isdir(directory):
        raise ValueError(f"{directory!r} is not a directory")
    if not paths.exists(path):
        raise ValueError(f"{path} does not exist: {directory!r} is not an ingested dataset "
                         "(or its ingest did not finish); create one with "
                         "`python -m clip_jax.ingest FORMAT SOURCE --out DIR`")
    try:
        manifest = json.loads(paths.read_text(path))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: unreadable manifest: {e}") from None
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    for key in ("num_records", "shards"):
        if key not in manifest:
            raise ValueError(f"{path}: missing key {key!r}")
    if sum(s["num_records"] for s in manifest["shards"]) != manifest["num_records"]:
        raise ValueError(f"{path}: shard record counts do not add up to num_records")
    present = set(paths.listdir(directory))
    for shard in manifest["shards"]:
        if shard["path"] not in present:
            raise ValueError(f"{path}: shard {shard['path']!r} is missing from {directory!r}")
    return manifest


def shard_records(path):
    """The number of records of the local ArrayRecord shard `path`; ValueError if it cannot be
    opened (truncated: its index is at the end; corrupt index; not a regular file)."""
    from array_record.python.array_record_module import ArrayRecordReader
    if not os.path.isfile(path):     # a FIFO would block the reader
        raise ValueError("not a regular file")
    reader = ArrayRecordReader(path)
    ok, count = reader.ok(), reader.num_records()
    try:
        reader.close()                # raises the reason when the reader is not ok
    except RuntimeError as e:
        raise ValueError(str(e)) from None
    if not ok:
        raise ValueError("the ArrayRecord reader cannot open it")
    return count


class IngestedSource:
    """Grain random-access source over an ingested directory: record i -> dict (decoded msgpack).

    Picklable (Grain worker processes reopen the shards). Shards in a remote directory are
    copied to this host's cache first (`paths.local_copy`: the ArrayRecord reader opens
    local files only), once, when the source is made.

    Damage: every shard is opened when the source is made, and one that cannot be opened
    (a truncated shard has lost its index, which ArrayRecord keeps at the end) or that holds
    another number of records than the manifest says is a ValueError naming the shard file;
    nothing then reads a dataset with a hole in it. A record that cannot be read or decoded
    in a shard that opens (corrupt bytes mid-file) raises a ValueError naming its shard and
    position, which the training pipeline replaces and counts (`pipeline.HostBatchLoader`).
    """

    def __init__(self, directory):
        self.directory = paths.resolve(directory)
        self.manifest = read_manifest(self.directory)
        if self.manifest["num_records"] == 0:
            raise ValueError(f"{paths.join(self.directory, MANIFEST)}: the dataset has 0 records")
        shards = [s for s in self.manifest["shards"] if s["num_records"] > 0]
        self._names = [paths.join(self.directory, s["path"]) for s in shards]
        self._counts = [int(s["num_records"]) for s in shards]
        self._ends = np.cumsum(self._counts)
        self._paths = [paths.local_copy(name) for name in self._names]
        self._check_shards()
        self._source = None

    def _check_shards(self):
        with concurrent.futures.ThreadPoolExecutor(min(16, len(self._paths))) as pool:
            found = list(pool.map(_try_shard_records, self._paths))
        for name, expected, (count, error) in zip(self._names, self._counts, found):
            if error is not None or count != expected:
                problem = (f"cannot be opened ({error})" if error is not None else
                           f"holds {count} records, {MANIFEST} says {expected}")
                raise ValueError(
                    f"{name}: damaged shard of the ingested dataset {self.directory}: {problem}. "
                    "A truncated or corrupt shard cannot be read: copy it again from where the "
                    "dataset came from, or ingest the data again (python -m clip_jax.ingest ... "
                    f"--out {self.directory} --overwrite)")

    @property
    def _records(self):
        if self._source is None:
            import grain
            # Counts given ("path[0:n]", checked when the source was made): Grain then opens
            # a shard only when a record of it is read.
            self._source = grain.sources.ArrayRecordDataSource(
                [f"{p}[0:{n}]" for p, n in zip(self._paths, self._counts)])
        return self._source

    def __len__(self):
        return int(self.manifest["num_records"])

    def locate(self, index):
        """(shard file, position in it) of record `index`."""
        shard = int(np.searchsorted(self._ends, int(index), side="right"))
        return self._names[shard], int(index) - int(self._ends[shard] - self._counts[shard])

    def record_files(self, indices):
        """The shard files holding the records `indices`, in shard order."""
        return sorted({self.locate(i)[0] for i in indices})

    def __getitem__(self, index):
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"record {index} out of range [0, {len(self)})")
        try:
            return decode_record(self._records[index])
        except Exception as e:   # the reader raises RuntimeError ("Corrupted Riegeli/records file")
            shard, position = self.locate(index)
            raise ValueError(f"{shard}: record {position} (record {index} of the dataset) is "
                             f"unreadable: {type(e).__name__}: {e}") from None

    def __getstate__(self):   # a worker reopens the local shards; it reads nothing remote
        return {k: v for k, v in self.__dict__.items() if k != "_source"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._source = None

    def __repr__(self):
        return f"IngestedSource({self.directory!r}, num_records={len(self)})"


def _try_shard_records(path):
    try:
        return shard_records(path), None
    except ValueError as e:
        return None, e
