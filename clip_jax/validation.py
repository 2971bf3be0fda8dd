"""Whole-config checks: `validate(config, num_devices)` raises `ConfigError` naming the
first bad key, before any work starts.

Separate from `config_lib` (the tables, defaults and schema, which import nothing of
clip_jax) because these checks ask the modules that own each option: the losses, the
kernels, the mesh axes, the data sources and tokenizers, the evaluators.
"""
import importlib.util
import json

import ml_collections

from clip_jax import losses, ops, paths, sharding
from clip_jax.config_lib import MOVED_KEYS, ConfigError, lookup
from clip_jax.data import records, sources, spec as spec_lib, tokenizer
from clip_jax.evals import registry
from clip_jax.models import layers


def _validate_data(config, require):
    d = config.data
    try:
        specs = spec_lib.parse_sources(d.source)
        sources.parse_weights(d.weights, len(specs))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    for source_spec in specs:
        if source_spec.kind == "ingested":   # synthetic and tfds are checked when opened
            try:
                records.read_manifest(source_spec.path)
            except ValueError as e:
                raise ConfigError(f"config.data.source: {e}") from None
    require(d.workers >= 0, "data.workers", "must be >= 0")
    require(d.prefetch >= 0, "data.prefetch", "must be >= 0")
    lo, hi = d.crop_scale
    require(0 < lo <= hi <= 1, "data.crop_scale", "must be (low, high) with 0 < low <= high <= 1")
    lo, hi = d.crop_ratio
    require(0 < lo <= hi, "data.crop_ratio", "must be (low, high) with 0 < low <= high")
    require(d.tokenizer in tokenizer.TOKENIZERS, "data.tokenizer", f"must be one of {sorted(tokenizer.TOKENIZERS)}")
    require(not d.tokenizer_path or paths.isfile(d.tokenizer_path), "data.tokenizer_path", "no such file")
    if d.tokenizer == "sentencepiece":
        require(d.tokenizer_vocab_size <= config.model.text.vocab_size, "data.tokenizer_vocab_size",
             f"must be <= model.text.vocab_size={config.model.text.vocab_size}")


def _check_init_from_tokenizer(config):
    """Parameters taken from a model trained with another tokenizer would read wrong ids."""
    saved_path = paths.join(config.init_from, "config.json") if config.init_from else ""
    if not saved_path or not paths.isfile(saved_path):
        return
    saved = json.loads(paths.read_text(saved_path)).get("data", {})
    if saved.get("tokenizer", config.data.tokenizer) != config.data.tokenizer:
        raise ConfigError(
            f"config.data.tokenizer: {config.data.tokenizer!r}, but config.init_from={config.init_from} "
            f"was trained with {saved['tokenizer']!r}: set --config.data.tokenizer={saved['tokenizer']} "
            "(or use configs/finetune.py:DIR, which does)")


def check_workdir_tokenizer(config, workdir):
    """A workdir with checkpoints resumes only with the tokenizer it was trained with: its
    text tower reads those ids (the paper configs' default changed from SentencePiece to
    CLIP's BPE; a run started before keeps its own, named in its config.json)."""
    saved_path, ckpt_dir = paths.join(workdir, "config.json"), paths.join(workdir, "checkpoints")
    if not paths.isfile(saved_path) or not paths.isdir(ckpt_dir):
        return
    if not any(name.isdigit() for name in paths.listdir(ckpt_dir)):
        return
    saved = json.loads(paths.read_text(saved_path)).get("data", {}).get("tokenizer")
    if saved and saved != config.data.tokenizer:
        raise ConfigError(
            f"config.data.tokenizer: {config.data.tokenizer!r}, but the checkpoints in {workdir} "
            f"were trained with {saved!r}: resume with --config.data.tokenizer={saved} (or "
            "train the new tokenizer in another --workdir)")


def _validate_evals(config):
    """Each config.evals entry: a known task, data, options that apply, files that exist."""
    for name, entry in config.get("evals", {}).items():
        where = f"config.evals.{name}"
        if not isinstance(entry, ml_collections.ConfigDict):
            raise ConfigError(f"{where}: expected a dict of task, data and options, got {entry!r}")
        options = {k: v for k, v in entry.items() if k not in ("task", "data")}
        try:
            options = registry.check(entry.get("task", ""), options, where)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if not entry.get("data"):
            raise ConfigError(f"{where}.data: the evaluation data must be given")
        try:   # caught here, before training, rather than at the first evaluation
            for spec, key in registry.get(entry.task).data_specs(entry.data, options):
                spec_lib.parse(spec, "eval", f"{where}.{key}")
        except ValueError as e:
            raise ConfigError(str(e)) from None
        declared = registry.get(entry.task).options
        for key, value in options.items():
            if not declared[key].check_file(value):
                raise ConfigError(f"{where}.{key}: no such file {value!r}"
                                  + (" (nor a shipped name)" if declared[key].or_name else ""))


def validate(config, num_devices=None):
    """Semantic checks of a whole config; raises ConfigError naming the first bad key."""

    def require(cond, key, msg):
        if not cond:
            raise ConfigError(f"config.{key}: {msg} (got {lookup(config, key)[1]!r})")

    for key in ("batch_size", "total_steps", "log_every"):
        require(isinstance(config[key], int) and config[key] > 0, key, "must be a positive integer")
    require(config.eval_every >= 0, "eval_every", "must be >= 0 (0: only at the end)")
    require(isinstance(config.checkpoint_every, int) and config.checkpoint_every >= 0,
         "checkpoint_every", "must be an integer >= 0 (0: only at the end and on preemption)")
    require(isinstance(config.max_to_keep, int) and config.max_to_keep >= 1, "max_to_keep",
         "must be a positive integer")
    require(isinstance(config.max_bad_steps, int) and config.max_bad_steps >= 1, "max_bad_steps",
         "must be a positive integer")
    require(not config.init_from or paths.exists(config.init_from), "init_from",
         "no such checkpoint directory")
    _check_init_from_tokenizer(config)
    m = config.model
    require(m.vision.kind in ("resnet", "vit"), "model.vision.kind", "must be 'resnet' or 'vit'")
    require(m.dtype in ("float32", "bfloat16"), "model.dtype", "must be 'float32' or 'bfloat16'")
    w = config.get("wandb")
    if w is not None:
        require(w.mode in ("online", "offline", "disabled"), "wandb.mode",
                "must be 'online', 'offline' or 'disabled'")
        if w.project and importlib.util.find_spec("wandb") is None:
            raise ConfigError(f"config.wandb.project: {w.project!r} asks for Weights & Biases, "
                              "which is not installed: pip install -e '.[wandb]'")
    try:
        layers.remat_policy(m.get("remat", False))
    except ValueError as e:
        raise ConfigError(f"config.{e}") from None
    require(m.get("activation", "quick_gelu") in ("quick_gelu", "gelu"), "model.activation",
         "must be 'quick_gelu' or 'gelu'")
    for old, new in MOVED_KEYS.items():
        require(not lookup(config, old)[0], old, f"moved to config.{new} (a runtime choice, not "
             "part of the model)")
    try:
        ops.check(config.kernels)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if m.vision.kind == "vit":
        require(m.vision.patch_size > 0 and m.vision.image_size % m.vision.patch_size == 0,
             "model.vision.patch_size", "must be positive and divide model.vision.image_size")
        require(m.vision.width % m.vision.heads == 0, "model.vision.heads", "must divide model.vision.width")
    else:
        require(len(m.vision.layers) == 4, "model.vision.layers", "a ResNet needs 4 stage depths")
        require(m.vision.image_size % 32 == 0, "model.vision.image_size", "a ResNet needs a multiple of 32")
    require(m.text.width % m.text.heads == 0, "model.text.heads", "must divide model.text.width")
    o = config.optim
    require(o.lr > 0, "optim.lr", "must be positive")
    require(0 <= o.b1 < 1 and 0 <= o.b2 < 1, "optim.b2" if not 0 <= o.b2 < 1 else "optim.b1", "must be in [0, 1)")
    require(o.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
    require(o.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
    try:
        losses.check(config.loss)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    require(isinstance(config.micro_batches, int) and config.micro_batches >= 1, "micro_batches",
         "must be a positive integer")
    require(config.batch_size % config.micro_batches == 0, "micro_batches", "must divide batch_size")
    require(isinstance(config.lock_image.unlocked_blocks, int) and config.lock_image.unlocked_blocks >= 0,
         "lock_image.unlocked_blocks", "must be an integer >= 0")
    require(not config.lock_image.enabled or config.init_from, "lock_image.enabled",
         "locks the image tower of a pretrained model: set config.init_from too")
    _validate_data(config, require)
    _validate_evals(config)
    rule_names = [r[0] for r in config.sharding_rules]
    require("batch" in rule_names, "sharding_rules", "needs a rule for the logical axis 'batch'")
    for name, axes in config.sharding_rules:
        for a in (axes,) if isinstance(axes, str) else (axes or ()):
            require(a in sharding.MESH_AXES, "sharding_rules", f"rule {name!r} names unknown mesh axis {a!r}")
    if num_devices is not None:
        try:
            shape = dict(zip(sharding.MESH_AXES, sharding.mesh_shape(config.mesh, num_devices)))
        except ValueError as e:
            raise ConfigError(str(e)) from None
        shards = 1
        for a in sharding.batch_axes(config.sharding_rules):
            shards *= shape[a]
        require(config.batch_size % shards == 0, "batch_size",
             f"must be divisible by the {shards} batch shards of the mesh {shape}")
        require(config.batch_size % (shards * config.micro_batches) == 0, "micro_batches",
             f"batch_size={config.batch_size} must split into micro_batches x {shards} batch shards")
