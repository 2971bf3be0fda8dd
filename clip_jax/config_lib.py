"""Pieces shared by every config: the paper's nine architectures and its recipe.

Configs are Python (big_vision style): each `configs/X.py` has `get_config()`
returning a ConfigDict built from these helpers. Every key is documented in
README.md ("Config keys"). Shapes come from the paper / reference
implementation (see the table in README.md); parameter counts are tested.
"""
import json

import ml_collections


# name: (embed_dim, image_size, vision_layers, vision_width, patch, text_width, text_heads)
PAPER_MODELS = {
    "rn50": (1024, 224, (3, 4, 6, 3), 64, 0, 512, 8),
    "rn101": (512, 224, (3, 4, 23, 3), 64, 0, 512, 8),
    "rn50x4": (640, 288, (4, 6, 10, 6), 80, 0, 640, 10),
    "rn50x16": (768, 384, (6, 8, 18, 8), 96, 0, 768, 12),
    "rn50x64": (1024, 448, (3, 15, 36, 10), 128, 0, 1024, 16),
    "vit_b32": (512, 224, 12, 768, 32, 512, 8),
    "vit_b16": (512, 224, 12, 768, 16, 512, 8),
    "vit_l14": (768, 224, 24, 1024, 14, 768, 12),
    "vit_l14_336": (768, 336, 24, 1024, 14, 768, 12),
}

# Peak learning rates from the paper's hyperparameter tables.
PAPER_LR = {
    "rn50": 5e-4, "rn101": 5e-4, "rn50x4": 5e-4, "rn50x16": 4e-4, "rn50x64": 3.6e-4,
    "vit_b32": 5e-4, "vit_b16": 5e-4, "vit_l14": 4e-4, "vit_l14_336": 2e-5,
}

# Logical axis name -> mesh axes (MaxText style). The only place sharding is decided.
# Parameters: 'embed' (model width), 'mlp' (MLP hidden), 'heads', 'kv' (head dim),
# 'vocab', 'joint' (shared embedding space), 'conv_in'/'conv_out' (conv channels),
# 'norm' (norm scales/biases), 'pos' (positions), 'layers' (a tower's stacked blocks).
# Activations: 'batch', 'length', 'act_embed'. A mesh axis that does not divide a dimension is dropped for that array.
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "model"),
    ("heads", "model"),
    ("kv", None),
    ("vocab", "model"),
    ("joint", None),
    ("conv_in", "fsdp"),
    ("conv_out", "model"),
    ("norm", None),
    ("pos", None),
    ("layers", None),
    ("length", None),
    ("act_embed", None),
)


def model_config(name):
    """The paper architecture `name` as a model ConfigDict."""
    embed, size, layers, width, patch, twidth, theads = PAPER_MODELS[name]
    is_vit = patch > 0
    return ml_collections.ConfigDict(dict(
        embed_dim=embed,
        vision=dict(
            kind="vit" if is_vit else "resnet",
            image_size=size,
            layers=layers,
            width=width,
            patch_size=patch,
            # ViT: width / 64; ResNet attention pool: width * 32 / 64.
            heads=width // 64 if is_vit else width * 32 // 64,
        ),
        text=dict(vocab_size=49408, context_length=77, width=twidth, heads=theads, layers=12),
        dtype="bfloat16",   # compute dtype; parameters are always float32
        remat=remat_field("full"),   # each residual block's remat policy (see remat_field)
        scan_layers=True,   # each tower's repeated blocks compiled once, as a lax.scan
        activation="quick_gelu",   # transformer MLPs; 'gelu' for OpenCLIP's non-quickgelu models
    ))


# `model.remat`: what a residual block keeps from its forward pass for the backward
# (clip_jax.models.layers.REMAT_POLICIES, MaxText's style of names): 'none', 'full' (the
# block's input only: everything recomputed), 'minimal' (the products without batch
# dimensions: q/k/v, attention output and MLP projections; the attention recomputed),
# 'save_qkv_proj', 'save_attention_out'. True and False, as configs wrote it before the
# names, are 'full' and 'none' (`layers.remat_policy`).


def remat_field(value):
    """The `model.remat` field, of any type: a policy name, or True/False (older configs)."""
    return ml_collections.FieldReference(value, field_type=object)


def set_remat(model_cfg, value):
    """Sets `model_cfg.remat`, whatever type a resolved copy fixed the field to."""
    with model_cfg.unlocked():
        if "remat" in model_cfg:
            del model_cfg["remat"]
        model_cfg.remat = remat_field(value)


def base_config():
    """Keys every config has; paper configs and smoke override the values."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.batch_size = 32768           # global batch, across all devices and processes
    c.total_steps = 12_800_000_000 // 32768   # 32 epochs x 400M pairs
    c.log_every = 100
    c.eval_every = 0               # 0: evaluate only at the end
    c.progress = True              # tqdm progress bar
    # Checkpoints (WORKDIR/checkpoints, Orbax): every this many steps (0: only at the end
    # and on preemption), keeping the newest `max_to_keep`. A restart resumes the latest.
    c.checkpoint_every = 1000
    c.max_to_keep = 3
    c.init_from = ""               # fresh runs only: take parameters from this checkpoint
    c.max_bad_steps = 10           # stop after this many non-finite steps in a row
    # JAX's persistent compilation cache: a restarted run reads its compiled step instead of
    # compiling it again. 'workdir': WORKDIR/compile_cache; a directory (local or gs://);
    # '': off. A cache directory set for JAX already (JAX_COMPILATION_CACHE_DIR) is kept.
    c.compile_cache = "workdir"
    c.optim = ml_collections.ConfigDict(dict(
        lr=5e-4, b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.2,
        warmup_steps=2000, grad_clip_norm=0.0))   # 0: no clipping
    # One slice's mesh (-1: the rest of its devices), and how many slices the data axis spans
    # over the data-centre network (DCN; -1: every slice the devices are on, TPU slices; 1
    # elsewhere, where N > 1 takes each process as a slice). The mesh's data axis is
    # slices x data; fsdp and model stay within a slice (clip_jax/sharding.py).
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, model=1, slices=-1))
    # The kernels the models run on (clip_jax/ops, which owns the names and checks them): a
    # runtime choice of the host, not architecture. `ops`: 'auto' (the XLA:CPU variants on a
    # CPU mesh, cuDNN attention on a GPU mesh, the plain code on TPUs), 'xla' (plain), 'cpu'
    # or 'gpu'; `cpu_ops_off` / `gpu_ops_off`: kernel pieces left to the plain code,
    # comma-separated, to measure them.
    c.kernels = ml_collections.ConfigDict(dict(ops="auto", cpu_ops_off="", gpu_ops_off=""))
    c.sharding_rules = DEFAULT_RULES
    # Weights & Biases (the `wandb` extra), beside TensorBoard and metrics.jsonl, when
    # `project` is set: the same scalars at the same steps and the run's config. `mode`:
    # 'online', 'offline' (written under WORKDIR/wandb, `wandb sync` later) or 'disabled';
    # `name`: the run's display name (default: W&B's). A resumed run continues the same
    # W&B run (its id is kept in WORKDIR/wandb_run_id).
    c.wandb = ml_collections.ConfigDict(dict(project="", entity="", mode="online", name=""))
    # The contrastive loss (clip_jax/losses.py): 'clip' (the paper's, sharded), 'clip_blockwise'
    # (the same value, logits streamed over column blocks of `block_size`: O(B_local x block)
    # memory), 'siglip' (pairwise sigmoid, learned temperature and bias).
    c.loss = ml_collections.ConfigDict(dict(name="clip", block_size=1024))
    # >1: each step computes the full-batch loss from K micro-batches (gradient cache):
    # the same update as one big batch, with the activations of batch_size / K examples.
    c.micro_batches = 1
    # Locked-image tuning (LiT): freeze the image tower, except its last `unlocked_blocks`
    # residual blocks (and what follows them); frozen parameters get no optimiser state.
    c.lock_image = ml_collections.ConfigDict(dict(enabled=False, unlocked_blocks=0))
    # Evaluations run every `eval_every` steps and at the end: name -> {task, data, options}
    # as `python -m clip_jax.evaluate` takes them (README "Evaluation"); logged as
    # <task>/<name>/<figure>. Entries on synthetic[:ATTR] data run only when training on
    # the synthetic data: they are the held-out (shape, colour) combinations.
    c.evals = ml_collections.ConfigDict({
        "shape": dict(task="zeroshot", data="synthetic:shape"),
        "color": dict(task="zeroshot", data="synthetic:color")})
    c.data = ml_collections.ConfigDict(dict(
        # 'synthetic', an ingested directory, 'tfds:NAME[:VERSION][:SPLIT]', or a comma-separated
        # mixture of them; `weights` (comma-separated, '' = proportional to size) mixes them.
        source="synthetic", weights="",
        workers=0, prefetch=2,
        # Training crop (RandomResizedCrop): area fraction and aspect-ratio ranges.
        crop_scale=(0.9, 1.0), crop_ratio=(3 / 4, 4 / 3),
        # 'sentencepiece' (tokenizer_path: a .model file, or '' to train one on the
        # training captions, cached in the workdir) or 'clip_bpe' (tokenizer_path: the
        # reference's merges file, or '' for the copy shipped in clip_jax/data/assets).
        tokenizer="sentencepiece", tokenizer_path="", tokenizer_vocab_size=256,
        tfds=dict(data_dir="", image_key="image", caption_key="caption", label_key=""),
        synthetic=dict(num_train=1_000_000, num_eval=512)))
    return c


# Each model's remat policy: the one with the least recomputation that fits a v5e-256 slice
# at the paper's batch (32,768, 128 per chip; the mesh and micro-batches of POD_FIT) and a
# v4-256 slice, from the compiled steps in benchmarks/RESULTS.md ("Remat policies"). No
# model fits without remat; 'minimal' keeps every dense layer's output (the text tower's and
# the attention's projections; a ResNet's convolutions are recomputed). ViT-L/14 keeps
# 'full' (nothing lighter fits), ViT-L/14@336 too ('save_qkv_proj' fits a v5e chip with
# nothing to spare, 15.99 of 16 GiB, and not a v4 chip).
PAPER_REMAT = {"rn50": "minimal", "rn101": "minimal", "rn50x4": "minimal", "rn50x16": "minimal",
               "rn50x64": "minimal", "vit_b32": "minimal", "vit_b16": "minimal"}


# The three largest models do not fit a v4-256 or v5e-256 slice at the paper's batch as
# plain data parallelism (their compiled steps need 35-79 GB per chip on v4): they shard
# parameters and optimiser state over every device (FSDP) and take the batch's gradient from
# micro-batches (`micro_batches`). Compiled for both slices in BUILD_NOTES ("TPU pods").
POD_FIT = {"rn50x16": dict(micro_batches=2), "rn50x64": dict(micro_batches=4),
           "vit_l14_336": dict(micro_batches=2)}


def paper_config(name):
    """The paper's recipe for model `name` at its real scale."""
    c = base_config()
    c.model = model_config(name)
    c.optim.lr = PAPER_LR[name]
    # The paper's text encoder reads CLIP's lower-cased byte-level BPE (49,152 merges, 49,408
    # ids: the embedding table's size), the copy shipped with clip_jax.
    c.data.tokenizer = "clip_bpe"
    c.model.remat = PAPER_REMAT.get(name, "full")
    if name in POD_FIT:
        c.micro_batches = POD_FIT[name]["micro_batches"]
        c.mesh.update(data=1, fsdp=-1)
    if name.startswith("rn"):
        c.optim.b2, c.optim.eps = 0.999, 1e-8
    if name == "vit_l14_336":
        # One extra epoch at 336px, starting from ViT-L/14 (set init_from when available).
        c.total_steps = 400_000_000 // 32768
        c.optim.warmup_steps = 0
    return c


class ConfigError(ValueError):
    """A config problem found before any work starts; the message names the key."""


def lookup(config, dotted):
    """(True, the value at the dotted key), or (False, the last node on its path)."""
    node = config
    for part in dotted.split("."):
        if not hasattr(node, "keys") or part not in node.keys():
            return False, node
        node = node[part]
    return True, node


# Keys that may change between a run's invocations without changing what it computes (the
# kernels compute the same up to rounding).
RESUME_NEUTRAL_KEYS = ("progress", "log_every", "eval_every", "checkpoint_every", "max_to_keep",
                       "max_bad_steps", "init_from", "mesh.", "sharding_rules", "data.workers",
                       "data.prefetch", "evals.", "kernels.", "model.remat", "wandb.",
                       "compile_cache")

# Keys that moved: old name -> new name. Saved configs that have an old key (every
# checkpoint's config.json before the kernels left the model block) are read without it;
# a command line or config file that sets it is told where it went.
MOVED_KEYS = {"model.ops": "kernels.ops", "model.cpu_ops_off": "kernels.cpu_ops_off"}


def _without_moved_keys(tree):
    """A saved config's JSON tree (a dict, changed in place) without the keys that moved: the
    saved kernels were the saving host's choice, and the reader makes its own."""
    for old in MOVED_KEYS:
        *parents, leaf = old.split(".")
        node = tree
        for p in parents:
            node = node.get(p) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    return tree


def from_json(saved):
    """A ConfigDict from a saved config (JSON text or the dict `json.loads` gives).

    JSON turns tuples into lists; the keys that hold tuples get them back. Keys that moved
    (`MOVED_KEYS`) are dropped, and a config saved before the `kernels` block existed gets
    the default one: which kernels run is the reader's choice."""
    tree = json.loads(saved) if isinstance(saved, str) else json.loads(json.dumps(saved))
    _without_moved_keys(tree)
    if "kernels" not in tree:
        tree["kernels"] = base_config().kernels.to_dict()
    vision = tree.get("model", {}).get("vision", {})
    if isinstance(vision.get("layers"), list):   # before ConfigDict fixes the field's type
        vision["layers"] = tuple(vision["layers"])
    config = ml_collections.ConfigDict(tree)
    if "remat" in config.get("model", {}):      # any type again: True/False or a policy name
        set_remat(config.model, config.model.remat)
    if "sharding_rules" in config:
        config.sharding_rules = tuple(
            (name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in config.sharding_rules)
    return config


def _flatten(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def describe_changes(saved, config):
    """Lines 'key: saved -> now' for keys that differ from `saved` (a config as JSON dict),
    ignoring those that do not change the computation (logging, mesh, workers, ...)."""
    if not saved:
        return []
    now = _flatten(json.loads(config.to_json_best_effort()))
    before = _flatten(_without_moved_keys(json.loads(json.dumps(saved))))
    return [f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(now) | set(before))
            if before.get(k) != now.get(k) and not k.startswith(RESUME_NEUTRAL_KEYS)]
