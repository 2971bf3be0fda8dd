"""The paper's optimiser: AdamW with decoupled weight decay, warm-up + cosine, optional clipping.

Weight decay applies to weight matrices, convolution kernels and embedding tables
(every parameter with ndim >= 2), not to gains (LayerNorm/BatchNorm scales), biases,
the class token or the temperature (all ndim < 2) -- the paper's "all weights that
are not gains or biases", and the same rule as OpenCLIP.
"""
import math

import jax
import jax.numpy as jnp
import optax

MAX_LOGIT_SCALE = math.log(100.0)


def weight_decay_mask(params):
    """True where weight decay applies."""
    return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)


def make_schedule(optim_cfg, total_steps):
    """Linear warm-up from 0 to `lr`, then cosine decay to 0 at `total_steps`."""
    warmup = min(int(optim_cfg.warmup_steps), int(total_steps))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=optim_cfg.lr, warmup_steps=warmup,
        decay_steps=max(int(total_steps), warmup + 1), end_value=0.0)


def make_optimizer(optim_cfg, total_steps):
    """Returns (optax transformation, learning-rate schedule)."""
    schedule = make_schedule(optim_cfg, total_steps)
    adamw = optax.adamw(schedule, b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps,
                        weight_decay=optim_cfg.weight_decay, mask=weight_decay_mask)
    if optim_cfg.grad_clip_norm and optim_cfg.grad_clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(optim_cfg.grad_clip_norm), adamw), schedule
    return adamw, schedule


def clip_logit_scale(params):
    """Clamps the log temperature parameter to [0, log 100] after each update, as the paper."""
    if "logit_scale" not in params:
        return params
    return {**params, "logit_scale": jnp.clip(params["logit_scale"], 0.0, MAX_LOGIT_SCALE)}
