"""Grain input pipeline -> global, sharded device batches that do not depend on the topology.

Design (exactness first):
  1. A Grain `MapDataset` over record INDICES, globally shuffled with `config.seed`,
     repeated forever with a fresh shuffle each epoch, and batched into GLOBAL index
     batches of `config.batch_size` (`index_batches`; for a weighted mixture, one
     shuffled stream per source, interleaved by `MapDataset.mix`). Global batch k is a
     pure function of (sources, seed, batch_size, k).
  2. Each process keeps only the rows of every global index batch that its devices
     hold (`process_rows`: for the usual batch sharding the contiguous slice
     [p*B/P, (p+1)*B/P)), then one map loads, decodes, crops and tokenises just those
     rows (`HostBatchLoader`). The crop's randomness is seeded by (seed, k, global row), so it
     too is independent of who computes it.
  3. A record that fails to read or decode is replaced by the next record of the source
     (index + 1, wrapping; deterministic), its row is flagged in `replaced`, and the
     iterator counts the flags (`data/replaced_records` in the training metrics).
     MAX_CONSECUTIVE_BAD_RECORDS in a row raise `BrokenDataset`, naming the records and
     (`record_files`) the shard files.
  4. `to_iter_dataset` (+ `mp_prefetch` when `config.data.workers > 0`; Grain's worker
     slicing keeps the element order, so the output does not depend on the workers).
  5. The host batch becomes a global `jax.Array` with
     `jax.make_array_from_process_local_data`; images travel as uint8 pixel rows
     (`pixel_rows`) and are normalised on device (CLIP mean/std after /255), one
     micro-batch at a time inside the train step.

Iterator state: because global batch k depends only on k, the data position is the
number of batches consumed. `GlobalBatchIterator.get_state()` is a small dict with that
position (and what it was computed over); `set_state` rebuilds the Grain pipeline at that
position. So a run can resume with another number of processes, devices or workers at
the same data position, which per-process Grain iterator states cannot do.

Sources are in `sources.py`; image decoding and crops in `images.py`.
"""
import grain
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from clip_jax.data import images as images_lib
from clip_jax.data import sources

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# A training batch, as the pipeline yields it and the train step takes it: images uint8
# pixel rows [B, S*S*3] (`pixel_rows`; normalised inside the step), tokens int32
# [B, context_length]. The step also takes float32 [B, S, S, 3] images, already normalised.
BATCH_KEYS = ("images", "tokens")


def training_batch(images, tokens):
    """{'images': images, 'tokens': tokens}: the one place the batch layout is written."""
    return dict(zip(BATCH_KEYS, (images, tokens)))


def pixel_rows(images):
    """uint8 [n, S, S, 3] -> [n, S*S*3], one row of pixels per image: how images enter the
    train step (which reshapes one micro-batch at a time back to [m, S, S, 3]). On a TPU a
    [n, S, S, 3] uint8 argument is laid out batch-minor (three channels minor would pad to a
    128-wide tile), and the micro-batch loop then copied the whole batch into a batch-major
    layout: 2.47 GB more per v5e chip for ViT-B/16 at 4M. Rows are sliced in place. A view
    of the host array: no copy."""
    return images.reshape(images.shape[0], -1)


# A run of this many consecutive broken records is not bad luck but a broken dataset.
MAX_CONSECUTIVE_BAD_RECORDS = 100
# Tag mixed into the crop seeds, so they never coincide with other seeded streams.
_CROP_TAG = 0xC10


def normalize_images(images):
    """uint8 [..., 3] -> float32, /255 then CLIP mean/std. Works on numpy and jax arrays."""
    xp = jnp if isinstance(images, jax.Array) else np
    mean = xp.asarray(CLIP_MEAN, xp.float32)
    std = xp.asarray(CLIP_STD, xp.float32)
    return (images.astype(xp.float32) / xp.float32(255.0) - mean) / std


class BrokenDataset(RuntimeError):
    """MAX_CONSECUTIVE_BAD_RECORDS records in a row could not be loaded: the message names
    the record range and, for ingested data, the shard files."""


# ----------------------------------------------------------------------------- rows


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

def index_batches(num_records, global_batch_size, seed, weights=None, part_sizes=None):
    """MapDataset of int64 [global_batch_size] record indices: shuffled, reshuffled each epoch, endless.

    With `weights` (one per part of a `ConcatSource` of `part_sizes`), each part is its own
    shuffled endless stream of its index range, and the streams are interleaved by
    Grain's deterministic weighted `mix`.
    """
    if weights is None:
        ds = grain.MapDataset.range(num_records).shuffle(seed=seed).repeat(None)
    else:
        offsets = np.concatenate([[0], np.cumsum(part_sizes)]).astype(np.int64)
        parts = [grain.MapDataset.range(int(offsets[j]), int(offsets[j + 1]))
                 .shuffle(seed=int(np.random.SeedSequence([seed, j]).generate_state(1)[0]))
                 .repeat(None) for j in range(len(part_sizes))]
        ds = grain.MapDataset.mix(parts, weights=[float(w) for w in weights])
    return ds.batch(global_batch_size, drop_remainder=True)   # repeat(None) reseeds each epoch


class HostBatchLoader:
    """(k, global index batch k) -> this process's host batch (picklable, for Grain workers).

    Each element: images uint8 [R, S, S, 3], tokens int32 [R, ctx], indices int64 [R]
    (the records actually used), replaced int32 [R] (1 where a broken record was replaced).
    """

    def __init__(self, source, tokenizer, rows, image_size, seed, crop_scale, crop_ratio):
        self.source, self.tokenizer = source, tokenizer
        self.rows = np.asarray(rows, np.int64)
        self.image_size, self.seed = int(image_size), int(seed)
        self.crop_scale, self.crop_ratio = tuple(crop_scale), tuple(crop_ratio)

    def load(self, index, rng):
        """Record `index` -> (uint8 [S, S, 3], caption); raises on a broken record."""
        example = self.source[index]
        caption = example["caption"]
        if not isinstance(caption, str) or not caption.strip():
            raise ValueError(f"record {index}: empty caption")
        if getattr(self.source, "presized", False):
            image = np.asarray(example["image"], np.uint8)
        else:
            image = images_lib.random_resized_crop(example["image"], self.image_size, rng,
                                                   self.crop_scale, self.crop_ratio)
        if image.shape != (self.image_size, self.image_size, 3):
            raise ValueError(f"record {index}: image of shape {image.shape}")
        return image, caption

    def load_or_replace(self, index, rng_seed):
        """Loads `index`, or the first loadable record after it; returns (image, caption, used, replaced)."""
        n = len(self.source)
        for attempt in range(MAX_CONSECUTIVE_BAD_RECORDS):
            candidate = (int(index) + attempt) % n
            try:
                image, caption = self.load(candidate, np.random.default_rng(rng_seed))
                return image, caption, candidate, int(attempt > 0)
            except Exception as e:   # broken record: deterministic replacement by the next
                error = e
        tried = [(int(index) + a) % n for a in range(MAX_CONSECUTIVE_BAD_RECORDS)]
        files = getattr(self.source, "record_files", lambda indices: [])(tried)
        where = f", in {', '.join(files)}" if files else ""
        raise BrokenDataset(f"records {index}..{candidate} of {self.source!r} are all unreadable"
                           f"{where} (last error: {type(error).__name__}: {error}); the dataset "
                           "is broken")

    def __call__(self, k, index_batch):
        indices = np.asarray(index_batch)[self.rows]
        loaded = [self.load_or_replace(i, [self.seed, _CROP_TAG, int(k), int(row)])
                  for row, i in zip(self.rows, indices)]
        return {**training_batch(np.stack([x[0] for x in loaded]), self.tokenizer([x[1] for x in loaded])),
                "indices": np.array([x[2] for x in loaded], np.int64),
                "replaced": np.array([x[3] for x in loaded], np.int32)}


def make_host_dataset(config, tokenizer, rows=None, start=0, opened=None):
    """grain.IterDataset of this process's host batches (numpy), from global batch `start` on.

    Each element is a `HostBatchLoader` output for R = len(rows) rows (default: the whole global
    batch). `opened`: the (source, weights) of `sources.make_source`, if already open.
    """
    source, weights = opened or sources.make_source(config, "train")
    batch = config.batch_size
    if rows is None:
        rows = np.arange(batch)
    part_sizes = getattr(source, "sizes", [len(source)])
    load = HostBatchLoader(source, tokenizer, rows, config.model.vision.image_size, config.seed,
                    config.data.crop_scale, config.data.crop_ratio)
    ds = index_batches(len(source), batch, config.seed, weights, part_sizes).map_with_index(load)
    if start:
        ds = ds[int(start):]
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
    """Yields {'images': uint8 [B,S*S*3], 'tokens': int32 [B,ctx]} global jax.Arrays: the
    pixel rows (`pixel_rows`) are reshaped and normalised by the train step, per
    micro-batch, so the batch crosses to the devices and stays there at a quarter of
    float32's size.

    `get_state()` -> {'next_batch', 'replaced_records', ...}: the data position, valid for any
    number of processes, devices or workers; `set_state` restarts the pipeline there.
    `replaced_records` counts broken records replaced so far (over all processes).
    """

    def __init__(self, config, tokenizer, sharding, opened=None):
        self.config, self.tokenizer, self.sharding = config, tokenizer, sharding
        self.global_batch_size = config.batch_size
        self.rows = process_rows(sharding, config.batch_size)
        # Opened here (or by the caller), before any worker starts: a bad source fails early.
        self.opened = opened or sources.make_source(config, "train")
        self.num_records = len(self.opened[0])
        self._replicated = NamedSharding(sharding.mesh, PartitionSpec())
        self._count = jax.jit(lambda total, flags: total + jnp.sum(flags),
                              out_shardings=self._replicated)
        self._start(0, 0)

    def _start(self, position, replaced):
        self.close()
        self.position = int(position)
        self._replaced = jax.device_put(np.int32(replaced), self._replicated)
        self.grain_iterator = iter(make_host_dataset(self.config, self.tokenizer, self.rows,
                                                     start=self.position, opened=self.opened))

    def __iter__(self):
        return self

    def _global(self, local):
        b = self.global_batch_size
        return jax.make_array_from_process_local_data(self.sharding, local, (b,) + local.shape[1:])

    def __next__(self):
        host = next(self.grain_iterator)
        self.position += 1
        self._replaced = self._count(self._replaced, self._global(host["replaced"]))
        return training_batch(self._global(pixel_rows(host["images"])), self._global(host["tokens"]))

    @property
    def replaced_records(self):
        """Broken records replaced so far, all processes (blocks until the count is known)."""
        return int(self._replaced)

    def _fingerprint(self):
        c = self.config
        return {"source": str(c.data.source), "weights": str(c.data.get("weights", "")),
                "num_records": self.num_records, "batch_size": self.global_batch_size,
                "seed": int(c.seed)}

    def get_state(self):
        return {"next_batch": self.position, "replaced_records": self.replaced_records,
                **self._fingerprint()}

    def check_state(self, state):
        """Raises ValueError if `state` was saved for other data (source, size, batch, seed)."""
        mine = self._fingerprint()
        changed = {k: (state.get(k), v) for k, v in mine.items() if state.get(k) != v}
        if changed:
            raise ValueError("the data iterator state was saved for different data: "
                             + "; ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in changed.items()))

    def set_state(self, state):
        self.check_state(state)
        self._start(state["next_batch"], state.get("replaced_records", 0))

    def close(self):
        close = getattr(getattr(self, "grain_iterator", None), "close", None)
        if close is not None:
            close()


def make_train_iterator(config, tokenizer, sharding, opened=None):
    """Endless iterator of global training batches laid out with `sharding` (batch dimension).
    `opened`: the training source as `sources.make_source` opened it, if it is open already."""
    return GlobalBatchIterator(config, tokenizer, sharding, opened)
