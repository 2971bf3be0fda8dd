"""The paper's optimiser: AdamW with decoupled weight decay, warm-up + cosine, optional clipping.

Weight decay applies to weight matrices, convolution kernels and embedding tables
(every parameter with ndim >= 2), not to gains (LayerNorm/BatchNorm scales), biases,
the class token or the temperature (all ndim < 2) -- the paper's "all weights that
are not gains or biases", and the same rule as OpenCLIP.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from clip_jax.models import layout
from clip_jax.models.clip import MAX_LOGIT_SCALE


def weight_decay_mask(params):
    """True where weight decay applies."""
    return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)


def make_schedule(optim_cfg, total_steps):
    """Linear warm-up from 0 to `lr`, then cosine decay to 0 at `total_steps`."""
    warmup = min(int(optim_cfg.warmup_steps), int(total_steps))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=optim_cfg.lr, warmup_steps=warmup,
        decay_steps=max(int(total_steps), warmup + 1), end_value=0.0)


def trainable_rows(params, lock_cfg):
    """Per parameter, for locked-image tuning (`config.lock_image`): True (trained), False
    (frozen), or for a tower's stacked blocks (`models.layout`) of which only the last are
    unlocked, a numpy bool vector over its leading 'layers' axis.

    The whole image tower ('visual') is frozen except its last `unlocked_blocks` residual
    blocks (ViT: transformer blocks; ResNet: bottlenecks, in order) and what follows them
    (ViT: ln_post, proj; ResNet: the attention pool). The blocks are counted in the per-block
    view of the parameters, so the rule is the reference's; `params` may be abstract."""
    shapes = jax.tree.map(lambda p: jax.ShapeDtypeStruct(jnp.shape(p), jnp.result_type(p)), params)
    per_block = layout.to_per_block(shapes)
    visual = per_block.get("visual", {})
    blocks = sorted(visual.get("transformer", {}), key=lambda k: int(k.split("_")[-1])) or \
        sorted((k for k in visual if k.startswith("layer")),
               key=lambda k: tuple(int(n) for n in k[len("layer"):].split("_")))
    n = int(lock_cfg.unlocked_blocks)
    trained = set(blocks[len(blocks) - n:]) if n else set()
    heads = {"ln_post", "proj", "attnpool"} if n else set()

    def label(path, _):
        keys = [getattr(k, "key", None) for k in path]
        if not lock_cfg.enabled or keys[0] != "visual":
            return True
        return bool(set(keys[1:3]) & trained) or keys[1] in heads
    rows = layout.to_stacked(jax.tree_util.tree_map_with_path(label, per_block))
    return jax.tree.map(lambda r: bool(np.all(r)) if np.all(r) or not np.any(r) else np.asarray(r), rows)


def frozen_labels(trainable):
    """'frozen' / 'trained' per parameter of a `trainable_rows` tree (partly trained stacked
    blocks are 'trained': `make_optimizer` zeroes their frozen rows' updates)."""
    return jax.tree.map(lambda t: "frozen" if t is False else "trained", trainable)


def _rows(t, x):
    """A `trainable_rows` vector broadcastable against the stacked array `x`."""
    return jnp.asarray(t).reshape((-1,) + (1,) * (x.ndim - 1))


def stop_frozen_gradients(params, trainable):
    """`params` whose frozen parameters (and frozen rows, `trainable_rows`) pass no gradient."""
    def stop(p, t):
        if t is True:
            return p
        if t is False:
            return jax.lax.stop_gradient(p)
        return jnp.where(_rows(t, p), p, jax.lax.stop_gradient(p))
    return jax.tree.map(stop, params, trainable)


def _zero_frozen_rows(trainable):
    """Zero updates on the frozen rows of partly trained stacked parameters (AdamW's weight
    decay would move them otherwise)."""
    def keep(u, t):
        return u if isinstance(t, bool) else u * _rows(t, u).astype(u.dtype)
    return optax.stateless(lambda updates, params=None: jax.tree.map(keep, updates, trainable))


def make_optimizer(optim_cfg, total_steps, trainable=None):
    """Returns (optax transformation, learning-rate schedule). `trainable` (`trainable_rows`):
    frozen parameters get zero updates and no optimiser state; the frozen rows of partly
    trained stacked blocks get zero updates (their state is kept, with zero gradients)."""
    schedule = make_schedule(optim_cfg, total_steps)
    tx = optax.adamw(schedule, b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps,
                     weight_decay=optim_cfg.weight_decay, mask=weight_decay_mask)
    if optim_cfg.grad_clip_norm and optim_cfg.grad_clip_norm > 0:
        tx = optax.chain(optax.clip_by_global_norm(optim_cfg.grad_clip_norm), tx)
    if trainable is not None:
        tx = optax.multi_transform({"trained": tx, "frozen": optax.set_to_zero()},
                                   frozen_labels(trainable))
        if any(not isinstance(t, bool) for t in jax.tree.leaves(trainable)):
            tx = optax.chain(tx, _zero_frozen_rows(trainable))
    return tx, schedule


def clip_logit_scale(params):
    """Clamps the log temperature parameter to [0, log MAX_LOGIT_SCALE] after each update, as
    the paper."""
    if "logit_scale" not in params:
        return params
    return {**params, "logit_scale": jnp.clip(params["logit_scale"], 0.0, math.log(MAX_LOGIT_SCALE))}
