"""Image search: an on-disk index of CLIP image embeddings, queried by text or by image.

    python -m clip_jax.apps.search index --checkpoint runs/smoke --images photos/ --out photos.index
    python -m clip_jax.apps.search query photos.index "a red circle" -k 5
    python -m clip_jax.apps.search query photos.index --image photos/cat.jpg --json

An INDEX directory holds three files:

  index.json      {"format": "clip_jax.search/1", "checkpoint": <absolute path given at
                  creation>, "source": <the checkpoint state directory it resolved to>,
                  "dim": d, "count": n, "dtype": "float32"}
  embeddings.f32  raw little-endian float32 rows of d values, L2-normalised, in add order;
                  read memory-mapped, so an index larger than memory can be searched
  paths.txt       one absolute image path per line, row i naming embedding i

Only the first `count` rows and lines are the index. An add appends rows and lines (and
fsyncs them) before index.json is atomically replaced with the new count, so a crash
mid-add leaves extra rows that are ignored on open and cut off by the next add.

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

from clip_jax import inference, paths as paths_lib
from clip_jax.checkpoint import CheckpointError
from clip_jax.data.images import IMAGE_EXTENSIONS, BadImage
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


class Index:
    """An embedding index directory (layout in the module docstring)."""

    def __init__(self, directory, meta, paths):
        self.directory, self.meta, self.paths = directory, meta, paths
        self._embeddings = None

    @property
    def count(self):
        return int(self.meta["count"])

    @property
    def dim(self):
        return int(self.meta["dim"])

    def _file(self, name):
        return os.path.join(self.directory, name)

    @classmethod
    def create(cls, directory, checkpoint, dim, source=""):
        directory = os.path.abspath(directory)
        if os.path.exists(os.path.join(directory, "index.json")):
            raise SearchError(f"{directory} already holds an index")
        others = set(os.listdir(directory)) if os.path.isdir(directory) else set()
        others -= {"embeddings.f32", "paths.txt", "index.json.tmp"}   # a crashed create's
        if others:
            raise SearchError(f"{directory} is not empty and holds no index ({sorted(others)[0]}, ...)")
        os.makedirs(directory, exist_ok=True)
        for name in ("embeddings.f32", "paths.txt"):
            open(os.path.join(directory, name), "wb").close()
        index = cls(directory, {"format": FORMAT, "checkpoint": paths_lib.resolve(checkpoint),
                                "source": source, "dim": int(dim), "count": 0,
                                "dtype": "float32"}, [])
        index._write_meta()
        return index

    @classmethod
    def open(cls, directory):
        directory = os.path.abspath(directory)
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
        with open(os.path.join(directory, "paths.txt"), "rb") as f:
            lines = f.read().split(b"\n")[:count]
        rows = os.path.getsize(os.path.join(directory, "embeddings.f32")) // (4 * dim)
        if len(lines) < count or rows < count or (count and lines[-1] == b""):
            raise SearchError(f"{directory}: index.json counts {count} entries but paths.txt "
                              f"or embeddings.f32 holds fewer: the index is damaged")
        return cls(directory, meta, [os.fsdecode(line) for line in lines])

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
        path_bytes = sum(len(os.fsencode(p)) + 1 for p in self.paths)
        _fsync_append(self._file("embeddings.f32"), embeddings.astype("<f4").tobytes(),
                      self.count * self.dim * 4)
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
    try:
        with open(path, "rb") as f:
            return model.preprocess(f.read()), None
    except OSError as e:
        return None, f"unreadable ({e.strerror or e})"
    except BadImage as e:
        return None, e.reason


def build_index(model, image_dir, out, batch_size=256, checkpoint=None, workers=None, progress=True):
    """Embeds the images under `image_dir` that INDEX `out` lacks (creating it) and appends
    them, one batch at a time (a crash keeps the finished batches). `checkpoint`: the path
    recorded in a new index, default `model.source`. Returns {added, skipped, total}."""
    from tqdm import tqdm
    if not os.path.isdir(image_dir):
        raise SearchError(f"--images {image_dir}: no such directory")
    checkpoint = paths_lib.resolve(checkpoint or model.source)
    if os.path.exists(os.path.join(out, "index.json")):
        index = Index.open(out)
        if index.meta["checkpoint"] != checkpoint:
            raise SearchError(f"{index.directory} was built with --checkpoint {index.meta['checkpoint']}, "
                              f"not {checkpoint}: pass that checkpoint, or --out a new index")
        if index.meta.get("source") and index.meta["source"] != model.source:
            raise SearchError(f"{checkpoint} now resolves to {model.source}, but {index.directory} "
                              f"holds embeddings of {index.meta['source']}: build a new index")
    else:
        index = Index.create(out, checkpoint, model.config.model.embed_dim, source=model.source)
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
    try:
        if args.command == "index":
            if args.batch_size < 1:
                raise SearchError("--batch-size must be at least 1")
            if not os.path.isdir(args.images):   # these checks come before the slow load
                raise SearchError(f"--images {args.images}: no such directory")
            if os.path.exists(os.path.join(args.out, "index.json")):
                recorded = Index.open(args.out).meta["checkpoint"]
                if recorded != paths_lib.resolve(args.checkpoint):
                    raise SearchError(f"--out {args.out} was built with --checkpoint {recorded}, not "
                                      f"{paths_lib.resolve(args.checkpoint)}: pass that, or a new --out")
            model = _load_model(args.checkpoint, batch_size=args.batch_size)
            stats = build_index(model, args.images, args.out, args.batch_size, checkpoint=args.checkpoint)
            skipped = ", ".join(f"{n} {r}" for r, n in sorted(stats["skipped"].items())) or "none"
            print(f"added {stats['added']} images (skipped: {skipped}); "
                  f"{os.path.abspath(args.out)} holds {stats['total']}")
            return
        if (args.text is None) == (args.image is None):
            raise SearchError("give either TEXT or --image PATH (one of them)")
        if args.k < 1:
            raise SearchError("-k must be at least 1")
        index = Index.open(args.index)
        model = _load_model(args.checkpoint or index.meta["checkpoint"],
                            "--checkpoint" if args.checkpoint else "the index's checkpoint")
        if index.meta.get("source") and model.source != index.meta["source"]:
            print(f"warning: the index holds embeddings of {index.meta['source']}; the query is "
                  f"embedded with {model.source}", file=sys.stderr)
        results = query(index, model, args.text, args.image and os.path.abspath(args.image), args.k)
    except (SearchError, inference.NonFiniteEmbeddings) as e:   # nothing non-finite is indexed
        sys.exit(f"error: {e}")
    for rank, (path, score) in enumerate(results, 1):
        print(f"{rank:3d}  {score:.4f}  {path}")
    if args.json:
        print(json.dumps({"query": args.text if args.image is None else os.path.abspath(args.image),
                          "by": "text" if args.image is None else "image",
                          "results": [{"path": p, "score": s} for p, s in results]}))


if __name__ == "__main__":
    main()
