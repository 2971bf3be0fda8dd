"""An ingest's rows and the work on each row, shared by its two drivers: the local one
(`ingest.py`, this machine's processes) and the Beam one (`ingest_beam.py`). Here so that
neither driver imports the other's module for them (`ingest` starts `ingest_beam`).
"""
from typing import NamedTuple

from clip_jax.data import images, records

CHUNK_ROWS = 32                 # rows per unit of work sent to a worker


class RowSkipped(Exception):
    """A row that cannot become a record; `reason` is one of the skip reasons of `ingest.py`."""

    def __init__(self, reason, detail=""):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class Row(NamedTuple):
    """One input row as a reader describes it; sent to a worker."""
    source: str                  # where it came from, for skipped.jsonl
    key: str = ""                # the record's key
    caption: str = ""
    path: str | bytes | None = None   # the image file to read ...
    image: bytes | None = None        # ... or its bytes
    label: int | None = None
    meta: dict | None = None
    repairs: tuple = ()          # repairs the reader made (invalid_utf8)
    skip: tuple | None = None    # (reason, detail) when the reader already knows it is bad
    index: int | None = None     # the row's number, set by the driver (`_chunks` locally)
    example: int | None = None   # tfds: the example's index in its split


class Result(NamedTuple):
    """What a worker made of a row: record bytes, or (reason, detail) in `skip`."""
    index: int
    source: str
    record: bytes | None
    skip: tuple | None
    repairs: tuple


class Settings(NamedTuple):
    """What workers need besides the rows."""
    max_size: int
    min_size: int
    max_pixels: int
    quality: int
    fetch: object = None         # rows -> rows with images filled in (tfds), or None
    max_bytes: int = images.DEFAULT_MAX_BYTES   # larger image files are skipped unread


class Prepared(NamedTuple):
    """A checked input and what it adds to the manifest.

    `parts`: picklable zero-argument callables, each yielding the rows of one part of the
    input in order (a wds shard, a range of TFDS examples; the whole listing for csv,
    captions and imagefolder); the input's rows are the parts' rows one part after the
    other. The local ingest reads them in one process, the Beam ingest one part per
    worker (clip_jax/data/ingest_beam.py)."""
    parts: list
    options: dict                # the format options that shaped the records
    extra: dict = {}             # classes / classnames
    fetch: object = None
    total: int | None = None     # number of rows, when known up front

    @property
    def rows(self):
        """Every row of the input, lazily, in order."""
        for part in self.parts:
            yield from part()


def read_file(path, max_bytes):
    """A file a row names (an image, a caption sidecar): `images.read_file`, which skips
    (`BadImage`) what is not a regular file (a FIFO would hang the ingest, /dev/zero fill
    its memory) or is over max_bytes, unread; a missing or unreadable file -> RowSkipped."""
    try:
        return images.read_file(path, max_bytes)
    except FileNotFoundError:
        raise RowSkipped("missing_file", "no such file") from None
    except OSError as e:
        raise RowSkipped("unreadable_file", f"{type(e).__name__}: {e.strerror or e}") from None


def process_row(row, settings):
    """A row -> Result: the encoded record, or why it was skipped."""
    if row.skip:
        return Result(row.index, row.source, None, row.skip, ())
    try:
        caption = row.caption.strip()
        if not caption:
            raise RowSkipped("empty_caption", repr(row.caption[:40]))
        data = row.image if row.path is None else read_file(row.path, settings.max_bytes)
        if len(data) > settings.max_bytes:    # a TFDS image (wds skips its members unread)
            raise images.BadImage("file_too_large",
                                  f"{len(data)} bytes > max_bytes={settings.max_bytes}")
        img, conversion = images.load_for_storage(data, settings.max_size, settings.min_size,
                                                  settings.max_pixels)
        image = images.encode_jpeg(img, settings.quality)
    except (RowSkipped, images.BadImage) as e:
        return Result(row.index, row.source, None, (e.reason, e.detail), ())
    except Exception as e:   # noqa: BLE001   one bad row never stops an ingest (or a worker)
        return Result(row.index, row.source, None, ("unexpected_error", f"{type(e).__name__}: {e}"), ())
    record = records.encode_record(image, caption, row.key, row.label, row.meta)
    return Result(row.index, row.source, record, None,
                  row.repairs + ((conversion,) if conversion else ()))


def process_chunk(rows, settings):
    if settings.fetch is not None:
        rows = settings.fetch(rows)
    return [process_row(row, settings) for row in rows]
