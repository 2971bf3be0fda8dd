"""Grain input pipeline -> global, sharded device batches that do not depend on the topology.

Design (exactness first):
  1. A Grain `MapDataset` over record INDICES, globally shuffled with `config.seed`,
     repeated forever with a fresh shuffle each epoch, and batched into GLOBAL index
     batches of `config.batch_size`. This stream depends only on (num_records, seed,
     batch_size): global batch k is the same rows in the same order everywhere.
  2. Each process keeps only the rows of every global index batch that its devices
     hold (`process_rows`: for the usual batch sharding the contiguous slice
     [p*B/P, (p+1)*B/P)), then one `map` loads, decodes and tokenises just those rows.
  3. `to_iter_dataset` (+ `mp_prefetch` when `config.data.workers > 0`; Grain's worker
     slicing keeps the element order, so the output does not depend on the workers).
  4. The host batch becomes a global `jax.Array` with
     `jax.make_array_from_process_local_data`; images travel as uint8 and are
     normalised on device (CLIP mean/std after /255).

Sources: `_SOURCES[config.data.source](config, split)` returns a random-access source
(`len`, `[]`) of dicts with `image` (uint8 HWC) and `caption` (str). A new source is
one function added there.
"""
import grain
import jax
import jax.numpy as jnp
import numpy as np

from clip_jax.data import synthetic

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def normalize_images(images):
    """uint8 [..., 3] -> float32, /255 then CLIP mean/std. Works on numpy and jax arrays."""
    xp = jnp if isinstance(images, jax.Array) else np
    mean = xp.asarray(CLIP_MEAN, xp.float32)
    std = xp.asarray(CLIP_STD, xp.float32)
    return (images.astype(xp.float32) / xp.float32(255.0) - mean) / std


# ----------------------------------------------------------------------------- sources

def _synthetic_source(config, split):
    s = config.data.synthetic
    n = s.num_train if split == "train" else s.num_eval
    return synthetic.SyntheticSource(split="train" if split == "train" else "heldout",
                                     image_size=s.image_size, num_records=n, seed=config.seed)


# config.data.source -> fn(config, split) -> random-access source of {'image', 'caption'}.
_SOURCES = {"synthetic": _synthetic_source}


def make_source(config, split="train"):
    """The random-access source named by `config.data.source`."""
    name = config.data.source
    if name not in _SOURCES:
        raise ValueError(f"config.data.source={name!r} is not supported "
                         f"(available: {', '.join(sorted(_SOURCES))})")
    return _SOURCES[name](config, split)


# ----------------------------------------------------------------------------- rows

def contiguous_rows(global_batch_size, process_index, process_count):
    """Rows [p*B/P, (p+1)*B/P) of a global batch: process p's share under a plain batch sharding."""
    if global_batch_size % process_count:
        raise ValueError(f"config.batch_size={global_batch_size} must be divisible by the "
                         f"number of processes ({process_count})")
    per = global_batch_size // process_count
    return np.arange(process_index * per, (process_index + 1) * per)


def process_rows(sharding, global_batch_size):
    """Sorted rows of a [global_batch_size, ...] array that this process's devices hold.

    This is the local-data layout `jax.make_array_from_process_local_data` expects
    (the process's slices, in increasing order, concatenated).
    """
    if global_batch_size % jax.process_count():
        raise ValueError(f"config.batch_size={global_batch_size} must be divisible by the "
                         f"number of processes ({jax.process_count()})")
    spec = sharding.spec[0] if len(sharding.spec) else None
    axes = () if spec is None else (spec,) if isinstance(spec, str) else tuple(spec)
    shards = int(np.prod([sharding.mesh.shape[a] for a in axes])) if axes else 1
    if global_batch_size % shards:
        raise ValueError(f"config.batch_size={global_batch_size} must be divisible by the "
                         f"{shards} batch shards of the mesh")
    rows = set()
    for index in sharding.addressable_devices_indices_map((global_batch_size,)).values():
        rows.update(range(global_batch_size)[index[0]])
    return np.array(sorted(rows), np.int64)


# ----------------------------------------------------------------------------- datasets

def index_batches(num_records, global_batch_size, seed):
    """MapDataset of int64 [global_batch_size] record indices: shuffled, reshuffled each epoch, endless."""
    return (grain.MapDataset.range(num_records)
            .shuffle(seed=seed)
            .repeat(None)                              # reseeds the shuffle every epoch
            .batch(global_batch_size, drop_remainder=True))


class LoadRows:
    """Global index batch -> this process's host batch (picklable, for Grain workers)."""

    def __init__(self, source, tokenizer, rows):
        self.source, self.tokenizer = source, tokenizer
        self.rows = np.asarray(rows, np.int64)

    def __call__(self, index_batch):
        indices = np.asarray(index_batch)[self.rows]
        examples = [self.source[int(i)] for i in indices]
        return {"images": np.stack([np.asarray(e["image"], np.uint8) for e in examples]),
                "tokens": self.tokenizer([e["caption"] for e in examples]),
                "indices": indices}


def make_host_dataset(config, tokenizer, rows=None):
    """grain.IterDataset of this process's host batches (numpy).

    Each element: images uint8 [R, S, S, 3], tokens int32 [R, ctx], indices int64 [R],
    where R = len(rows) (default: the whole global batch).
    """
    source = make_source(config, "train")
    batch = config.batch_size
    if rows is None:
        rows = np.arange(batch)
    ds = index_batches(len(source), batch, config.seed).map(LoadRows(source, tokenizer, rows))
    prefetch = int(config.data.prefetch)
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=1 if prefetch > 0 else 0,
                                              prefetch_buffer_size=max(prefetch, 1)))
    if config.data.workers > 0:
        _ensure_absl_flags_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=int(config.data.workers), per_worker_buffer_size=max(prefetch, 1)))
    return ds


def _ensure_absl_flags_parsed():
    """Grain's worker processes read absl flags; outside `app.run` (tests, notebooks) they
    are unparsed and Grain would raise. Marks them parsed (defaults) in that case only."""
    from absl import flags
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


class GlobalBatchIterator:
    """Yields {'images': float32 [B,S,S,3], 'tokens': int32 [B,ctx]} global jax.Arrays.

    `grain_iterator` is the underlying Grain iterator (checkpoint it with
    `grain.checkpoint.CheckpointSave/Restore`); `get_state`/`set_state` delegate to it.
    """

    def __init__(self, grain_iterator, sharding, global_batch_size):
        self.grain_iterator = grain_iterator
        self.sharding = sharding
        self.global_batch_size = global_batch_size
        self._normalize = jax.jit(normalize_images, out_shardings=sharding)

    def __iter__(self):
        return self

    def __next__(self):
        host = next(self.grain_iterator)
        b = self.global_batch_size
        images = jax.make_array_from_process_local_data(
            self.sharding, host["images"], (b,) + host["images"].shape[1:])
        tokens = jax.make_array_from_process_local_data(
            self.sharding, host["tokens"], (b,) + host["tokens"].shape[1:])
        return {"images": self._normalize(images), "tokens": tokens}

    def get_state(self):
        return self.grain_iterator.get_state()

    def set_state(self, state):
        self.grain_iterator.set_state(state)

    def close(self):
        close = getattr(self.grain_iterator, "close", None)
        if close is not None:
            close()


def make_train_iterator(config, tokenizer, sharding):
    """Endless iterator of global training batches laid out with `sharding` (batch dimension)."""
    make_source(config, "train")       # fail early, before any worker starts, on a bad source
    rows = process_rows(sharding, config.batch_size)
    it = iter(make_host_dataset(config, tokenizer, rows))
    return GlobalBatchIterator(it, sharding, config.batch_size)


def heldout_batches(config, tokenizer, n):
    """Held-out zero-shot data: (images float32 [n,S,S,3] normalised, {'shape','color': int32 [n]}).

    Always from the synthetic held-out split (combinations never seen in training),
    identical on every process. `tokenizer` is unused (prompts are built at eval time).
    """
    del tokenizer
    ex = synthetic.heldout_examples(n, seed=config.seed, image_size=config.data.synthetic.image_size)
    return normalize_images(ex["image"]), {"shape": ex["shape"], "color": ex["color"]}
