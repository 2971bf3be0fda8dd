"""OpenAI CLIP's ModifiedResNet (NHWC inputs).

Differences from torchvision's ResNet, as in OpenAI CLIP: a 3-conv stem with an
average pool instead of a max pool; anti-aliased strided blocks (an average pool
before conv3, and before the 1x1 shortcut conv); a QKV attention pool instead of
global average pooling.

BatchNorm running statistics live in the `batch_stats` collection (buffers, not
parameters); pass `train=True` with `mutable=['batch_stats']` to update them.
"""
import functools
from typing import Any, Optional, Tuple

import jax
import jax.numpy as jnp
import flax.linen as nn

from clip_jax.models.layers import (MultiHeadAttention, _row_major, _stored_transpose, logical,
                                    matmul, normal, ones, zeros)

STAGE_SPEC = ("batch", None, None, None)
CONV_NAMES = (None, None, "conv_in", "conv_out")
_he_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class PointwiseConv(nn.Module):
    """A 1x1, stride-1 convolution without bias, computed as a matmul over the channels.

    The parameter is the convolution's (`kernel` [1, 1, in, out], the same initialiser), so
    checkpoints and converted weights are unchanged. Profiled on XLA:CPU, `conv_general_dilated`
    ran these 1x1 kernels at 16-100 GFLOP/s forward+backward against 80-180 for the same
    products as `layers.matmul` (BUILD_NOTES "Performance"); on GPU/TPU both are one GEMM.
    """
    features: int
    dtype: Any = jnp.float32
    out_dtype: Any = None      # None: `dtype`; float32: the accumulator, unrounded

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", logical(_he_fan_out, CONV_NAMES),
                            (1, 1, x.shape[-1], self.features), jnp.float32)
        return matmul(x, kernel[0, 0], self.dtype, out_dtype=self.out_dtype)


def _im2col_3x3(x, per_image=None):
    """x [N, H, W, C] -> [N*H*W, 9*C]: the 3x3 neighbourhood of each position (zero padding 1),
    tap-major (dy, dx), so that cols @ kernel.reshape(9*C, O) is the 'same' convolution.

    One gather of C-channel rows from the padded input: XLA fuses the padding (and the
    packing below) into it and writes the nine windows in one pass, where nine slices and a
    concatenate took two (BUILD_NOTES "Performance", finding 16). With more than one device
    (`per_image` None: `jax.device_count() > 1`) the batch is the gather's batching
    dimension, so a batch-sharded input stays sharded (gathering from the flattened batch
    made XLA all-gather it); on one device the flat gather is used, 2-4% faster in RN50's
    step. Two-byte values are moved as pairs packed in uint32 words (C even): XLA:CPU's
    gather copies 32-bit words several times as fast as 16-bit ones."""
    n, h, w, c = x.shape
    if per_image is None:
        per_image = jax.device_count() > 1
    packed = x.dtype.itemsize == 2 and c % 2 == 0
    v = jax.lax.bitcast_convert_type(x.reshape(n, h, w, c // 2, 2), jnp.uint32) if packed else x
    v = jnp.pad(v, ((0, 0), (1, 1), (1, 1), (0, 0)))
    width = v.shape[-1]
    # The padded image's row for output position (i, j) and tap (dy, dx).
    iota = functools.partial(jax.lax.broadcasted_iota, jnp.int32, (n, h, w, 3, 3))
    rows = (iota(1) + iota(3)) * (w + 2) + iota(2) + iota(4)
    if per_image:
        v, rows = v.reshape(n, -1, width), rows.reshape(n, h * w * 9, 1)
        dims = jax.lax.GatherDimensionNumbers(
            offset_dims=(2,), collapsed_slice_dims=(1,), start_index_map=(1,),
            operand_batching_dims=(0,), start_indices_batching_dims=(0,))
    else:
        v = v.reshape(-1, width)
        rows = (iota(0) * ((h + 2) * (w + 2)) + rows).reshape(n * h * w, 9, 1)
        dims = jax.lax.GatherDimensionNumbers(offset_dims=(2,), collapsed_slice_dims=(0,),
                                              start_index_map=(0,))
    cols = jax.lax.gather(v, rows, dims, (1,) * (v.ndim - 1) + (width,),
                          mode=jax.lax.GatherScatterMode.PROMISE_IN_BOUNDS)
    if packed:
        cols = jax.lax.bitcast_convert_type(cols, x.dtype)
    return cols.reshape(n * h * w, 9 * c)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv3x3_im2col(x, kernel, out_dtype=None):
    """The 3x3, stride-1, padding-1 convolution of x [N, H, W, C] (compute dtype) with the
    float32 kernel [3, 3, C, O] (HWIO), as im2col + one product that takes x's dtype and
    accumulates in float32; the result is rounded once to `out_dtype` (None: x's dtype;
    float32: not rounded). The backward is two
    products of the same kind: dx = im2col(g) @ the flipped kernel, and dkernel = g.T @
    im2col(x), straight in float32. See `Conv3x3` for when it is used."""
    n, h, w, c = x.shape
    y = jnp.dot(_im2col_3x3(x), kernel.astype(x.dtype).reshape(9 * c, -1),
                preferred_element_type=jnp.float32)
    return y.astype(out_dtype or x.dtype).reshape(n, h, w, -1)


def _conv3x3_im2col_fwd(x, kernel, out_dtype):
    # The backward rebuilds the im2col buffer: saving it (9x x's memory) was no faster.
    return conv3x3_im2col(x, kernel, out_dtype), (x, kernel)


def _conv3x3_im2col_bwd(out_dtype, saved, g):
    x, kernel = saved
    g = g.astype(x.dtype)
    n, h, w, c = x.shape
    o = kernel.shape[-1]
    # The input gradient is the 'same' convolution of g with the kernel rotated by 180
    # degrees and its channel axes swapped: [3, 3, O, C] -> [9*O, C].
    flipped = jnp.transpose(kernel[::-1, ::-1].astype(x.dtype), (0, 1, 3, 2)).reshape(9 * o, c)
    dx = jnp.dot(_im2col_3x3(g), flipped, preferred_element_type=jnp.float32)
    # g.T stored transposed (see `_stored_transpose`), and the [O, 9C] product kept in that
    # layout until the transpose below: XLA:CPU has no bf16 x bf16 -> f32 product writing
    # the transposed layout ("DotThunk" error).
    dkernel_t = _row_major(jnp.dot(_stored_transpose(g.reshape(n * h * w, o)), _im2col_3x3(x),
                                   preferred_element_type=jnp.float32))
    return dx.astype(x.dtype).reshape(x.shape), dkernel_t.T.reshape(3, 3, c, o)


conv3x3_im2col.defvjp(_conv3x3_im2col_fwd, _conv3x3_im2col_bwd)


# The smallest input width at which `Conv3x3` takes the im2col path (XLA:CPU, bfloat16).
IM2COL_MIN_CHANNELS = 128


class Conv3x3(nn.Module):
    """A 3x3, stride-1, padding-1 convolution without bias; its parameter is `nn.Conv`'s
    (`kernel` [3, 3, in, out], the same initialiser), so checkpoints are unchanged.

    On XLA:CPU in bfloat16 with at least IM2COL_MIN_CHANNELS input channels it runs as
    `conv3x3_im2col`: XLA:CPU's bfloat16 convolution upcasts to float32 (RN50's 3x3
    convolutions, forward and backward, took twice as long as torch's oneDNN ones), while
    its bfloat16 product accumulating in float32 runs at ~2x the rate. Measured per shape
    (BUILD_NOTES "Performance", finding 11) the im2col form wins from 128 channels (56x56
    and smaller) and loses slightly on the stem's and the first stage's 32-64 channels at
    112x112 and 56x56, where the copies cost more than the product gains. Everywhere else
    (float32, GPU, TPU) it is `lax.conv_general_dilated`, as `nn.Conv`.
    """
    features: int
    dtype: Any = jnp.float32
    out_dtype: Any = None      # None: `dtype`; float32: the accumulator, unrounded

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", logical(_he_fan_out, CONV_NAMES),
                            (3, 3, x.shape[-1], self.features), jnp.float32)
        x = jnp.asarray(x, self.dtype)
        if (jax.default_backend() == "cpu" and x.dtype == jnp.bfloat16
                and x.shape[-1] >= IM2COL_MIN_CHANNELS):
            return conv3x3_im2col(x, kernel, self.out_dtype)
        return jax.lax.conv_general_dilated(x, kernel.astype(self.dtype), (1, 1),
                                            ((1, 1), (1, 1)),
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                            preferred_element_type=self.out_dtype)


def _conv(features, kernel, name, dtype, stride=1):
    """Every convolution here feeds a BatchNorm, which computes in float32: the stride-1 ones
    hand it their float32 accumulator instead of rounding it to `dtype` and converting it
    back (one pass fewer per convolution in bfloat16; BUILD_NOTES "Performance", finding 13)."""
    if kernel == 1 and stride == 1:
        return PointwiseConv(features, dtype=dtype, out_dtype=jnp.float32, name=name)
    if kernel == 3 and stride == 1:
        return Conv3x3(features, dtype=dtype, out_dtype=jnp.float32, name=name)
    pad = (kernel - 1) // 2
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                   padding=((pad, pad), (pad, pad)), use_bias=False,
                   dtype=dtype, param_dtype=jnp.float32,
                   kernel_init=logical(_he_fan_out, CONV_NAMES), name=name)


_STAT_AXES = (0, 1, 2)       # NHWC: statistics per channel over batch and space


def _batch_stats(x):
    """Per-channel mean and (biased) variance in float32, as flax's fast variance."""
    xf = x.astype(jnp.float32)
    mean = xf.mean(_STAT_AXES)
    return mean, jnp.maximum(0.0, (xf * xf).mean(_STAT_AXES) - mean * mean)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def batch_norm_act(x, scale, bias, residual, epsilon, relu, dtype):
    """Training-mode BatchNorm (batch statistics), then `+ residual` (None: none), then ReLU
    if `relu`; returns (y in `dtype`, batch mean, batch variance)."""
    return _bn_act_fwd(x, scale, bias, residual, epsilon, relu, dtype)[0]


def _normalise(x, mean, inv, scale, bias, residual, relu, dtype):
    y = (x.astype(jnp.float32) - mean) * (inv * scale) + bias
    if residual is not None:
        y = y + residual.astype(jnp.float32)
    return (jnp.maximum(y, 0.0) if relu else y).astype(dtype)


def _bn_act_fwd(x, scale, bias, residual, epsilon, relu, dtype):
    mean, var = _batch_stats(x)
    inv = jax.lax.rsqrt(var + epsilon)
    y = _normalise(x, mean, inv, scale, bias, residual, relu, dtype)
    # An empty array of the residual's dtype, or None: whether there is a residual, statically.
    residual_marker = None if residual is None else jnp.zeros((0,), residual.dtype)
    return (y, mean, var), (x, y, scale, mean, inv, residual_marker)


def _bn_act_bwd(epsilon, relu, dtype, saved, cotangents):
    x, y, scale, mean, inv, residual_marker = saved
    dy, dmean, dvar = cotangents
    m = x.size // x.shape[-1]
    g = dy.astype(jnp.float32)
    if relu:
        g = jnp.where(y > 0, g, 0.0)        # the ReLU's mask, read from the saved output
    xf = x.astype(jnp.float32)
    centred = xf - mean
    dbias = g.sum(_STAT_AXES)
    # sum(g * centred) as sum(g * x) - mean * sum(g), the same expansion as the forward's
    # fast variance: XLA:CPU's reduction kernels (YNNPACK) take a product, not the
    # subtraction, so the centred form stored x - mean in float32 for them, one more
    # pass over the activations per BatchNorm (BUILD_NOTES "Performance", finding 15).
    dscale = ((g * xf).sum(_STAT_AXES) - mean * dbias) * inv
    dx = ((scale * inv) * (g - dbias / m - centred * (inv * dscale / m))
          + dmean / m + centred * (2.0 * dvar / m))
    dresidual = None if residual_marker is None else g.astype(residual_marker.dtype)
    return dx.astype(x.dtype), dscale, dbias, dresidual


batch_norm_act.defvjp(_bn_act_fwd, _bn_act_bwd)


class BatchNorm(nn.Module):
    """BatchNorm over NHWC (+ a residual) (+ ReLU), with flax `nn.BatchNorm`'s variables
    (`scale`, `bias`; `batch_stats` `mean`, `var`), momentum and statistics.

    In training the normalisation, residual add and ReLU are one custom-VJP function whose
    backward is two passes over the activations (the per-channel sums, then the input
    gradient) and reads the ReLU mask from the saved output. Against XLA's autodiff of
    `nn.BatchNorm` + add + ReLU: RN50's bfloat16 step 4% faster, float32 unchanged
    (BUILD_NOTES "Performance", finding 8).
    """
    train: bool
    relu: bool = True
    momentum: float = 0.9
    epsilon: float = 1e-5
    zero_scale: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, residual: Optional[jax.Array] = None):
        c = x.shape[-1]
        scale = self.param("scale", logical(zeros if self.zero_scale else ones, ("norm",)),
                           (c,), jnp.float32)
        bias = self.param("bias", logical(zeros, ("norm",)), (c,), jnp.float32)
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
        if not self.train:
            return _normalise(x, ra_mean.value, jax.lax.rsqrt(ra_var.value + self.epsilon),
                              scale, bias, residual, self.relu, self.dtype)
        y, mean, var = batch_norm_act(x, scale, bias, residual, self.epsilon,
                                      self.relu, jnp.dtype(self.dtype))
        if not self.is_initializing():
            m = self.momentum
            ra_mean.value = m * ra_mean.value + (1 - m) * jax.lax.stop_gradient(mean)
            ra_var.value = m * ra_var.value + (1 - m) * jax.lax.stop_gradient(var)
        return y


def _avg_pool(x, k):
    """The k x k, stride-k average pool ('VALID'), as a reshape and a mean accumulated in
    float32. Its gradient is then a broadcast; `nn.avg_pool`'s is a padded `reduce_window`,
    which XLA:CPU runs in float32 between two conversions: in bfloat16 that pool, forward and
    backward, took 3-9x as long (BUILD_NOTES "Performance", finding 14). Sides not divisible
    by k (no CLIP resolution has them) fall back to `nn.avg_pool`."""
    n, h, w, c = x.shape
    if k == 1:
        return x
    if h % k or w % k:
        return nn.avg_pool(x, (k, k), strides=(k, k), padding="VALID")
    pooled = x.reshape(n, h // k, k, w // k, k, c).mean((2, 4), dtype=jnp.float32)
    return pooled.astype(x.dtype)


class Bottleneck(nn.Module):
    """Bottleneck block, expansion 4; stride > 1 is an avg pool before conv3."""
    planes: int
    stride: int = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        d = self.dtype
        out = BatchNorm(train, dtype=d, name="bn1")(_conv(self.planes, 1, "conv1", d)(x))
        out = BatchNorm(train, dtype=d, name="bn2")(_conv(self.planes, 3, "conv2", d)(out))
        out = _conv(self.planes * 4, 1, "conv3", d)(_avg_pool(out, self.stride))
        identity = x
        if self.stride > 1 or x.shape[-1] != self.planes * 4:
            identity = _avg_pool(x, self.stride)
            identity = _conv(self.planes * 4, 1, "downsample_conv", d)(identity)
            identity = BatchNorm(train, relu=False, dtype=d, name="downsample_bn")(identity)
        return BatchNorm(train, zero_scale=True, dtype=d, name="bn3")(out, identity)


class AttentionPool2d(nn.Module):
    """QKV attention pooling: the mean token (prepended) attends to all positions."""
    spacial_dim: int
    num_heads: int
    output_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, h, w, c = x.shape
        std = c ** -0.5
        x = x.reshape(b, h * w, c)
        x = jnp.concatenate([x.mean(axis=1, keepdims=True), x], axis=1)
        pos = self.param("positional_embedding", logical(normal(std), ("pos", "embed")),
                         (self.spacial_dim ** 2 + 1, c), jnp.float32)
        x = x + pos.astype(x.dtype)
        out = MultiHeadAttention(num_heads=self.num_heads, qkv_std=std, out_std=std,
                                 out_features=self.output_dim, out_name="joint",
                                 dtype=self.dtype, name="attn")(x[:, :1], x)
        return out[:, 0]


class ModifiedResNet(nn.Module):
    layers: Tuple[int, ...]
    output_dim: int
    heads: int
    image_size: int = 224
    width: int = 64
    remat: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        d = self.dtype
        w = self.width
        x = jnp.asarray(x, d)
        x = BatchNorm(train, dtype=d, name="bn1")(_conv(w // 2, 3, "conv1", d, stride=2)(x))
        x = BatchNorm(train, dtype=d, name="bn2")(_conv(w // 2, 3, "conv2", d)(x))
        x = BatchNorm(train, dtype=d, name="bn3")(_conv(w, 3, "conv3", d)(x))
        x = _avg_pool(x, 2)
        block_cls = nn.remat(Bottleneck, static_argnums=(2,)) if self.remat else Bottleneck
        for stage, n in enumerate(self.layers):
            planes = w * 2 ** stage
            for i in range(n):
                stride = 2 if (stage > 0 and i == 0) else 1
                x = block_cls(planes=planes, stride=stride, dtype=d,
                              name=f"layer{stage + 1}_{i}")(x, train)
            x = nn.with_logical_constraint(x, STAGE_SPEC)
        return AttentionPool2d(spacial_dim=self.image_size // 32, num_heads=self.heads,
                               output_dim=self.output_dim, dtype=d,
                               name="attnpool")(x).astype(jnp.float32)
