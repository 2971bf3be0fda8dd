"""Local and remote paths, through one layer: `etils.epath`, which Orbax and Grain use too.

The workdir (checkpoints, metrics, TensorBoard, tokenizer, config.json), ingested data,
evaluation data, saved models and converted weights, and the ingest's csv/wds inputs and
output go through here, so each may be `gs://bucket/dir` (or `s3://`, `az://`: the
schemes epath knows; only gs:// is tested) as well as a local path. Local-only by nature:
the image-search index (memory-mapped, appended to), the ingest's folder sources, TFDS
data directories (see below), benchmark and AOT outputs. For gs:// epath uses
`tf.io.gfile` where TensorFlow is installed and `gcsfs` otherwise (the `gcs` extra);
Orbax's arrays go through TensorStore's own GCS driver.

Decisions:
- A local path is made absolute (logs and checkpoints then say where things are); a
  remote one is kept as written.
- A whole-file write is atomic: locally a temporary file renamed over the target; an
  object store replaces an object whole, so the object is written directly.
- Object stores cannot append: see `metrics.MetricWriter` (rewrites, throttled).
- The open-source ArrayRecord reader opens local files only (C++ file descriptors;
  google/array_record#120), so remote shards are copied once into a local cache
  (`local_copy`). A dataset larger than a host's disk is read through a gcsfuse mount of
  the bucket, which is a local path.
"""
import contextlib
import hashlib
import os
import shutil
import tempfile

from etils import epath

CACHE_ENV = "CLIP_JAX_CACHE"   # where remote shards are copied (default: the temp dir)


def is_remote(path) -> bool:
    """True for a URL (`scheme://...`) rather than a path on this machine's file system."""
    return "://" in str(path)


def resolve(path) -> str:
    """`path` as clip_jax names it: local paths absolute, remote ones unchanged."""
    path = os.fspath(path)
    return path if is_remote(path) else os.path.abspath(os.path.expanduser(path))


def path(p) -> epath.Path:
    return epath.Path(resolve(p))


def join(base, *parts) -> str:
    return str(path(base).joinpath(*parts)) if is_remote(base) else os.path.join(resolve(base), *parts)


def dirname(p) -> str:
    p = resolve(p)
    return p.rstrip("/").rsplit("/", 1)[0] if is_remote(p) else os.path.dirname(p)


def exists(p) -> bool:
    return path(p).exists()


def isdir(p) -> bool:
    return path(p).is_dir()


def isfile(p) -> bool:
    p = path(p)
    return p.exists() and not p.is_dir()


def listdir(p) -> list:
    """Names (not paths) of the entries of directory `p`."""
    return sorted(child.name for child in path(p).iterdir())


def makedirs(p):
    path(p).mkdir(parents=True, exist_ok=True)


def read_bytes(p) -> bytes:
    return path(p).read_bytes()


def read_text(p) -> str:
    return path(p).read_text(encoding="utf-8")


@contextlib.contextmanager
def _replaced_whole(local_file):
    """A binary file object whose content replaces the local file `local_file` when the block
    ends without error (a temporary file beside it, renamed over it); else it is removed."""
    directory = os.path.dirname(local_file)
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=os.path.basename(local_file) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
        os.replace(tmp, local_file)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_bytes(p, data: bytes):
    """Writes the whole file atomically (see the module docstring)."""
    if is_remote(p):
        path(p).write_bytes(data)
        return
    with _replaced_whole(resolve(p)) as f:
        f.write(data)


def write_text(p, text: str):
    write_bytes(p, text.encode("utf-8"))


def rename(src, dst):
    """Moves a file or a whole directory. An object store has no directories to move (nor
    parents to check): there each object is copied, then the source objects deleted."""
    if not is_remote(src):
        os.rename(resolve(src), resolve(dst))
        return
    src, dst = path(src), path(dst)
    if not src.is_dir():
        src.copy(dst)
        src.unlink()
        return
    for rel in walk_files(src):
        (src / rel).copy(dst / rel)
    src.rmtree()


def rmtree(p):
    """Removes a directory and everything under it."""
    if is_remote(p):
        path(p).rmtree()
    else:
        shutil.rmtree(resolve(p))


def corrupt_dir(directory, suffix) -> str:
    """Where unusable entries of `directory` are moved: `directory + suffix` beside it, or
    beside its target when `directory` is a symlink, so the move stays on one file system."""
    directory = resolve(directory)
    if not is_remote(directory) and os.path.islink(directory.rstrip("/")):
        return os.path.realpath(directory) + suffix
    return directory.rstrip("/") + suffix


def size(p) -> int:
    return path(p).stat().length if is_remote(p) else os.path.getsize(resolve(p))


def mtime(p) -> float:
    return path(p).stat().mtime if is_remote(p) else os.path.getmtime(resolve(p))


def missing_files(files) -> list:
    """The paths in `files` that are not files. Remote ones are checked by listing each parent
    directory once, not by a request per file."""
    missing, listed = [], {}
    for p in files:
        if not is_remote(p):
            if not os.path.isfile(p):
                missing.append(p)
            continue
        parent, name = dirname(p), str(p).rstrip("/").rsplit("/", 1)[1]
        if parent not in listed:
            listed[parent] = {c.name for c in path(parent).iterdir() if not c.is_dir()} \
                if isdir(parent) else set()
        if name not in listed[parent]:
            missing.append(p)
    return missing


def walk_files(top) -> list:
    """Every file under directory `top`, recursively, as sorted '/'-separated relative paths."""
    if not is_remote(top):
        top = resolve(top)
        return sorted(os.path.relpath(os.path.join(d, f), top).replace(os.sep, "/")
                      for d, _, files in os.walk(top) for f in files)
    root = path(top)
    key = str(root).split("://", 1)[1]
    out = []
    for directory, _, files in root.walk():    # walk names directories without the scheme
        rel = str(directory).split("://", 1)[-1][len(key):].strip("/")
        out += [f"{rel}/{f}" if rel else f for f in files]
    return sorted(out)


@contextlib.contextmanager
def staged(dst):
    """A local file name through which to write `dst`, for writers that write local files
    only (ArrayRecord, torch, safetensors): `dst` itself when it is local; for a remote one
    a temporary file, uploaded when the block ends without error (an upload to an object
    store is atomic) and removed either way."""
    if not is_remote(dst):
        os.makedirs(dirname(dst), exist_ok=True)
        yield resolve(dst)
        return
    with tempfile.TemporaryDirectory(prefix="clip_jax_upload.") as tmp:
        local = os.path.join(tmp, str(dst).rstrip("/").rsplit("/", 1)[1])
        yield local
        epath.Path(local).copy(path(dst), overwrite=True)


def cache_dir() -> str:
    return os.environ.get(CACHE_ENV) or os.path.join(tempfile.gettempdir(), "clip_jax_cache")


def local_copy(p, directory=None) -> str:
    """A local path holding the file `p`: `p` itself if it is local, else a copy made once in
    `directory` (default `cache_dir()`), named after the URL, and reused while its size
    matches the remote object's. The copy is written under a temporary name and renamed,
    so processes that share a host may fetch the same file at once."""
    if not is_remote(p):
        return resolve(p)
    p = str(p)
    directory = directory or cache_dir()
    key = hashlib.sha256(p.encode()).hexdigest()[:16]
    local = os.path.join(directory, f"{key}-{os.path.basename(p)}")
    remote_size = size(p)
    if os.path.exists(local) and os.path.getsize(local) == remote_size:
        return local
    with _replaced_whole(local) as out, path(p).open("rb") as src:
        while chunk := src.read(1 << 24):
            out.write(chunk)
        if out.tell() != remote_size:
            raise OSError(f"{p}: copied {out.tell()} bytes of {remote_size}")
    return local
