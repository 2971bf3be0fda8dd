"""Contrastive losses. Each loss is small and separate; the distributed exchange is isolated.

`clip_loss_naive` is the paper's pseudo-code on the full batch (the reference).
`clip_loss` is the sharded version the trainer uses: each batch shard computes its
local rows of the logits against the all-gathered embeddings of the other tower,
so a device holds B_local x B logits, never B x B. The transpose of `all_gather`
(a reduce-scatter) makes the gradients exact; tests check both against the naive loss.
"""
import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P


def clip_loss_naive(image_embeds, text_embeds, logit_scale):
    """Symmetric InfoNCE on the whole batch: mean of image->text and text->image CE."""
    logits = logit_scale * image_embeds @ text_embeds.T
    labels = jnp.arange(logits.shape[0])
    loss_i = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    loss_t = optax.softmax_cross_entropy_with_integer_labels(logits.T, labels).mean()
    return (loss_i + loss_t) / 2


def clip_loss_local(image_local, text_local, logit_scale, axis_name):
    """Per-shard part of the sharded loss; call inside shard_map over `axis_name`.

    Returns the global loss (already summed over shards with psum).
    """
    n_local = image_local.shape[0]
    all_image = jax.lax.all_gather(image_local, axis_name, tiled=True)
    all_text = jax.lax.all_gather(text_local, axis_name, tiled=True)
    n_global = all_image.shape[0]
    labels = jax.lax.axis_index(axis_name) * n_local + jnp.arange(n_local)
    logits_i = logit_scale * image_local @ all_text.T   # [B_local, B]: image -> text rows
    logits_t = logit_scale * text_local @ all_image.T   # [B_local, B]: text -> image rows
    ce = optax.softmax_cross_entropy_with_integer_labels
    local_sum = ce(logits_i, labels).sum() + ce(logits_t, labels).sum()
    return jax.lax.psum(local_sum, axis_name) / (2 * n_global)


def clip_loss(image_embeds, text_embeds, logit_scale, mesh, batch_axes):
    """Sharded symmetric InfoNCE over the mesh's batch axes (equals `clip_loss_naive`)."""
    if not batch_axes:
        return clip_loss_naive(image_embeds, text_embeds, logit_scale)
    axes = tuple(batch_axes)
    spec = P(axes, None)
    fn = jax.shard_map(
        lambda i, t, s: clip_loss_local(i, t, s, axes),
        mesh=mesh, in_specs=(spec, spec, P()), out_specs=P())
    return fn(image_embeds, text_embeds, logit_scale)


LOSSES = {"clip": clip_loss}


def get_loss(name):
    if name not in LOSSES:
        raise ValueError(f"config.loss.name={name!r} is not one of {sorted(LOSSES)}")
    return LOSSES[name]
