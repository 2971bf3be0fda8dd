"""`clip_jax.load(PATH)`: a trained or converted CLIP, ready to embed text and images.

    model = clip_jax.load("runs/smoke")          # a run's workdir: its newest checkpoint
    ids = model.tokenize(["a photo of a red circle."])
    text = model.encode_text(ids)                # float32 [1, embed_dim]
    image = model.encode_image(np.stack([model.preprocess(pil_image)]))

PATH may be a run's workdir, its `checkpoints` directory or one step directory in it, or
a parameters-only checkpoint written by `checkpoint.save_params(..., config=...)`
(converted pretrained weights). The model's config comes from WORKDIR/config.json, the
checkpoint's own metadata, or DIR/config.json, and the model is built from all of it
(`models.from_config`: a SigLIP run's model has its `logit_bias`); its tokenizer from
`data.tokenizer_path` or the run's cached SentencePiece model (WORKDIR/tokenizer/spm.model)
— never trained here.

Encoders are jitted and batched: inputs are cut into batches of at most `batch_size`,
each padded to a power of two (a multiple of the mesh's batch shards), so a handful of
shapes are compiled whatever the input sizes. Parameters are laid out by the run's
sharding rules on a mesh of all devices (the run's mesh if it fits, else data-parallel).
Embeddings come back as numpy float32, unnormalised unless `normalize=True` — as
OpenAI's `encode_image`/`encode_text` do. The model runs on the kernels this host's devices
suit (`load(..., kernels='auto')`), never the ones the saved run chose.

Nothing wrong comes out silently. The arrays are checked against the checksums saved with
them (`checkpoint.load_model_variables`): for a run's workdir a damaged newest checkpoint
is skipped with a WARNING naming it and the array, and the newest intact one is loaded
(`source` says which); a damaged checkpoint named directly is a `CheckpointError`. The
encoders raise `NonFiniteEmbeddings` (a ValueError naming the checkpoint) rather than
return a NaN or infinite embedding: from diverged or damaged weights, evaluation figures
and search scores would look plausible and mean nothing.
"""

import jax
import ml_collections
import numpy as np

from clip_jax import checkpoint, config_lib, models, ops, paths, sharding
from clip_jax.data import images as images_lib, tokenizer as tokenizer_lib
from clip_jax.data.pipeline import normalize_images
from clip_jax.models.clip import MAX_LOGIT_SCALE, l2_normalize
from clip_jax.models import abstract_variables, encoder_fns

DEFAULT_BATCH_SIZE = 256


class NonFiniteEmbeddings(ValueError):
    """An encoder gave NaN or infinite embeddings: the weights have diverged or are damaged."""


def _to_host(x):
    """The whole array as numpy on every process (gathered if it spans several processes)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


class CLIPModel:
    """A CLIP's encoders over fixed variables (or, in training, the current ones).

    `variables` may be replaced between calls (same shapes): the compiled encoders take
    them as an argument. `source` says where the weights came from (for caches and logs).
    """

    def __init__(self, config, variables, tokenizer, mesh, rules, batch_size=DEFAULT_BATCH_SIZE,
                 source=""):
        self.config = config
        self.model = models.from_config(config, mesh)
        self.variables = variables
        self.tokenizer = tokenizer
        self.mesh, self.rules = mesh, tuple(rules)
        self.source = source
        self.image_size = int(config.model.vision.image_size)
        self.context_length = int(config.model.text.context_length)
        self._shards = sharding.num_batch_shards(mesh, self.rules)
        self.batch_size = max(self._shards, int(batch_size) // self._shards * self._shards)
        self._data_sharding = sharding.batch_sharding(mesh, self.rules)
        self._encode_image, self._encode_text = encoder_fns(self.model)

    # ------------------------------------------------------------------ inputs
    def tokenize(self, texts):
        """list[str] -> int32 [n, context_length] token ids."""
        if isinstance(texts, str):
            texts = [texts]
        return np.asarray(self.tokenizer(list(texts)), np.int32)

    def preprocess(self, image):
        """A PIL image, uint8 [H, W, 3] array or encoded image bytes -> float32 [S, S, 3]:
        the evaluation transform (resize the short side to S, centre crop, CLIP mean/std)."""
        if isinstance(image, np.ndarray):
            image = images_lib.array_to_pil(image)
        if not isinstance(image, (bytes, bytearray)):
            image = image.convert("RGB")
        return normalize_images(images_lib.center_crop(image, self.image_size))

    # ------------------------------------------------------------------ encoders
    def encode_image(self, images, normalize=False):
        """float32 [n, S, S, 3] preprocessed images -> float32 [n, embed_dim]."""
        images = np.asarray(images, np.float32)
        if images.ndim != 4 or images.shape[1:] != (self.image_size, self.image_size, 3):
            raise ValueError(f"encode_image expects float32 [n, {self.image_size}, {self.image_size}, 3] "
                             f"preprocessed images, got shape {images.shape}; see `preprocess`")
        bad = int(np.sum(~np.isfinite(images).all(axis=(1, 2, 3))))
        if bad:
            raise ValueError(f"encode_image: {bad} of the {len(images)} images hold NaN or "
                             "infinite values")
        out = self._batched(self._encode_image, len(images), images.__getitem__, images.shape[1:],
                            np.float32, "image")
        return l2_normalize(out) if normalize else out

    def encode_image_rows(self, n, rows, normalize=False):
        """Like `encode_image` for n images that this process need not hold: `rows(indices)`
        returns float32 [len(indices), S, S, 3] preprocessed images for those indices. It is
        called batch by batch, in order, with the rows of `local_rows(n)`; with several
        processes each process is asked only for the rows its devices hold."""
        shape = (self.image_size, self.image_size, 3)
        out = self._batched(self._encode_image, n, rows, shape, np.float32, "image")
        return l2_normalize(out) if normalize else out

    def encode_text(self, ids, normalize=False):
        """int32 [n, context_length] token ids (from `tokenize`) -> float32 [n, embed_dim]."""
        ids = np.asarray(ids, np.int32)
        if ids.ndim != 2 or ids.shape[1] != self.context_length:
            raise ValueError(f"encode_text expects int32 [n, {self.context_length}] token ids, "
                             f"got shape {ids.shape}; see `tokenize`")
        out = self._batched(self._encode_text, len(ids), ids.__getitem__, ids.shape[1:], np.int32,
                            "text")
        return l2_normalize(out) if normalize else out

    @property
    def logit_scale(self):
        """The learned temperature's inverse, exp(logit_scale) capped at 100 as in training:
        logits = logit_scale * cosine similarity."""
        raw = float(_to_host(self.variables["params"]["logit_scale"]))
        return min(float(np.exp(raw)), MAX_LOGIT_SCALE)

    @property
    def logit_bias(self):
        """The learned logit bias of a model trained with a SigLIP loss (None for the CLIP
        losses): its probability that an image and a text match is
        sigmoid(logit_scale * cosine similarity + logit_bias), as in training."""
        bias = self.variables["params"].get("logit_bias")
        return None if bias is None else float(_to_host(bias))

    def padded_size(self, n):
        """The batch shape `n` inputs are padded to: a power of two (>= the batch shards),
        rounded up to a multiple of them, at most `batch_size`."""
        size = max(self._shards, 1 << max(0, int(n) - 1).bit_length())
        return min(self.batch_size, -(-size // self._shards) * self._shards)

    def _batches(self, n):
        """(start, real rows, padded size, positions this process's devices hold) per batch."""
        out = []
        for start in range(0, n, self.batch_size):
            count = min(self.batch_size, n - start)
            size = self.padded_size(count)
            held = self._data_sharding.addressable_devices_indices_map((size,))
            positions = sorted({i for index in held.values() for i in range(*index[0].indices(size))})
            out.append((start, count, size, positions))
        return out

    def local_rows(self, n):
        """Per batch of n inputs, the input indices whose rows this process feeds (every
        index with one process; with several, those its devices hold: its share)."""
        return [[start + i for i in positions if i < count]
                for start, count, _, positions in self._batches(n)]

    def _batched(self, fn, n, rows, item_shape, dtype, tower):
        """fn over n inputs in padded batches laid over the mesh. Each process fetches only
        the rows its devices hold (`rows(indices)`); padding rows are zeros; the outputs
        are gathered to every process. Every embedding that comes out of the model passes
        here: a batch with a non-finite one raises NonFiniteEmbeddings (on every process)."""
        outs = []
        with sharding.mesh_context(self.mesh, self.rules):
            for start, count, size, positions in self._batches(n):
                real = [start + i for i in positions if i < count]   # the rest is padding
                local = np.zeros((len(positions), *item_shape), dtype)
                if real:
                    local[:len(real)] = rows(real)
                where = {i: k for k, i in enumerate(positions)}
                batch = jax.make_array_from_callback(
                    (size, *item_shape), self._data_sharding,
                    lambda index: local[[where[i] for i in range(*index[0].indices(size))]])
                outs.append(_to_host(fn(self.variables, batch))[:count])
                bad = int(np.sum(~np.isfinite(outs[-1]).all(axis=1)))
                if bad:
                    who = f"checkpoint {self.source}" if self.source else "the current weights"
                    raise NonFiniteEmbeddings(
                        f"{who}: non-finite {tower} embeddings (NaN or infinity) for {bad} of "
                        f"{count} inputs (rows {start}-{start + count - 1} of {n}): the weights "
                        "have diverged or are damaged")
        if not outs:
            return np.zeros((0, int(self.config.model.embed_dim)), np.float32)
        return np.concatenate(outs).astype(np.float32)


# ---------------------------------------------------------------------- loading

_JSON_TYPES = {list: "an array", str: "a string", int: "a number", float: "a number",
               bool: "true or false", type(None): "null"}


def read_json_object(path):
    """The JSON object (dict) in the file `path`; ValueError naming the file if it is not one."""
    import json
    try:
        value = json.loads(paths.read_text(path))
    except ValueError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        found = _JSON_TYPES.get(type(value), type(value).__name__)
        raise ValueError(f"{path}: expected a JSON object, found {found}")
    return value


def locate(path):
    """(config, state_dir, home) of PATH (see the module docstring); `home` is where the
    run's cached tokenizer lives. Raises ValueError naming the path if it is not a model."""
    path = paths.resolve(path)
    if not paths.exists(path):
        raise ValueError(f"{path}: no such checkpoint or run directory")
    try:
        state_dir = checkpoint.resolve_state_dir(path, what="clip_jax.load")
    except checkpoint.CheckpointError as e:
        raise ValueError(str(e)) from None
    step_dir = paths.dirname(state_dir)
    run_dir = paths.dirname(paths.dirname(step_dir))
    candidates = [paths.join(path, "config.json"), paths.join(step_dir, "meta", "metadata"),
                  paths.join(run_dir, "config.json")]
    for candidate in candidates:
        if not paths.isfile(candidate):
            continue
        if candidate.endswith("metadata"):
            try:   # a damaged step's meta: load_model_variables reports it
                saved = read_json_object(candidate).get("config")
            except ValueError:
                continue
        else:
            saved = read_json_object(candidate)
        if saved and isinstance(saved, dict):
            config = config_lib.from_json(saved)
            home = paths.dirname(candidate) if candidate.endswith("config.json") else run_dir
            return config, state_dir, home
    raise ValueError(f"{path}: found the checkpoint {state_dir} but no config.json beside it "
                     "(write converted weights with checkpoint.save_params(..., config=config))")


def load_tokenizer(config, home):
    """The run's tokenizer: `data.tokenizer_path`, or the SentencePiece model cached in `home`."""
    if config.data.tokenizer == "sentencepiece" and not config.data.tokenizer_path:
        path = paths.join(home, "tokenizer", "spm.model")
        if not paths.exists(path):
            raise ValueError(f"{path} does not exist: the run's tokenizer is missing (set "
                             "config.data.tokenizer_path to the .model file it was trained with)")
        return tokenizer_lib.SentencePieceTokenizer.load(path, config.model.text.context_length)
    return tokenizer_lib.get_tokenizer(config, home)


def inference_mesh(config):
    """The run's mesh if the devices here fit it, else every device on the data axis."""
    try:
        return sharding.make_mesh(config.mesh)
    except ValueError:
        return sharding.make_mesh({"data": -1, "fsdp": 1, "model": 1})


def load(path, batch_size=DEFAULT_BATCH_SIZE, kernels="auto"):
    """A `CLIPModel` for the checkpoint at `path` (a workdir, a checkpoint, converted weights).

    `kernels` (`config.kernels.ops`: 'auto', 'xla', 'cpu' or 'gpu') are chosen for this
    host's devices, never taken from the saved run: a run trained with the CPU kernels loads
    on a GPU host with the GPU ones, on a TPU host with the plain ones."""
    config, _, home = locate(path)
    config.kernels = ml_collections.ConfigDict(dict(ops=kernels, cpu_ops_off="", gpu_ops_off=""))
    ops.check(config.kernels)
    tokenizer = load_tokenizer(config, home)
    mesh = inference_mesh(config)
    rules = tuple(tuple(r) for r in config.sharding_rules)
    model = models.from_config(config)
    target = abstract_variables(model, config.model, mesh, rules)
    target = {"params": target["params"], "batch_stats": target.get("batch_stats", {})}
    variables, report = checkpoint.load_model_variables(path, target, what="clip_jax.load")
    if report["missing"]:
        raise ValueError(f"{report['source']} lacks {len(report['missing'])} of the model's arrays, "
                         f"e.g. {report['missing'][0]}")
    if not variables["batch_stats"]:
        variables = {"params": variables["params"]}
    return CLIPModel(config, variables, tokenizer, mesh, rules, batch_size, source=report["source"])
