"""Pretrained weights in and out: OpenAI / OpenCLIP PyTorch checkpoints <-> clip_jax.

    python -m clip_jax.convert ViT-B-32.pt --out converted/vit_b32
    python -m clip_jax.convert --to open_clip runs/smoke --out exported/model.safetensors

Import reads an OpenAI TorchScript archive or state_dict, an OpenCLIP state_dict or
training checkpoint (`state_dict` entry, `module.` prefixes), or `.safetensors`, or a
Hugging Face style directory holding one of them and `open_clip_config.json` (see
`pytorch_io`; torch is not needed). The architecture is inferred from the tensor shapes as
OpenAI's `build_model` does (heads = width / 64; the ResNet attention pool width * 32 / 64)
unless `open_clip_config.json` beside the weights says otherwise; `--arch NAME` insists on
one of the paper's nine. The activation cannot be seen in the weights: OpenAI's models
and OpenCLIP's `-quickgelu` ones use QuickGELU (the default), OpenCLIP's others exact GELU
(`--activation gelu`, or taken from `open_clip_config.json`).

The output directory is a parameters-only Orbax checkpoint plus `config.json` (the
model, float32, the loss whose parameters the weights carry -- 'siglip' with a
`logit_bias` -- and the CLIP BPE tokenizer) and `convert.json` (what was converted): it
opens with `clip_jax.load(DIR)` and fine-tunes with `--config=configs/finetune.py:DIR`
or `config.init_from=DIR`.

Export writes the state_dict OpenCLIP's `CLIP` loads (`.safetensors` needs no torch;
`.pt`/`.bin` need it) and `open_clip_config.json` beside it, so that
`open_clip.create_model_and_transforms('local-dir:' + dirname)` builds and loads it.

Names and layouts (BUILD_NOTES.md has the table): torch Linear weights are [out, in] and
ours [in, out]; convolutions OIHW vs HWIO; attention's fused `in_proj_weight` [3W, W] is
our separate query/key/value kernels [W, heads, head_dim]; the output projection
[W, W] is our [heads, head_dim, W]; LayerNorm/BatchNorm weight is our scale, BatchNorm
running_mean/var our batch_stats mean/var.
"""
import argparse
import dataclasses
import functools
import json
import re
from typing import Optional, Tuple

import jax
import numpy as np

from clip_jax import checkpoint, cli, config_lib, inference, losses, models, paths, pytorch_io
from clip_jax.data.pipeline import CLIP_MEAN, CLIP_STD
from clip_jax.models import abstract_variables, count_params, layout

# Tensors a reference checkpoint may hold that are not model weights.
IGNORED = re.compile(r"(^|\.)attn_mask$|\.num_batches_tracked$|^(input_resolution|context_length|vocab_size)$")
FUSED = {"query": 0, "key": 1, "value": 2}          # rows of torch's in_proj_weight
POOL_PROJ = {"query": "q_proj", "key": "k_proj", "value": "v_proj", "out": "c_proj"}


class ConvertError(ValueError):
    """The checkpoint cannot be converted; the message names the file and tensor."""


# ----------------------------------------------------------------------- architecture

def _count(tensors, prefix):
    """Number of distinct integer ids right after `prefix` in the tensor names."""
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    return len({m.group(1) for m in map(pat.match, tensors) if m})


def _need(tensors, name, source):
    if name not in tensors:
        sample = ", ".join(sorted(tensors)[:5])
        raise ConvertError(f"{source}: not a CLIP checkpoint of the paper's layout: no tensor "
                           f"'{name}' (it has {len(tensors)} tensors, e.g. {sample})")
    return tensors[name]


def infer_model_config(tensors, source="checkpoint", open_clip_cfg=None):
    """The model ConfigDict (float32, no remat, not scanned) whose parameters these tensors are.

    Shapes decide everything but the heads (and the activation), which follow the
    reference's convention unless `open_clip_cfg` (an open_clip_config.json `model_cfg`)
    gives them."""
    oc = open_clip_cfg or {}
    if open_clip_cfg is not None:
        _check_open_clip_cfg(open_clip_cfg, source)
    vcfg, tcfg = oc.get("vision_cfg", {}), oc.get("text_cfg", {})
    head_width = int(vcfg.get("head_width", 64))
    # OpenCLIP's defaults when its config is present: 8 text heads, GELU unless quick_gelu.
    text_heads = tcfg.get("heads", 8) if open_clip_cfg is not None else None
    quick = bool(oc.get("quick_gelu", False)) if open_clip_cfg is not None else True
    text_width = int(_need(tensors, "ln_final.weight", source).shape[0])
    vocab, _ = _need(tensors, "token_embedding.weight", source).shape
    context, _ = _need(tensors, "positional_embedding", source).shape
    if "visual.proj" in tensors:
        conv = _need(tensors, "visual.conv1.weight", source)
        width, patch = int(conv.shape[0]), int(conv.shape[-1])
        grid = int(round((_need(tensors, "visual.positional_embedding", source).shape[0] - 1) ** 0.5))
        vision = dict(kind="vit", image_size=patch * grid, layers=_count(tensors, "visual.transformer.resblocks."),
                      width=width, patch_size=patch, heads=width // head_width)
    else:
        width = int(_need(tensors, "visual.layer1.0.conv1.weight", source).shape[0])
        grid = int(round((_need(tensors, "visual.attnpool.positional_embedding", source).shape[0] - 1) ** 0.5))
        vision = dict(kind="resnet", image_size=grid * 32,
                      layers=tuple(_count(tensors, f"visual.layer{s}.") for s in range(1, 5)),
                      width=width, patch_size=0, heads=width * 32 // head_width)
    model = dict(
        embed_dim=int(_need(tensors, "text_projection", source).shape[1]),
        vision=vision,
        text=dict(vocab_size=int(vocab), context_length=int(context), width=text_width,
                  heads=int(text_heads or text_width // 64),
                  layers=_count(tensors, "transformer.resblocks.")),
        dtype="float32", remat=config_lib.remat_field("none"), scan_layers=False,
        activation="quick_gelu" if quick else "gelu")
    import ml_collections
    return ml_collections.ConfigDict(model)


# open_clip_config.json options: those that shape what we read from the tensors, and the
# others' values that describe the paper's architecture (anything else is refused).
_OPEN_CLIP_READ = {"embed_dim", "quick_gelu", "vision_cfg", "text_cfg", "custom_text",
                   "image_size", "layers", "width", "patch_size", "head_width", "heads",
                   "context_length", "vocab_size", "patch_dropout", "timm_model_name",
                   "init_logit_scale", "init_logit_bias"}
_OPEN_CLIP_DEFAULTS = {"mlp_ratio": 4.0, "ls_init_value": None, "attentional_pool": False,
                       "no_ln_pre": False, "final_ln_after_pool": False, "output_tokens": False,
                       "proj_bias": False, "embed_cls": False, "pad_id": 0, "no_causal_mask": False,
                       "pool_type": ("tok", "argmax"), "cast_dtype": None, "hf_tokenizer_name": None, "tokenizer_kwargs": None,
                       "act_kwargs": None, "norm_kwargs": None, "output_dim": None}


def _check_open_clip_cfg(cfg, source):
    """Refuses open_clip_config.json options that make a model other than the paper's."""
    for where, tree in (("", cfg), ("vision_cfg.", cfg.get("vision_cfg", {})),
                        ("text_cfg.", cfg.get("text_cfg", {}))):
        for key, value in tree.items():
            if key in _OPEN_CLIP_READ and (key != "timm_model_name" or not value):
                continue
            ok = _OPEN_CLIP_DEFAULTS.get(key, object())
            if value == ok or (isinstance(ok, tuple) and value in ok) or (value is None and key in _OPEN_CLIP_DEFAULTS):
                continue
            raise ConvertError(f"{source}: open_clip_config.json sets {where}{key}={value!r}, which "
                               "clip_jax's models do not implement")


def _squash(name):
    return re.sub(r"[^a-z0-9]", "", name.lower().replace("px", ""))


def paper_name(model_cfg):
    """'vit_b32' etc. when `model_cfg` is one of the paper's nine shapes, else None."""
    for name in config_lib.PAPER_MODELS:
        ref = config_lib.model_config(name)
        if _shape_dict(ref) == _shape_dict(model_cfg):
            return name
    return None


def arch_config(arch):
    """--arch NAME (ours 'vit_b32', OpenCLIP 'ViT-B-32', OpenAI 'ViT-B/32', 'ViT-L/14@336px')."""
    names = {_squash(n): n for n in config_lib.PAPER_MODELS}
    name = names.get(_squash(arch))
    if name is None:
        raise ConvertError(f"--arch {arch!r}: not one of the paper's architectures "
                           f"({', '.join(config_lib.PAPER_MODELS)})")
    cfg = config_lib.model_config(name)
    cfg.dtype = "float32"
    config_lib.set_remat(cfg, "none")
    return cfg


def _shape_dict(model_cfg):
    d = json.loads(model_cfg.to_json())
    for k in ("dtype", "remat", "scan_layers", "activation"):
        d.pop(k, None)
    d["vision"]["layers"] = list(d["vision"]["layers"]) if isinstance(d["vision"]["layers"], (list, tuple)) \
        else d["vision"]["layers"]
    return d


# ----------------------------------------------------------------------- the name table

@dataclasses.dataclass(frozen=True)
class Entry:
    """One of our arrays <-> one torch tensor (or a third of a fused one)."""
    collection: str           # 'params' | 'batch_stats'
    path: Tuple[str, ...]     # our path inside the collection
    torch_name: str
    layout: str               # same | dense | conv | heads_in | heads_bias | heads_out
    part: Optional[int] = None   # 0/1/2: the q/k/v third of a fused in_proj tensor


def _entry(collection, path):
    parts = list(path[1:] if path[0] == "text" else path)
    leaf = parts.pop()
    names, pool = [], "attnpool" in parts
    for p in parts:
        m = re.fullmatch(r"(resblocks|layer\d)_(\d+)", p)
        names.extend([m.group(1), m.group(2)] if m else
                     {"downsample_conv": ["downsample", "0"], "downsample_bn": ["downsample", "1"]}.get(p, [p]))
    layout, part = "same", None
    if collection == "batch_stats":
        leaf = {"mean": "running_mean", "var": "running_var"}[leaf]
    elif leaf in ("scale", "embedding"):
        leaf = "weight"
    elif leaf == "kernel":
        leaf = "weight"
        layout = "conv" if len(parts) and ("conv" in parts[-1]) else "dense"
    if len(names) >= 2 and names[-2] == "attn":
        proj = names.pop()
        if pool:            # ModifiedResNet's attention pool: separate q/k/v/c projections
            names[-1] = POOL_PROJ[proj]
        elif proj == "out":
            names.append("out_proj")
        else:
            part = FUSED[proj]
            leaf = f"in_proj_{leaf}"
        layout = {"weight": "heads_out" if proj == "out" else "heads_in",
                  "bias": "same" if proj == "out" else "heads_bias"}[leaf.rsplit("_", 1)[-1]]
    return Entry(collection, tuple(path), ".".join(names + [leaf]), layout, part)


def name_table(config):
    """Entries for every array of the model the run config `config` builds
    (`models.from_config`, abstractly): its architecture and the parameters its loss
    needs (SigLIP's `logit_bias`)."""
    return _name_table(config.model.to_json(sort_keys=True), config.loss.to_json(sort_keys=True))


@functools.lru_cache(maxsize=16)
def _name_table(model_json, loss_json):
    config = config_lib.from_json({"model": json.loads(model_json), "loss": json.loads(loss_json)})
    # Named in the per-block view (`models.layout`): one entry per block, as the reference's.
    variables = layout.to_per_block(abstract_variables(models.from_config(config), config.model))
    table = []
    for collection in ("params", "batch_stats"):
        leaves = jax.tree_util.tree_flatten_with_path(variables.get(collection, {}))[0]
        for keys, leaf in leaves:
            path = tuple(k.key for k in keys)
            table.append((_entry(collection, path), tuple(leaf.shape)))
    return tuple(table)


def _from_torch(x, layout, shape):
    if layout == "conv":
        return x.transpose(2, 3, 1, 0)
    if layout in ("dense", "heads_in", "heads_out"):   # [out, in] -> [in, out], heads split:
        return x.T.reshape(shape)       # [N*H, in] -> [in, N, H]; [out, N*H] -> [N, H, out]
    return x.reshape(shape)             # same, heads_bias


def _to_torch(x, layout):
    if layout == "dense":
        return x.T
    if layout == "conv":
        return x.transpose(3, 2, 0, 1)
    if layout == "heads_in":
        return x.reshape(x.shape[0], -1).T
    if layout == "heads_out":
        return x.reshape(-1, x.shape[-1]).T
    if layout == "heads_bias":
        return x.reshape(-1)
    return x


def _set(tree, path, value):
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def from_torch(tensors, config, source="checkpoint"):
    """{'params': ..., 'batch_stats': ...} (float32 numpy, the blocks stacked as the model
    stores them) from reference-named `tensors`, for the model of the run config `config`.

    Raises ConvertError listing every missing, unexpected or misshapen tensor."""
    out = {"params": {}, "batch_stats": {}}
    used, problems = set(), []
    for entry, shape in name_table(config):
        if entry.torch_name not in tensors:
            problems.append(f"missing {entry.torch_name}")
            continue
        x = np.asarray(tensors[entry.torch_name])   # cast once it fits: no copy of a misfit
        used.add(entry.torch_name)
        if entry.part is not None:
            if x.ndim == 0 or x.shape[0] % 3:
                problems.append(f"{entry.torch_name}: shape {list(x.shape)} is not 3 stacked projections")
                continue
            x = np.split(x, 3, axis=0)[entry.part]
        try:
            value = _from_torch(x, entry.layout, shape)
        except ValueError:
            value = None
        if value is None or value.shape != shape:
            problems.append(f"{entry.torch_name}: shape {list(x.shape)} does not fit {'/'.join(entry.path)} "
                            f"{list(shape)}")
            continue
        _set(out[entry.collection], entry.path, np.array(value, np.float32, order="C"))
    extra = sorted(k for k in tensors if k not in used and not IGNORED.search(k))
    problems += [f"unexpected {k}" for k in extra]
    if problems:
        more = f" (and {len(problems) - 8} more)" if len(problems) > 8 else ""
        raise ConvertError(f"{source} does not fit the model {_describe(config.model)}: "
                           + "; ".join(problems[:8]) + more)
    return layout.to_stacked(out)


def to_torch(variables, config):
    """The reference state_dict {name: float32 array} of our `variables` (of the model of the
    run config `config`; either block layout, `models.layout`)."""
    variables = layout.to_per_block(variables)
    out, fused = {}, {}
    for entry, _ in name_table(config):
        tree = variables.get(entry.collection, {})
        for k in entry.path:
            tree = tree[k]
        x = _to_torch(np.asarray(jax.device_get(tree), np.float32), entry.layout)
        if entry.part is None:
            out[entry.torch_name] = x
        else:
            fused.setdefault(entry.torch_name, [None] * 3)[entry.part] = x
        if entry.torch_name.endswith("running_var"):
            out[entry.torch_name[:-len("running_var")] + "num_batches_tracked"] = np.zeros((), np.int64)
    for name, parts in fused.items():
        out[name] = np.concatenate(parts, axis=0)
    return dict(sorted(out.items()))


def _describe(model_cfg):
    v, t = model_cfg.vision, model_cfg.text
    name = paper_name(model_cfg)
    shape = (f"vit width {v.width} x {v.layers} patch {v.patch_size}" if v.kind == "vit"
             else f"resnet width {v.width} layers {list(v.layers)}") + \
        f" @{v.image_size}px, text width {t.width} x {t.layers}, embed {model_cfg.embed_dim}"
    return f"{name} ({shape})" if name else f"custom ({shape})"


# ----------------------------------------------------------------------- files

def find_weights(path):
    """(weights file, open_clip_config.json model_cfg or None) for a file or a directory."""
    path = paths.resolve(path)
    directory = path if paths.isdir(path) else paths.dirname(path)
    if paths.isdir(path):
        found = sorted(f for f in paths.listdir(path) if f.endswith(pytorch_io.WEIGHT_SUFFIXES))
        found.sort(key=lambda f: (not f.endswith(".safetensors"), f))
        if not found:
            raise ConvertError(f"{path}: a directory without a weights file "
                               f"({', '.join(pytorch_io.WEIGHT_SUFFIXES)})")
        path = paths.join(path, found[0])
    cfg_path = paths.join(directory, "open_clip_config.json")
    model_cfg = None
    if paths.isfile(cfg_path):
        try:
            model_cfg = inference.read_json_object(cfg_path).get("model_cfg")
        except ValueError as e:
            raise ConvertError(str(e)) from None
        parts = {"model_cfg": model_cfg}
        if isinstance(model_cfg, dict):
            parts.update({f"model_cfg.{k}": model_cfg.get(k) for k in ("vision_cfg", "text_cfg")})
        for where, value in parts.items():
            if value is not None and not isinstance(value, dict):
                raise ConvertError(f"{cfg_path}: expected {where} to be a JSON object, found "
                                   f"{json.dumps(value)[:60]}")
    return path, model_cfg


def load_reference_tensors(path, max_bytes=None):
    """The checkpoint's model tensors under reference names (prefixes removed); `max_bytes`:
    see `pytorch_io.read_tensors`."""
    try:
        tensors = pytorch_io.read_tensors(path, max_bytes)
    except pytorch_io.CheckpointFormatError as e:
        raise ConvertError(str(e)) from None
    if any(k.startswith("state_dict.") for k in tensors):   # an OpenCLIP training checkpoint
        tensors = {k[len("state_dict."):]: v for k, v in tensors.items() if k.startswith("state_dict.")}
    if tensors and all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module."):]: v for k, v in tensors.items()}
    if "text.token_embedding.weight" in tensors:   # OpenCLIP's CustomTextCLIP naming
        tensors = {k[len("text."):] if k.startswith("text.") else k: v for k, v in tensors.items()}
    return tensors


def converted_loss(tensors, open_clip_cfg=None):
    """The loss whose model the weights are: a learned logit bias (OpenCLIP's
    `init_logit_bias`) is a parameter of the SigLIP loss's models (`losses.model_options`),
    so weights with one are 'siglip', the others 'clip'."""
    has_bias = "logit_bias" in tensors or (open_clip_cfg or {}).get("init_logit_bias") is not None
    return "siglip" if has_bias else "clip"


def converted_config(model_cfg, loss="clip"):
    """The full config saved with converted weights: the model, the loss whose parameters they
    carry (`converted_loss`), and the CLIP BPE tokenizer. `clip_jax.load` builds the model
    from it (`models.from_config`)."""
    config = config_lib.base_config()
    config.model = model_cfg
    config.loss.name = loss
    config.data.tokenizer = "clip_bpe"
    config.data.tokenizer_path = ""     # the vendored reference merges file
    return config


def import_checkpoint(src, out, arch=None, activation=None, max_bytes=None):
    """Converts the reference checkpoint `src` into the directory `out` (written last, once
    the weights are read and fit); returns convert.json."""
    if paths.exists(out) and (not paths.isdir(out) or paths.listdir(out)):
        raise ConvertError(f"--out {out}: already exists and is not empty; choose a new directory")
    weights, open_clip_cfg = find_weights(src)
    tensors = load_reference_tensors(paths.local_copy(weights), max_bytes)   # memory-mapped
    try:   # the shapes are the file's too: nonsense ones are a refusal, not a traceback
        model_cfg = infer_model_config(tensors, weights, open_clip_cfg)
        if arch:
            wanted = arch_config(arch)
            if _shape_dict(wanted) != _shape_dict(model_cfg):
                raise ConvertError(f"{weights}: --arch {arch} is {_describe(wanted)}, but the tensors "
                                   f"are {_describe(model_cfg)}")
            wanted.activation = model_cfg.activation
            model_cfg = wanted
        if activation:
            model_cfg.activation = activation
        config = converted_config(model_cfg, converted_loss(tensors, open_clip_cfg))
        variables = from_torch(tensors, config, weights)
    except ConvertError:
        raise
    except Exception as e:
        raise ConvertError(f"{weights}: its tensor shapes are not a CLIP's ({type(e).__name__}: {e})") from None
    checkpoint.save_params(out, variables["params"], variables["batch_stats"], config=config)
    report = dict(source=weights, architecture=paper_name(model_cfg) or "custom",
                  description=_describe(model_cfg), activation=model_cfg.activation,
                  loss=config.loss.name, tensors=len(tensors), arrays=len(name_table(config)),
                  parameters=count_params(variables["params"])["total"])
    paths.write_text(paths.join(out, "convert.json"), json.dumps(report, indent=2))
    return report


def open_clip_config(config):
    """open_clip_config.json's content for our `config` (OpenCLIP's model_cfg names)."""
    m, v, t = config.model, config.model.vision, config.model.text
    if v.kind == "vit":
        head_width, rem = divmod(int(v.width), int(v.heads))
        vision = dict(image_size=int(v.image_size), layers=int(v.layers), width=int(v.width),
                      patch_size=int(v.patch_size), head_width=head_width)
    else:
        head_width, rem = divmod(int(v.width) * 32, int(v.heads))
        vision = dict(image_size=int(v.image_size), layers=[int(n) for n in v.layers],
                      width=int(v.width), head_width=head_width)
    if rem:
        raise ConvertError(f"model.vision.heads={v.heads}: OpenCLIP cannot express it (head width "
                           "must divide the width)")
    model_cfg = dict(
        embed_dim=int(m.embed_dim), quick_gelu=m.get("activation", "quick_gelu") == "quick_gelu",
        vision_cfg=vision,
        text_cfg=dict(context_length=int(t.context_length), vocab_size=int(t.vocab_size),
                      width=int(t.width), heads=int(t.heads), layers=int(t.layers)))
    # A model with a learned logit bias (the SigLIP loss's): OpenCLIP makes the parameter
    # when its initial value is set (the exported value replaces it).
    bias = losses.model_options(config.loss).get("logit_bias_init")
    if bias is not None:
        model_cfg["init_logit_bias"] = bias
    preprocess = dict(mean=list(CLIP_MEAN), std=list(CLIP_STD), interpolation="bicubic",
                      resize_mode="shortest")
    return {"model_cfg": model_cfg, "preprocess_cfg": preprocess}


def export_open_clip(run, out):
    """Writes `out` (a state_dict OpenCLIP loads) and open_clip_config.json beside it."""
    config, _, _ = inference.locate(run)
    # The arrays as numpy (no sharding), checked against their checksums like any load.
    target = abstract_variables(models.from_config(config), config.model)
    variables, report = checkpoint.load_model_variables(
        run, {"params": target["params"], "batch_stats": target.get("batch_stats", {})}, what="SRC")
    if report["missing"]:
        raise ConvertError(f"{report['source']} lacks {len(report['missing'])} of the model's "
                           f"arrays, e.g. {report['missing'][0]}")
    tensors = to_torch(variables, config)
    cfg = open_clip_config(config)
    try:
        with paths.staged(out) as local:
            pytorch_io.write_state_dict(tensors, local)
    except pytorch_io.CheckpointFormatError as e:
        raise ConvertError(str(e)) from None
    paths.write_text(paths.join(paths.dirname(out), "open_clip_config.json"), json.dumps(cfg, indent=2))
    return config, cfg


# ----------------------------------------------------------------------- command line

def _byte_count(text):
    """'2000000', '64G', '1.5T' -> bytes (argparse type)."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGT]?)i?B?", text.strip(), re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a byte count (e.g. 2000000, 64G)")
    return int(float(m.group(1)) * 1024 ** " KMGT".index(m.group(2).upper() or " "))


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m clip_jax.convert", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Import: SRC is a .pt/.pth/.bin/.safetensors file or a directory holding one "
               "(and optionally open_clip_config.json). Export: SRC is a run's workdir, a step "
               "directory or converted weights.")
    parser.add_argument("src", metavar="SRC", help="the checkpoint to convert")
    parser.add_argument("--out", required=True,
                        help="import: a new directory; export: the state_dict file to write "
                             "(.safetensors, or .pt/.bin with torch installed); "
                             "open_clip_config.json is written beside it")
    parser.add_argument("--to", choices=("clip_jax", "open_clip"), default="clip_jax",
                        help="clip_jax (default): import a PyTorch checkpoint; open_clip: export "
                             "a clip_jax model as an OpenCLIP state_dict")
    parser.add_argument("--arch", help="import: insist on one of the paper's architectures "
                                       "(e.g. RN50, ViT-B/32, vit_l14_336); default: inferred")
    parser.add_argument("--activation", choices=("quick_gelu", "gelu"),
                        help="import: the transformer MLP activation, which the weights cannot "
                             "show: quick_gelu (default: OpenAI's models, OpenCLIP's -quickgelu "
                             "ones) or gelu (OpenCLIP's other models)")
    parser.add_argument("--max-bytes", type=_byte_count, metavar="BYTES",
                        help="import: refuse a checkpoint whose tensors, as arrays, or whose "
                             "compressed members, inflated, exceed BYTES (e.g. 64G; default: twice "
                             "the file's size, which every file torch writes meets; the pickle's "
                             "opcode and object caps grow with it). Checkpoints are untrusted input: "
                             "malformed ones are refused with the reason, nothing is run")
    args = parser.parse_args(argv)
    with cli.stop_on(ConvertError, ValueError, OSError, checkpoint.CheckpointError):
        if args.to == "open_clip":
            if args.arch or args.activation or args.max_bytes:
                parser.error("--arch, --activation and --max-bytes apply to import only")
            config, cfg = export_open_clip(args.src, args.out)
            print(f"wrote {args.out} and open_clip_config.json beside it ({_describe(config.model)})")
            print("load it in OpenCLIP with: open_clip.create_model_and_transforms("
                  f"'local-dir:{paths.dirname(args.out)}')")
            if config.data.tokenizer != "clip_bpe":
                print(f"note: this model was trained with the {config.data.tokenizer} tokenizer; "
                      "tokenise with clip_jax (python -m clip_jax.tokenizer encode), not OpenCLIP's")
        else:
            report = import_checkpoint(args.src, args.out, args.arch, args.activation, args.max_bytes)
            print(f"converted {report['source']}: {report['description']}, "
                  f"{report['parameters']:,} parameters, activation {report['activation']}")
            print(f"wrote {args.out} (clip_jax.load('{args.out}'), or "
                  f"--config=configs/finetune.py:{args.out} to fine-tune)")


if __name__ == "__main__":
    main()
