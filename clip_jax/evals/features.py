"""Image and text features of evaluation data, batched and sharded over the mesh.

Images are decoded and centre-cropped by Grain on `DECODE_THREADS` threads (PIL releases
the GIL while decoding and resizing), batched, and embedded by `CLIPModel.encode_image`,
which lays each batch over the mesh's batch shards. With `cache_dir`, image features
are stored as DIR/<key>.npy, the key hashing the checkpoint (path and modification
time), the data's fingerprint and the image size; a second evaluation of the same
checkpoint on the same data (another task, other prompts) skips the image tower.
"""
import hashlib
import io

import grain
import numpy as np
from tqdm import tqdm

from clip_jax import distributed, paths
from clip_jax.data import images
from clip_jax.data.pipeline import normalize_images

DECODE_THREADS = 16


class Views:
    """Random access to evaluation views: [i] -> uint8 [S, S, 3] (centre crop unless presized)."""

    def __init__(self, data, image_size):
        self.data, self.image_size = data, image_size

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        if self.data.presized:
            return np.asarray(self.data.image(i), np.uint8)
        try:   # reading too: a FIFO or device among the files is refused (BadImage)
            return images.center_crop(self.data.image(i), self.image_size)
        except images.BadImage as e:
            raise ValueError(f"{self.data.name}: image {self.data.keys[i]!r} is unusable ({e}); "
                             "an evaluation does not skip images: remove or fix it") from None


def _model_stamp(model):
    path = model.source
    try:
        return f"{path}@{paths.mtime(path)}"
    except OSError:
        return path


def cache_path(cache_dir, model, data):
    key = hashlib.sha256(repr((_model_stamp(model), data.fingerprint, data.name,
                               model.image_size, len(data))).encode()).hexdigest()[:24]
    return paths.join(cache_dir, f"image_features-{key}.npy")


def decoded_views(data, image_size, indices=None, prefetch=512):
    """uint8 [S, S, 3] evaluation views of `data` (of the rows `indices` only, if given), in
    order, decoded on DECODE_THREADS threads by Grain."""
    views = Views(data, image_size)
    source = (grain.MapDataset.source(views) if indices is None else
              grain.MapDataset.source(list(indices)).map(views.__getitem__))
    return source.to_iter_dataset(grain.ReadOptions(num_threads=DECODE_THREADS,
                                                    prefetch_buffer_size=prefetch))


def decoded_batches(data, image_size, batch_size):
    """uint8 [<=batch_size, S, S, 3] batches of `data`'s evaluation views, in order."""
    return decoded_views(data, image_size, prefetch=2 * batch_size).batch(batch_size)


def image_features(model, data, cache_dir="", progress=True, desc="image features"):
    """float32 [len(data), embed_dim] unnormalised image embeddings of `data` (an EvalData).

    With several processes each decodes only its share of the rows (`model.local_rows`:
    those its devices embed) and every process gets all the features."""
    path = cache_path(cache_dir, model, data) if cache_dir and model.source else ""
    cached = np.load(io.BytesIO(paths.read_bytes(path))) if path and paths.exists(path) else None
    usable = cached is not None and cached.shape[0] == len(data)
    if distributed.all_processes(usable):    # all or none: the encoders are collective
        return cached
    share = [i for batch in model.local_rows(len(data)) for i in batch]
    decoded = iter(decoded_views(data, model.image_size, share, prefetch=2 * model.batch_size))
    with tqdm(total=len(share), desc=desc, disable=not progress or not distributed.is_main(),
              dynamic_ncols=True, leave=False) as bar:

        def rows(indices):      # this process's rows of the next batch, decoded in that order
            bar.update(len(indices))
            return normalize_images(np.stack([next(decoded) for _ in indices]))

        features = model.encode_image_rows(len(data), rows)
    if path and distributed.is_main():
        npy = io.BytesIO()
        np.save(npy, features)
        paths.write_bytes(path, npy.getvalue())
    return features


def text_features(model, texts, progress=True, desc="text features"):
    """float32 [len(texts), embed_dim] unnormalised text embeddings."""
    out = []
    step = model.batch_size * 8
    with tqdm(total=len(texts), desc=desc, disable=not progress or not distributed.is_main()
              or len(texts) <= step, dynamic_ncols=True, leave=False) as bar:
        for start in range(0, len(texts), step):
            chunk = texts[start:start + step]
            out.append(model.encode_text(model.tokenize(chunk)))
            bar.update(len(chunk))
    return np.concatenate(out) if out else np.zeros((0, int(model.config.model.embed_dim)), np.float32)
