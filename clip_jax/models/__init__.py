"""CLIP models (OpenAI architectures) in Flax linen, with logical sharding names."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.core import meta

from clip_jax import losses, ops, sharding
from clip_jax.models.layers import remat_policy
from clip_jax.models.clip import CLIP

__all__ = ["CLIP", "from_config", "count_params", "input_specs", "encoder_fns", "abstract_variables",
           "init_variables", "variables_init_fn"]


def from_config(config, mesh=None) -> CLIP:
    """The `CLIP` of a run config: the one place a CLIP is constructed (training, loading,
    evaluation, conversion, export, summary, AOT, benchmarks).

    `config` is the whole run config: the architecture comes from `config.model`, the
    parameters the loss needs (SigLIP's `logit_bias`, its initial temperature) from
    `config.loss` (`losses.model_options`), so a model is built the same way wherever
    its checkpoint is read. `mesh`: where the model runs, whose devices choose the kernels
    `config.kernels` asks for (`clip_jax.ops.from_config`); None gives the plain code, for
    what needs only shapes (abstract variables, name tables, FLOP counts)."""
    m = config.model
    v, t = m.vision, m.text
    kind = str(v.kind)
    layers = tuple(int(n) for n in v.layers) if kind == "resnet" else int(v.layers)
    return CLIP(
        embed_dim=int(m.embed_dim),
        vision_kind=kind,
        image_size=int(v.image_size),
        vision_layers=layers,
        vision_width=int(v.width),
        vision_patch_size=int(v.get("patch_size", 0) or 0),
        vision_heads=int(v.heads),
        vocab_size=int(t.vocab_size),
        context_length=int(t.context_length),
        text_width=int(t.width),
        text_heads=int(t.heads),
        text_layers=int(t.layers),
        dtype=jnp.dtype(str(m.get("dtype", "float32"))),
        remat=remat_policy(m.get("remat", False)),
        scan_layers=bool(m.get("scan_layers", False)),
        activation=str(m.get("activation", "quick_gelu")),
        ops=ops.PLAIN if mesh is None else ops.from_config(config.kernels, mesh),
        **losses.model_options(config.loss),
    )


def _size(tree):
    leaves = jax.tree_util.tree_leaves(meta.unbox(tree))
    return int(sum(int(np.prod(x.shape)) for x in leaves))


def count_params(params) -> dict:
    """dict(image=, text=, total=): image = params['visual']; text = everything but
    'visual', 'logit_scale' and 'logit_bias'; total = all. Accepts boxed/abstract trees, or a
    variables dict with a 'params' entry."""
    if "visual" not in params and "params" in params:
        params = params["params"]
    image = _size(params["visual"])
    text = _size({k: v for k, v in params.items() if k not in ("visual", "logit_scale", "logit_bias")})
    return dict(image=image, text=text, total=_size(params))


def input_specs(model_cfg, batch=1):
    """Abstract (images, tokens) inputs of a model: float32 NHWC images, int32 token ids."""
    s = int(model_cfg.vision.image_size)
    return (jax.ShapeDtypeStruct((batch, s, s, 3), jnp.float32),
            jax.ShapeDtypeStruct((batch, int(model_cfg.text.context_length)), jnp.int32))


def encoder_fns(model):
    """Jitted (encode_image(variables, images), encode_text(variables, tokens))."""
    return (jax.jit(lambda v, x: model.apply(v, x, method=model.encode_image)),
            jax.jit(lambda v, t: model.apply(v, t, method=model.encode_text)))


def abstract_variables(model, model_cfg, mesh=None, rules=()):
    """The model's variables as ShapeDtypeStructs (nothing is allocated), carrying their
    `NamedSharding`s on `mesh` when one is given."""
    def init(images, tokens):
        return model.init(jax.random.key(0), images, tokens, train=False)
    if mesh is None:
        return sharding.unbox_abstract(jax.eval_shape(init, *input_specs(model_cfg)))
    with sharding.mesh_context(mesh, rules):
        # Everything inside eval_shape: no array is created, on the mesh's devices or any.
        boxed = jax.eval_shape(init, *input_specs(model_cfg))
        shardings = sharding.logical_to_sharding(boxed, mesh, rules)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        sharding.unbox_abstract(boxed), shardings)


def variables_init_fn(model, model_cfg):
    """rng -> fresh variables (unboxed), to trace: inside a sharded `jit` or a larger init."""
    def init(rng):
        images, tokens = (jnp.zeros(x.shape, x.dtype) for x in input_specs(model_cfg))
        return nn.unbox(model.init(rng, images, tokens, train=False))
    return init


def init_variables(model, model_cfg, rng, mesh=None, rules=()):
    """Freshly initialised variables; on `mesh`, made in place by `jit(init, out_shardings=...)`
    so that no device ever holds them whole."""
    init = variables_init_fn(model, model_cfg)
    if mesh is None:
        return jax.jit(init)(rng)
    shardings = jax.tree.map(lambda x: x.sharding, abstract_variables(model, model_cfg, mesh, rules))
    with sharding.mesh_context(mesh, rules):
        return jax.jit(init, out_shardings=shardings)(rng)
