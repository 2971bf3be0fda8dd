"""Image search: an on-disk index of CLIP image embeddings, queried by text or by image.

    python -m clip_jax.apps.search index --checkpoint runs/smoke --images photos/ --out photos.index
    python -m clip_jax.apps.search query photos.index "a red circle" -k 5
    python -m clip_jax.apps.search query photos.index --image photos/cat.jpg --json

An INDEX directory holds four files:

  index.json      {"format": "clip_jax.search/1", "checkpoint": <absolute path given at
                  creation>, "source": <the checkpoint state directory it resolved to>,
                  "dim": d, "count": n, "dtype": "float32"}
  embeddings.f32  raw little-endian float32 rows of d values, L2-normalised, in add order;
                  read memory-mapped, so an index larger than memory can be searched
  paths.txt       one absolute image path per line, row i naming embedding i
  lock            the writers' lock (below): the holder's pid, host and start while one holds it

Only the first `count` rows and lines are the index. An add appends rows and lines (and
fsyncs them) before index.json is atomically replaced with the new count, so a crash
mid-add leaves extra rows that are ignored on open and cut off by the next add.

One writer at a time: `index` (and `Index.create`, `Index.open(write=True)`) holds INDEX/lock
(`clip_jax.lock.DirectoryLock`, as a training run holds its workdir), taken before the model
is loaded; a second writer stops at once with an error naming the holder (pid, host, since
when), recorded in the file. The OS drops the lock when its process ends however it ends,
so a killed writer never leaves it stuck: the next one takes it over and says so. The index
is local-only (memory-mapped and appended to). Queries take no lock: a writer only appends
past `count` before replacing index.json.

A damaged tail (paths.txt holding fewer complete lines than `count`, its last one cut short,
or embeddings.f32 fewer rows, as a truncated copy or a full disk leave) is never extended:
opening for writing cuts the index to the entries it holds whole (a path line with its
newline and a full row), rewrites the count and says how many entries it dropped (their
images are embedded again by that run); a query searches those entries and warns.

`index` walks DIR recursively in sorted order and embeds only the files whose absolute
path is not in the index yet: re-running it after adding images embeds just the new ones
(files deleted from DIR stay in the index). Unreadable or broken images are skipped,
counted by reason (`clip_jax.data.images.BadImage`), named in a warning each and retried
on the next run. An index is tied to one model: adding with another checkpoint, or with a
workdir that has since saved a newer checkpoint, is refused, since cosine scores of
embeddings from different weights are not comparable.
"""
import argparse
import concurrent.futures
import json
import os
import sys

import numpy as np

from clip_jax import cli, inference, lock as lock_lib, paths as paths_lib
from clip_jax.checkpoint import CheckpointError
from clip_jax.data.images import IMAGE_EXTENSIONS, BadImage, read_file
from clip_jax.models.clip import l2_normalize

FORMAT = "clip_jax.search/1"
BLOCK_ROWS = 65536   # rows scored at once: bounds search memory to BLOCK_ROWS x queries floats


class SearchError(ValueError):
    """A problem with an index or the inputs to it; the CLI prints it without a traceback."""


def _fsync_append(path, data, keep_bytes):
    """Cuts `path` to `keep_bytes` (dropping a crashed add's tail), appends `data`, fsyncs."""
    with open(path, "r+b" if os.path.exists(path) else "w+b") as f:
        f.truncate(keep_bytes)
        f.seek(keep_bytes)
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


INDEX_FILES = {"embeddings.f32", "paths.txt", "index.json.tmp", "lock"}   # besides index.json


def _local(directory):
    """`directory` made absolute; an index is memory-mapped and appended to, so local only."""
    if paths_lib.is_remote(directory):
        raise SearchError(f"{directory}: an index must be a local directory (it is memory-mapped)")
    return os.path.abspath(directory)


def _check_index_dir(directory):
    """Refuses a directory that holds neither an index nor only an index's files (a crashed
    create's), so --out pointed at the wrong folder writes nothing there."""
    if os.path.isdir(directory) and not os.path.exists(os.path.join(directory, "index.json")):
        others = set(os.listdir(directory)) - INDEX_FILES
        if others:
            raise SearchError(f"{directory} is not empty and holds no index ({sorted(others)[0]}, ...)")


def lock_index(directory):
    """Takes INDEX `directory`'s writer lock (creating the directory), for `Index.create` and
    `Index.open(write=True)`; returns the held `lock.DirectoryLock`. Raises SearchError
    naming the holder if another process writes the index; takes over (with a warning) the
    lock of one killed."""
    directory = _local(directory)
    _check_index_dir(directory)
    held = lock_lib.DirectoryLock(directory)
    try:
        stale = held.acquire()
    except lock_lib.LockHeld as e:
        raise SearchError(f"{directory} is being written by another process "
                          f"({lock_lib.describe(e.holder)}): wait for it to finish") from None
    except OSError as e:
        raise SearchError(f"{directory}: cannot lock the index: {e.strerror or e}") from None
    if stale:
        print(f"warning: {directory}: {stale}", file=sys.stderr)
    return held


class Index:
    """An embedding index directory (layout in the module docstring). Opened for writing
    (`create`, `open(write=True)`) it holds the index's lock until `close()` (or `with`)."""

    def __init__(self, directory, meta, paths, lock=None):
        self.directory, self.meta, self.paths = directory, meta, paths
        self._embeddings = None
        self._lock = lock
        self.damage = None   # what a read-only open left out of a damaged tail

    def close(self):
        """Releases the writer's lock (a read-only index holds nothing)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def count(self):
        return int(self.meta["count"])

    @property
    def dim(self):
        return int(self.meta["dim"])

    def _file(self, name):
        return os.path.join(self.directory, name)

    @classmethod
    def create(cls, directory, checkpoint, dim, source="", lock=None):
        """A new empty index, open for writing; `lock`: the directory's lock if already taken."""
        directory = _local(directory)
        if os.path.exists(os.path.join(directory, "index.json")):
            raise SearchError(f"{directory} already holds an index")
        lock = lock or lock_index(directory)
        try:
            if os.path.exists(os.path.join(directory, "index.json")):   # made before we locked
                raise SearchError(f"{directory} already holds an index")
            _check_index_dir(directory)
            for name in ("embeddings.f32", "paths.txt"):
                open(os.path.join(directory, name), "wb").close()
            index = cls(directory, {"format": FORMAT, "checkpoint": paths_lib.resolve(checkpoint),
                                    "source": source, "dim": int(dim), "count": 0,
                                    "dtype": "float32"}, [], lock)
            index._write_meta()
        except BaseException:
            lock.release()
            raise
        return index

    @classmethod
    def open(cls, directory, write=False, lock=None):
        """The index in `directory`. A damaged tail (module docstring) is cut off: read-only,
        in memory only, described in `.damage`; with `write` (or a `lock` already taken) on
        disk, under the lock, with a warning on stderr."""
        directory = _local(directory)
        if write and lock is None:
            if not os.path.exists(os.path.join(directory, "index.json")):   # lock_index would create it
                raise SearchError(f"{directory}: no index here (no index.json)")
            lock = lock_index(directory)
        try:
            return cls._open(directory, lock)
        except BaseException:
            if lock is not None:
                lock.release()
            raise

    @classmethod
    def _open(cls, directory, lock):
        try:
            with open(os.path.join(directory, "index.json")) as f:
                meta = json.load(f)
        except FileNotFoundError:
            raise SearchError(f"{directory}: no index here (no index.json)") from None
        except (OSError, ValueError) as e:
            raise SearchError(f"{directory}/index.json is unreadable: {e}") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("dtype") != "float32":
            raise SearchError(f"{directory}/index.json is not a {FORMAT} float32 index")
        count, dim = int(meta["count"]), int(meta["dim"])
        try:
            with open(os.path.join(directory, "paths.txt"), "rb") as f:
                lines = f.read().split(b"\n")[:-1][:count]   # whole lines only: [-1] lacks its newline
            rows = os.path.getsize(os.path.join(directory, "embeddings.f32")) // (4 * dim)
        except OSError as e:
            raise SearchError(f"{directory}: {e.strerror or e} ({e.filename})") from None
        whole = min(len(lines), rows, count)
        index = cls(directory, meta, [os.fsdecode(line) for line in lines[:whole]], lock)
        if whole < count:
            index.meta = {**meta, "count": whole}
            damage = (f"{directory} is damaged: index.json counts {count} entries, paths.txt holds "
                      f"{len(lines)} whole lines and embeddings.f32 {rows} whole rows")
            dropped = f"{count - whole} entr{'y' if count - whole == 1 else 'ies'}"
            if lock is None:
                index.damage = (f"{damage}; searching the first {whole} (the next `index` run into "
                                f"it drops the last {dropped})")
            else:
                index._write_meta()   # first: files longer than count are the normal crash tail
                index._cut_tail()
                print(f"warning: {damage}: dropped the last {dropped} (path and vector); their "
                      f"images are embedded again", file=sys.stderr)
        return index

    def _sizes(self):
        """Bytes of embeddings.f32 and of paths.txt that hold exactly the `count` entries."""
        return self.count * self.dim * 4, sum(len(os.fsencode(p)) + 1 for p in self.paths)

    def _cut_tail(self):
        """Cuts the files to `count` entries, dropping whatever a crashed add or damage left."""
        for name, size in zip(("embeddings.f32", "paths.txt"), self._sizes()):
            with open(self._file(name), "r+b") as f:
                f.truncate(size)
                os.fsync(f.fileno())

    def _write_meta(self):
        tmp = self._file("index.json.tmp")
        with open(tmp, "w") as f:
            json.dump(self.meta, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._file("index.json"))

    @property
    def embeddings(self):
        """float32 [count, dim], memory-mapped read-only."""
        if self._embeddings is None:
            if self.count == 0:   # np.memmap cannot map zero bytes
                return np.zeros((0, self.dim), np.float32)
            self._embeddings = np.memmap(self._file("embeddings.f32"), np.float32, "r",
                                         shape=(self.count, self.dim))
        return self._embeddings

    def add(self, paths, embeddings):
        """Appends rows (L2-normalised here) for `paths` (made absolute)."""
        paths = [os.path.abspath(p) for p in paths]
        embeddings = l2_normalize(embeddings)
        if embeddings.ndim != 2 or embeddings.shape != (len(paths), self.dim):
            raise SearchError(f"expected embeddings [{len(paths)}, {self.dim}], got {embeddings.shape}")
        if any("\n" in p for p in paths):
            raise SearchError("image paths containing a newline cannot be indexed")
        if not paths:
            return
        if self._lock is None:
            raise SearchError(f"{self.directory} was opened read-only: Index.open(..., write=True) to add")
        row_bytes, path_bytes = self._sizes()
        _fsync_append(self._file("embeddings.f32"), embeddings.astype("<f4").tobytes(), row_bytes)
        _fsync_append(self._file("paths.txt"), b"".join(os.fsencode(p) + b"\n" for p in paths),
                      path_bytes)
        self.meta["count"] = self.count + len(paths)
        self._write_meta()
        self.paths = self.paths + paths
        self._embeddings = None

    def search(self, queries, k):
        """Cosine top-k of each query row: (scores float32 [q, k'], indices int64 [q, k']),
        k' = min(k, count), best first; equal scores rank the lower index first."""
        queries = l2_normalize(np.atleast_2d(queries))
        if queries.shape[1] != self.dim:
            raise SearchError(f"query vectors have {queries.shape[1]} dimensions, the index {self.dim}")
        k = max(0, min(int(k), self.count))
        best_s = [np.zeros(0, np.float32) for _ in queries]
        best_i = [np.zeros(0, np.int64) for _ in queries]
        data = self.embeddings
        for start in range(0, self.count, BLOCK_ROWS):
            scores = queries @ np.asarray(data[start:start + BLOCK_ROWS]).T   # [q, block]
            for q, s in enumerate(scores):
                if len(s) > k:
                    # Every row scoring at least the k-th best, ties at the boundary included,
                    # so that the final sort can prefer lower indices among them.
                    kth = s[np.argpartition(s, len(s) - k)[len(s) - k]]
                    keep = np.flatnonzero(s >= kth)
                else:
                    keep = np.arange(len(s))
                cand_s = np.concatenate([best_s[q], s[keep]])
                cand_i = np.concatenate([best_i[q], keep + start])
                order = np.lexsort((cand_i, -cand_s))[:k]
                best_s[q], best_i[q] = cand_s[order], cand_i[order]
        return (np.array(best_s, np.float32).reshape(len(queries), k),
                np.array(best_i, np.int64).reshape(len(queries), k))


# ---------------------------------------------------------------------- building

def list_images(image_dir):
    """Absolute paths of the image files under `image_dir`, in sorted walk order."""
    found = []
    for root, dirs, files in os.walk(os.path.abspath(image_dir)):
        dirs.sort()
        found += [os.path.join(root, f) for f in sorted(files)
                  if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS]
    return found


def _load(model, path):
    """(preprocessed image, None) or (None, skip reason)."""
    try:     # regular files of bounded size only: a FIFO or /dev/zero in the folder is skipped
        return model.preprocess(read_file(path)), None
    except OSError as e:
        return None, f"unreadable ({e.strerror or e})"
    except BadImage as e:
        return None, e.reason


def build_index(model, image_dir, out, batch_size=256, checkpoint=None, workers=None, progress=True,
                lock=None):
    """Embeds the images under `image_dir` that INDEX `out` lacks (creating it) and appends
    them, one batch at a time (a crash keeps the finished batches). `checkpoint`: the path
    recorded in a new index, default `model.source`. `lock`: `out`'s lock if the caller took
    it (`lock_index`), else taken here; released on return. Returns {added, skipped, total}."""
    if not os.path.isdir(image_dir):
        raise SearchError(f"--images {image_dir}: no such directory")
    lock = lock or lock_index(out)
    try:
        return _build_index(model, image_dir, out, batch_size, checkpoint, workers, progress, lock)
    finally:
        lock.release()


def _build_index(model, image_dir, out, batch_size, checkpoint, workers, progress, lock):
    from tqdm import tqdm
    checkpoint = paths_lib.resolve(checkpoint or model.source)
    if os.path.exists(os.path.join(out, "index.json")):
        index = Index.open(out, lock=lock)
        if index.meta["checkpoint"] != checkpoint:
            raise SearchError(f"{index.directory} was built with --checkpoint {index.meta['checkpoint']}, "
                              f"not {checkpoint}: pass that checkpoint, or --out a new index")
        if index.meta.get("source") and index.meta["source"] != model.source:
            raise SearchError(f"{checkpoint} now resolves to {model.source}, but {index.directory} "
                              f"holds embeddings of {index.meta['source']}: build a new index")
    else:
        index = Index.create(out, checkpoint, model.config.model.embed_dim, source=model.source, lock=lock)
    known = set(index.paths)
    todo = [p for p in list_images(image_dir) if p not in known]
    skipped, warnings, added = {}, [], 0
    for path in [p for p in todo if "\n" in p]:   # paths.txt holds one path per line
        skipped["newline_in_path"] = skipped.get("newline_in_path", 0) + 1
        warnings.append(f"warning: skipped {path!r}: its path contains a newline")
        todo.remove(path)
    workers = workers or min(8, os.cpu_count() or 1)
    with concurrent.futures.ThreadPoolExecutor(workers) as pool, \
            tqdm(total=len(todo), unit="img", desc="index", disable=not progress) as bar:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            good, arrays = [], []
            for path, (array, reason) in zip(chunk, pool.map(lambda p: _load(model, p), chunk)):
                if reason is None:
                    good.append(path)
                    arrays.append(array)
                else:
                    key = reason.split(" (")[0]
                    skipped[key] = skipped.get(key, 0) + 1
                    warnings.append(f"warning: skipped {path}: {reason}")
            if good:
                index.add(good, model.encode_image(np.stack(arrays), normalize=True))
                added += len(good)
            bar.update(len(chunk))
    for line in warnings:
        print(line, file=sys.stderr)
    return {"added": added, "skipped": skipped, "total": index.count}


# ---------------------------------------------------------------------- querying

def embed_text(model, text):
    return model.encode_text(model.tokenize([text]), normalize=True)


def embed_image(model, path):
    array, reason = _load(model, path)
    if reason is not None:
        raise SearchError(f"--image {path}: {reason}")
    return model.encode_image(array[None], normalize=True)


def query(index, model, text=None, image=None, k=5):
    """[(path, score)] of the `k` indexed images closest to `text` or to the image file `image`."""
    vector = embed_text(model, text) if image is None else embed_image(model, image)
    scores, indices = index.search(vector, k)
    return [(index.paths[i], float(s)) for s, i in zip(scores[0], indices[0])]


# ---------------------------------------------------------------------- command line

def _parser():
    parser = argparse.ArgumentParser(prog="python -m clip_jax.apps.search", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("index", help="embed a folder of images into an index (new images only)")
    p.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="run workdir, checkpoint or converted weights to embed with (clip_jax.load)")
    p.add_argument("--images", required=True, metavar="DIR", help="folder of images, searched recursively")
    p.add_argument("--out", required=True, metavar="INDEX", help="index directory (created, or added to)")
    p.add_argument("--batch-size", type=int, default=256, metavar="N",
                   help="images decoded and embedded at once (default: %(default)s)")
    p = sub.add_parser("query", help="the indexed images closest to a text or an image")
    p.add_argument("index", metavar="INDEX", help="index directory written by `index`")
    p.add_argument("text", nargs="?", metavar="TEXT", help="text to search for")
    p.add_argument("--image", metavar="PATH", help="search by this image file instead of TEXT")
    p.add_argument("-k", type=int, default=5, help="number of results (default: %(default)s)")
    p.add_argument("--checkpoint", metavar="PATH",
                   help="model to embed the query with (default: the one recorded in the index)")
    p.add_argument("--json", action="store_true",
                   help='also print {"query", "by", "results": [{"path", "score"}]} as the last line')
    return parser


def _load_model(path, what="--checkpoint", **kwargs):
    try:
        return inference.load(path, **kwargs)
    except (ValueError, CheckpointError) as e:
        message = str(e).removeprefix(os.path.abspath(path) + ": ")
        raise SearchError(f"{what} {path}: {message}") from None


def main(argv=None):
    args = _parser().parse_args(argv)
    from absl import logging
    logging.set_verbosity(logging.ERROR)   # orbax's "Metadata file does not exist" warning
    with cli.stop_on(SearchError, inference.NonFiniteEmbeddings):   # nothing non-finite is indexed
        if args.command == "index":
            if args.batch_size < 1:
                raise SearchError("--batch-size must be at least 1")
            if not os.path.isdir(args.images):   # these checks come before the slow load
                raise SearchError(f"--images {args.images}: no such directory")
            lock = lock_index(args.out)   # a second writer stops here, at once
            try:
                if os.path.exists(os.path.join(args.out, "index.json")):
                    recorded = Index.open(args.out).meta["checkpoint"]
                    if recorded != paths_lib.resolve(args.checkpoint):
                        raise SearchError(f"--out {args.out} was built with --checkpoint {recorded}, not "
                                          f"{paths_lib.resolve(args.checkpoint)}: pass that, or a new --out")
                model = _load_model(args.checkpoint, batch_size=args.batch_size)
                stats = build_index(model, args.images, args.out, args.batch_size,
                                    checkpoint=args.checkpoint, lock=lock)
            finally:
                lock.release()   # an error is no killed writer: the next one need not warn
            skipped = ", ".join(f"{n} {r}" for r, n in sorted(stats["skipped"].items())) or "none"
            print(f"added {stats['added']} images (skipped: {skipped}); "
                  f"{os.path.abspath(args.out)} holds {stats['total']}")
            return
        if (args.text is None) == (args.image is None):
            raise SearchError("give either TEXT or --image PATH (one of them)")
        if args.k < 1:
            raise SearchError("-k must be at least 1")
        index = Index.open(args.index)
        if index.damage:
            print(f"warning: {index.damage}", file=sys.stderr)
        model = _load_model(args.checkpoint or index.meta["checkpoint"],
                            "--checkpoint" if args.checkpoint else "the index's checkpoint")
        if index.meta.get("source") and model.source != index.meta["source"]:
            print(f"warning: the index holds embeddings of {index.meta['source']}; the query is "
                  f"embedded with {model.source}", file=sys.stderr)
        results = query(index, model, args.text, args.image and os.path.abspath(args.image), args.k)
    for rank, (path, score) in enumerate(results, 1):
        print(f"{rank:3d}  {score:.4f}  {path}")
    if args.json:
        print(json.dumps({"query": args.text if args.image is None else os.path.abspath(args.image),
                          "by": "text" if args.image is None else "image",
                          "results": [{"path": p, "score": s} for p, s in results]}))


if __name__ == "__main__":
    main()
