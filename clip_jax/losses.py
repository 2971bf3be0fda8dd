"""Contrastive losses. Each loss is small and separate; the distributed exchange is isolated.

`clip_loss_naive` is the paper's pseudo-code on the full batch (the reference).
`clip_loss` is the sharded version the trainer uses: each batch shard computes its
local rows of the logits against the all-gathered embeddings of the other tower,
so a device holds B_local x B logits, never B x B. The transpose of `all_gather`
(a reduce-scatter) makes the gradients exact; tests check both against the naive loss.

`clip_loss_blockwise` is the same value and sharding, but each row's log-sum-exp over the
B gathered columns is streamed over column blocks (online max + sum, `lax.scan`), with a
`custom_vjp` backward that recomputes each block's logits from the saved row LSE: a device
holds B_local x block logits, forward and backward.

`siglip_loss_naive` / `siglip_loss` are the pairwise sigmoid loss of SigLIP (Zhai et al.
2023). The sharded one never gathers the text embeddings: text blocks travel round a ring
of the batch shards (`ppermute`), each device scoring its images against the block it holds
(B_local x B_local logits); its `custom_vjp` backward runs the ring again, the text
gradients travelling with their blocks back to their owners.

`LOSSES` is the registry, one `Loss` entry per `config.loss.name`: the function, the model
options it needs (`models.from_config` builds SigLIP's model with its learned bias) and the
`config.loss` keys it reads with their checks (`check`, which config validation and
`make_loss` both call). Nothing else dispatches on the name. `make_loss(config.loss, mesh,
batch_axes)` gives the trainer one signature for all of them:
fn(image_embeds, text_embeds, logit_scale, logit_bias) -> scalar. `logit_scale` is the
model's output, exp(t') (the temperature's inverse), in every loss.
"""
import dataclasses
import functools
import math
from typing import Any, Callable, Mapping, Tuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P


# ---------------------------------------------------------------- CLIP (softmax) losses

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


def _on_batch_shards(local_fn, mesh, batch_axes, n_sharded, n_replicated):
    """shard_map of `local_fn` over the batch axes: the first `n_sharded` arguments are
    split along their leading dimension, the next `n_replicated` are replicated; the
    result is a replicated scalar."""
    spec = P(tuple(batch_axes), None)
    return jax.shard_map(local_fn, mesh=mesh, in_specs=(spec,) * n_sharded + (P(),) * n_replicated,
                         out_specs=P())


def clip_loss(image_embeds, text_embeds, logit_scale, mesh, batch_axes):
    """Sharded symmetric InfoNCE over the mesh's batch axes (equals `clip_loss_naive`)."""
    if not batch_axes:
        return clip_loss_naive(image_embeds, text_embeds, logit_scale)
    axes = tuple(batch_axes)
    fn = _on_batch_shards(lambda i, t, s: clip_loss_local(i, t, s, axes), mesh, axes, 2, 1)
    return fn(image_embeds, text_embeds, logit_scale)


# ------------------------------------------------- blockwise (streaming log-sum-exp) CLIP

def _column_blocks(cols, block_size):
    """cols [B, d] -> ([n_blocks, block, d] zero-padded, [n_blocks, block] validity mask)."""
    n, d = cols.shape
    block = min(block_size, n)
    n_blocks = -(-n // block)
    pad = n_blocks * block - n
    blocks = jnp.pad(cols, ((0, pad), (0, 0))).reshape(n_blocks, block, d)
    valid = (jnp.arange(n_blocks * block) < n).reshape(n_blocks, block)
    return blocks, valid


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def row_logsumexp(rows, cols, block_size):
    """log(sum_j exp(<rows_i, cols_j>)) for each row, streamed over column blocks of
    `block_size`: memory O(rows x block), not O(rows x cols), forward and backward."""
    return _row_lse_fwd(rows, cols, block_size)[0]


def _row_lse_fwd(rows, cols, block_size):
    blocks, valid = _column_blocks(cols, block_size)

    def step(carry, block_and_mask):
        running_max, running_sum = carry
        block, mask = block_and_mask
        logits = jnp.where(mask, rows @ block.T, -jnp.inf)      # [rows, block]
        new_max = jnp.maximum(running_max, logits.max(axis=1))   # finite: a block has >= 1 column
        running_sum = (running_sum * jnp.exp(running_max - new_max)
                       + jnp.exp(logits - new_max[:, None]).sum(axis=1))
        return (new_max, running_sum), None

    # *_like keeps the shard_map type of `rows` (varying over the batch axes), as scan
    # carries must: a fresh jnp.full would be invariant.
    init = (jnp.full_like(rows[:, 0], -jnp.inf), jnp.zeros_like(rows[:, 0]))
    (row_max, row_sum), _ = jax.lax.scan(step, init, (blocks, valid))
    lse = row_max + jnp.log(row_sum)
    return lse, (rows, cols, lse)


def _row_lse_bwd(block_size, residuals, g):
    rows, cols, lse = residuals
    blocks, valid = _column_blocks(cols, block_size)

    def step(d_rows, block_and_mask):
        block, mask = block_and_mask
        # d lse_i / d logit_ij = softmax_ij, recomputed from the saved lse; padding gives 0.
        probs = jnp.where(mask, jnp.exp(rows @ block.T - lse[:, None]), 0.0)
        d_logits = g[:, None] * probs                            # [rows, block]
        return d_rows + d_logits @ block, d_logits.T @ rows

    d_rows, d_blocks = jax.lax.scan(step, jnp.zeros_like(rows), (blocks, valid))
    d_cols = d_blocks.reshape(-1, cols.shape[1])[:cols.shape[0]]
    return d_rows, d_cols


row_logsumexp.defvjp(_row_lse_fwd, _row_lse_bwd)


def clip_loss_blockwise_local(image_local, text_local, logit_scale, axis_name, block_size):
    """Per-shard part of `clip_loss_blockwise`; call inside shard_map over `axis_name`
    (None: no sharding, the whole batch is local). Returns the global loss."""
    gather = (lambda x: x) if axis_name is None else (
        lambda x: jax.lax.all_gather(x, axis_name, tiled=True))
    all_image, all_text = gather(image_local), gather(text_local)
    # Both directions are "local rows against all gathered columns", so only row LSEs are
    # needed. The scale goes into the rows, so its gradient comes from ordinary autodiff.
    lse_i = row_logsumexp(logit_scale * image_local, all_text, block_size)   # image -> text
    lse_t = row_logsumexp(logit_scale * text_local, all_image, block_size)   # text -> image
    positives = logit_scale * jnp.sum(image_local * text_local, axis=1)
    local_sum = jnp.sum(lse_i + lse_t - 2 * positives)
    total = local_sum if axis_name is None else jax.lax.psum(local_sum, axis_name)
    return total / (2 * all_image.shape[0])


def clip_loss_blockwise(image_embeds, text_embeds, logit_scale, mesh, batch_axes, block_size):
    """`clip_loss` with each row's log-sum-exp streamed over column blocks of `block_size`
    (the last one padded with masked columns): equal value and gradients, O(B_local x
    block) logits per device instead of O(B_local x B). `block_size` is a positive integer
    (`config.loss.block_size`, checked by the registry: `check`)."""
    if not batch_axes:
        return clip_loss_blockwise_local(image_embeds, text_embeds, logit_scale, None, block_size)
    axes = tuple(batch_axes)
    fn = _on_batch_shards(
        lambda i, t, s: clip_loss_blockwise_local(i, t, s, axes, block_size), mesh, axes, 2, 1)
    return fn(image_embeds, text_embeds, logit_scale)


# ----------------------------------------------------------------------- SigLIP losses

def siglip_loss_naive(image_embeds, text_embeds, logit_scale, logit_bias):
    """-(1/B) sum_ij log sigmoid(z_ij (t <img_i, txt_j> + b)), z = +1 on the diagonal, else -1."""
    logits = logit_scale * image_embeds @ text_embeds.T + logit_bias
    z = 2 * jnp.eye(logits.shape[0], dtype=logits.dtype) - 1
    return -jnp.sum(jax.nn.log_sigmoid(z * logits)) / logits.shape[0]


def _siglip_block(image, text_block, scale, bias, positives, chunk=None):
    """Sum of log sigmoid(z * logits) over one [B_local, B_local] block, and a function of
    d/d logits giving (d image, d text block, d scale, d bias) for a cotangent g; computed
    `chunk` columns of the block at a time (None: all at once)."""
    n = text_block.shape[0]
    chunk = min(chunk or n, n)
    cols, index = _chunked(text_block, chunk), _chunked(jnp.arange(n), chunk, -1)

    def logits_of(c, idx):
        dots = _dot(image, c)                                      # [B_local, chunk]
        rows = jnp.arange(image.shape[0])[:, None]
        z = jnp.where(positives & (rows == idx[None, :]), 1.0, -1.0)
        return dots, scale * dots + bias, z, idx[None, :] >= 0     # padding: index -1

    def total(acc, xs):
        _, logits, z, ok = logits_of(*xs)
        return acc + jnp.sum(jnp.where(ok, jax.nn.log_sigmoid(z * logits), 0.0)), None

    value = jax.lax.scan(total, jnp.zeros((), jnp.float32) + 0 * scale, (cols, index))[0]

    def grads(g):
        def step(carry, xs):
            d_image, d_scale, d_bias = carry
            c, idx = xs
            dots, logits, z, ok = logits_of(c, idx)
            d_logits = jnp.where(ok, g * z * jax.nn.sigmoid(-z * logits), 0.0)
            return ((d_image + scale * jnp.dot(d_logits, c, preferred_element_type=jnp.float32),
                     d_scale + jnp.sum(d_logits * dots), d_bias + jnp.sum(d_logits)),
                    scale * jnp.dot(d_logits.T, image, preferred_element_type=jnp.float32))
        zero = jnp.zeros((), jnp.float32) + 0 * scale
        (d_image, d_scale, d_bias), d_cols = jax.lax.scan(
            step, (jnp.zeros(image.shape, jnp.float32) + 0 * image, zero, zero), (cols, index))
        return d_image, _unchunked(d_cols, n), d_scale, d_bias

    return value, grads


def _ring(axis_name, n_shards):
    """Send each block to the next shard along the (linearised) batch axes."""
    perm = [(i, (i + 1) % n_shards) for i in range(n_shards)]
    return lambda x: jax.lax.ppermute(x, axis_name, perm)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def siglip_ring_sum(image, text, scale, bias, axis_name, n_shards, chunk=None):
    """This shard's sum of log sigmoid(z_ij logit_ij) over its images and ALL texts, the
    text blocks coming round the ring (n_shards - 1 ppermutes), `chunk` columns of a block
    at a time; no psum."""
    return _siglip_ring_fwd(image, text, scale, bias, axis_name, n_shards, chunk)[0]


def _siglip_ring_fwd(image, text, scale, bias, axis_name, n_shards, chunk):
    send = _ring_send(axis_name, n_shards)
    own, _ = _siglip_block(image, text, scale, bias, True, chunk)    # positives: own block only

    def step(carry, _):
        block, total = carry
        block = send(block)
        return (block, total + _siglip_block(image, block, scale, bias, False, chunk)[0]), None

    (_, total), _ = jax.lax.scan(step, (text, own), None, length=n_shards - 1)
    return total, (image, text, scale, bias)


def _siglip_ring_bwd(axis_name, n_shards, chunk, residuals, g):
    image, text, scale, bias = residuals
    send = _ring_send(axis_name, n_shards)

    def grads(block, positives):
        return _siglip_block(image, block, scale, bias, positives, chunk)[1](g)

    d_image, d_text, d_scale, d_bias = grads(text, True)

    def step(carry, _):
        block, d_block, d_image, d_scale, d_bias = carry
        # The text gradient travels with its block and is back at its owner after n_shards sends.
        block, d_block = send(block), send(d_block)
        di, dt, ds, db = grads(block, False)
        return (block, d_block + dt, d_image + di, d_scale + ds, d_bias + db), None

    (_, d_text, d_image, d_scale, d_bias), _ = jax.lax.scan(
        step, (text, d_text, d_image, d_scale, d_bias), None, length=n_shards - 1)
    return (d_image.astype(image.dtype), send(d_text).astype(text.dtype),
            d_scale.astype(jnp.result_type(scale)), d_bias.astype(jnp.result_type(bias)))


siglip_ring_sum.defvjp(_siglip_ring_fwd, _siglip_ring_bwd)


def siglip_loss(image_embeds, text_embeds, logit_scale, logit_bias, mesh, batch_axes, block_size=None):
    """Sharded SigLIP loss (equals `siglip_loss_naive`): as in the paper, each shard keeps its
    images and the text blocks go round a ring of the batch shards, so no device holds all
    text embeddings; logits are B_local x `block_size` at a time (None: B_local x B_local)."""
    if not batch_axes:
        return siglip_loss_naive(image_embeds, text_embeds, logit_scale, logit_bias)
    axes = tuple(batch_axes)
    n_shards = math.prod(mesh.shape[a] for a in axes)

    def local(image, text, scale, bias):
        # Varying copies of the replicated scalars: the custom backward returns per-shard
        # gradients for them, which pcast's transpose sums over the shards.
        scale, bias = (jax.lax.pcast(x, axes, to="varying") for x in (scale, bias))
        # ppermute takes the tuple of batch axes; its indices are the linearised (row-major)
        # shard index, the same order as axis_index(axes) and P(axes) sharding.
        total = siglip_ring_sum(image, text, scale, bias, axes, n_shards, block_size)
        return -jax.lax.psum(total, axes) / (image.shape[0] * n_shards)

    return _on_batch_shards(local, mesh, axes, 2, 2)(image_embeds, text_embeds, logit_scale,
                                                     logit_bias)


# ---------------------------------------------------- ring InfoNCE (nothing gathered)

def _online_lse(stats, logits, axis):
    """(max, sum of exp(x - max)) along `axis`, updated with `logits`."""
    running_max, running_sum = stats
    new_max = jnp.maximum(running_max, logits.max(axis=axis))
    shape = (-1, 1) if axis == 1 else (1, -1)
    return new_max, (running_sum * jnp.exp(running_max - new_max)
                     + jnp.exp(logits - new_max.reshape(shape)).sum(axis=axis))


def _chunked(x, chunk, fill=0.0):
    """x [n, ...] -> [n_chunks, chunk, ...], the last chunk padded with `fill`."""
    n = x.shape[0]
    chunk = min(chunk, n)
    n_chunks = -(-n // chunk)
    pad = [(0, n_chunks * chunk - n)] + [(0, 0)] * (x.ndim - 1)
    return jnp.pad(x, pad, constant_values=fill).reshape((n_chunks, chunk) + x.shape[1:])


def _unchunked(x, n):
    return x.reshape((-1,) + x.shape[2:])[:n]


def _dot(a, b):
    """a @ b.T in float32 whatever the inputs' dtype (the logits and their statistics)."""
    return jnp.dot(a, b.T, preferred_element_type=jnp.float32)


def _ring_visit(image, block, scale, row_stats, col_stats, chunk):
    """One ring step of the forward: this shard's image rows against a text block (B_local x
    chunk logits at a time): the rows' online LSE over the block's columns, and the block's
    columns' online LSE over these rows (text -> image), which travels with the block."""
    n = block.shape[0]
    valid = _chunked(jnp.ones((n,), bool), chunk, False)

    def step(rows, xs):
        cols, ok, col_max, col_sum = xs
        logits = scale * _dot(image, cols)                          # [B_local, chunk]
        rows = _online_lse(rows, jnp.where(ok[None, :], logits, -jnp.inf), axis=1)
        return rows, _online_lse((col_max, col_sum), logits, axis=0)   # padding: dropped below

    row_stats, cols = jax.lax.scan(step, row_stats, (_chunked(block, chunk), valid,
                                                     *(_chunked(c, chunk) for c in col_stats)))
    return row_stats, tuple(_unchunked(c, n) for c in cols)


def _ring_send(axis_name, n_shards):
    return (lambda x: x) if n_shards == 1 else _ring(axis_name, n_shards)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def clip_ring_sum(image, text, scale, axis_name, n_shards, chunk):
    """This shard's part of the symmetric InfoNCE sum: sum over its images of LSE_j(s <i, t_j>)
    over ALL texts, plus sum over its texts of LSE_i(s <i, t>) over ALL images, minus twice its
    positives. The text blocks travel the ring (ppermute) with their column statistics; no
    psum, nothing gathered."""
    return _clip_ring_fwd(image, text, scale, axis_name, n_shards, chunk)[0]


def _clip_ring_fwd(image, text, scale, axis_name, n_shards, chunk):
    send = _ring_send(axis_name, n_shards)
    empty = lambda x: (jnp.full(x.shape[:1], -jnp.inf, jnp.float32) + 0 * x[:, 0],  # noqa: E731
                       jnp.zeros(x.shape[:1], jnp.float32) + 0 * x[:, 0])          # (varying as x)
    rows, cols = empty(image), empty(text)

    def step(carry, _):
        block, cols, rows = carry
        rows, cols = _ring_visit(image, block, scale, rows, cols, chunk)
        # The block is sent on while (XLA permitting) the next one is scored; its column
        # statistics follow it once updated.
        return (send(block), send(cols), rows), None

    (block, cols, rows), _ = jax.lax.scan(step, (text, cols, rows), None, length=n_shards - 1)
    rows, cols = _ring_visit(image, block, scale, rows, cols, chunk)
    cols = send(cols)                                   # home: over all the images
    lse_rows, lse_cols = (m + jnp.log(s) for m, s in (rows, cols))
    positives = scale * jnp.sum(image.astype(jnp.float32) * text.astype(jnp.float32), axis=1)
    total = jnp.sum(lse_rows) + jnp.sum(lse_cols) - 2 * jnp.sum(positives)
    return total, (image, text, scale, lse_rows, lse_cols)


def _clip_ring_bwd(axis_name, n_shards, chunk, residuals, g):
    image, text, scale, lse_rows, lse_cols = residuals
    send = _ring_send(axis_name, n_shards)
    n = text.shape[0]

    def visit(block, block_lse, d_block, d_image, d_scale):
        """d/d logits = g (softmax over the row + softmax over the column), per chunk."""
        def step(carry, xs):
            d_image, d_scale = carry
            cols, col_lse = xs
            dots = _dot(image, cols)                                 # [B_local, chunk]
            logits = scale * dots
            d_logits = g * (jnp.exp(logits - lse_rows[:, None]) + jnp.exp(logits - col_lse[None, :]))
            d_cols = scale * jnp.dot(d_logits.T, image, preferred_element_type=jnp.float32)
            return (d_image + scale * jnp.dot(d_logits, cols, preferred_element_type=jnp.float32),
                    d_scale + jnp.sum(d_logits * dots)), d_cols
        # padded columns: their LSE is +inf, so their softmax and gradient are 0
        (d_image, d_scale), d_cols = jax.lax.scan(
            step, (d_image, d_scale), (_chunked(block, chunk), _chunked(block_lse, chunk, jnp.inf)))
        return d_block + _unchunked(d_cols, n), d_image, d_scale

    zeros = lambda x: jnp.zeros(x.shape, jnp.float32) + 0 * x  # noqa: E731  (varying as x)
    d_image, d_text, d_scale = zeros(image), zeros(text), jnp.zeros((), jnp.float32) + 0 * scale

    def step(carry, _):
        block, block_lse, d_block, d_image, d_scale = carry
        d_block, d_image, d_scale = visit(block, block_lse, d_block, d_image, d_scale)
        # The text gradient travels with its block and is back at its owner after n_shards sends.
        return (send(block), send(block_lse), send(d_block), d_image, d_scale), None

    (block, block_lse, d_block, d_image, d_scale), _ = jax.lax.scan(
        step, (text, lse_cols, d_text, d_image, d_scale), None, length=n_shards - 1)
    d_block, d_image, d_scale = visit(block, block_lse, d_block, d_image, d_scale)
    d_text = send(d_block)
    image32, text32 = image.astype(jnp.float32), text.astype(jnp.float32)
    d_image = d_image - 2 * g * scale * text32                 # the positives
    d_text = d_text - 2 * g * scale * image32
    d_scale = d_scale - 2 * g * jnp.sum(image32 * text32)
    return d_image.astype(image.dtype), d_text.astype(text.dtype), d_scale.astype(jnp.result_type(scale))


clip_ring_sum.defvjp(_clip_ring_fwd, _clip_ring_bwd)


def clip_loss_ring(image_embeds, text_embeds, logit_scale, mesh, batch_axes, block_size):
    """The paper's symmetric InfoNCE (equals `clip_loss_naive`) with nothing gathered: each
    batch shard keeps its rows; the text blocks go round a ring of the shards (`ppermute`),
    each step adding one B_local x B_local block, `block_size` columns at a time, to an
    online max/sum per image row (image -> text) and per text column (text -> image, the
    statistics travelling with their block); the `custom_vjp` backward runs the ring again,
    the text gradients travelling back with their blocks. Memory per device: O(B_local x d)
    and B_local x block_size logits."""
    if not batch_axes:
        total = clip_ring_sum(image_embeds, text_embeds, logit_scale, None, 1, block_size)
        return total / (2 * image_embeds.shape[0])
    axes = tuple(batch_axes)
    n_shards = math.prod(mesh.shape[a] for a in axes)

    def local(image, text, scale):
        # a varying copy of the replicated scale: pcast's transpose sums its per-shard gradients
        scale = jax.lax.pcast(scale, axes, to="varying")
        total = clip_ring_sum(image, text, scale, axes, n_shards, block_size)
        return jax.lax.psum(total, axes) / (2 * image.shape[0] * n_shards)

    return _on_batch_shards(local, mesh, axes, 2, 1)(image_embeds, text_embeds, logit_scale)


# ------------------------------------------------------------------------ the registry

def _positive_int(x):
    return isinstance(x, int) and not isinstance(x, bool) and x >= 1


@dataclasses.dataclass(frozen=True)
class Option:
    """A `config.loss` key that a loss reads, and its check."""
    key: str
    valid: Callable[[Any], bool]
    must: str                  # what a valid value is, for the error message


@dataclasses.dataclass(frozen=True)
class Loss:
    """One registered loss: `LOSSES[config.loss.name]`.

    fn: the loss, called as fn(image_embeds, text_embeds, logit_scale, [logit_bias,] mesh,
      batch_axes, *option values): the bias only when the model learns one, then the
      values of `options`, in order.
    model_options: the `CLIP` fields its model needs (`models.from_config` passes them):
      SigLIP's initial temperature and learned bias. A loss whose options hold a
      `logit_bias_init` takes the model's `logit_bias`; the others take none.
    options: the `config.loss` keys it reads, each with its check (`check`).
    exchange: how the batch shards see each other's embeddings: "gather" (all-gathered, the
      gradients reduce-scattered back) or "ring" (one tower's blocks passed round the shards
      with collective-permutes, nothing gathered); `cost.minimum_collective_bytes` reads it."""
    fn: Callable
    model_options: Mapping[str, float] = dataclasses.field(default_factory=dict)
    options: Tuple[Option, ...] = ()
    exchange: str = "gather"

    @property
    def learns_bias(self):
        return "logit_bias_init" in self.model_options


LOSSES = {
    "clip": Loss(clip_loss),
    "clip_blockwise": Loss(clip_loss_blockwise,
                           options=(Option("block_size", _positive_int, "must be a positive integer"),)),
    "clip_ring": Loss(clip_loss_ring, exchange="ring",
                      options=(Option("block_size", _positive_int, "must be a positive integer"),)),
    # The paper's initial t' = log 10 and bias -10.
    "siglip": Loss(siglip_loss, exchange="ring",
                   model_options={"logit_scale_init": math.log(10.0), "logit_bias_init": -10.0},
                   options=(Option("block_size", _positive_int, "must be a positive integer"),)),
}


def get(name):
    """The registry's entry for `config.loss.name = name`."""
    if name not in LOSSES:
        raise ValueError(f"config.loss.name: must be one of {sorted(LOSSES)} (got {name!r})")
    return LOSSES[name]


def check(loss_cfg):
    """The entry for `config.loss`, after checking the name and the options that loss reads;
    ValueError naming the first bad key (`validation` and `make_loss` both ask here)."""
    loss = get(loss_cfg.name)
    for option in loss.options:
        value = loss_cfg.get(option.key)
        if not option.valid(value):
            raise ValueError(f"config.loss.{option.key}: {option.must} (got {value!r})")
    return loss


def model_options(loss_cfg):
    """The `CLIP` fields the loss of `config.loss` needs (`models.from_config`)."""
    return dict(get(loss_cfg.name).model_options)


def make_loss(loss_cfg, mesh, batch_axes):
    """fn(image_embeds, text_embeds, logit_scale, logit_bias) -> scalar loss for `config.loss`:
    one signature for every registered loss. `logit_bias` must be an array for a loss whose
    model learns one (SigLIP) and None for the others."""
    loss = check(loss_cfg)
    values = [loss_cfg[option.key] for option in loss.options]
    name = loss_cfg.name

    def fn(image_embeds, text_embeds, logit_scale, logit_bias=None):
        if loss.learns_bias and logit_bias is None:
            raise ValueError(f"config.loss.name={name!r} needs a logit_bias (the model makes one "
                             "when built by models.from_config)")
        if not loss.learns_bias and logit_bias is not None:
            users = sorted(n for n, entry in LOSSES.items() if entry.learns_bias)
            raise ValueError(f"config.loss.name={name!r} takes no logit_bias (it would get no "
                             f"gradient); only {users} use one")
        bias = (logit_bias,) if loss.learns_bias else ()
        return loss.fn(image_embeds, text_embeds, logit_scale, *bias, mesh, batch_axes, *values)

    return fn
