"""OpenAI CLIP's ModifiedResNet (NHWC inputs).

Differences from torchvision's ResNet, as in OpenAI CLIP: a 3-conv stem with an
average pool instead of a max pool; anti-aliased strided blocks (an average pool
before conv3, and before the 1x1 shortcut conv); a QKV attention pool instead of
global average pooling.

BatchNorm running statistics live in the `batch_stats` collection (buffers, not
parameters); pass `train=True` with `mutable=['batch_stats']` to update them. Statistics
are over the whole global batch (under a batch-sharded mesh XLA sums them across devices),
so a step does not depend on the device count.

The convolutions, BatchNorms, pools and dense products run on `ops`
(`clip_jax.ops.plain.Ops`: the plain code, `PLAIN`, unless a platform's kernels are given).
"""
from typing import Any, Optional, Tuple

import jax
import jax.numpy as jnp
import flax.linen as nn

from clip_jax.models.layers import MultiHeadAttention, logical, normal, ones, remat_if, stacked, zeros
from clip_jax.ops.plain import PLAIN, Ops, normalise

STAGE_SPEC = ("batch", None, None, None)
CONV_NAMES = (None, None, "conv_in", "conv_out")
_he_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class Conv(nn.Module):
    """A bias-free k x k convolution with `nn.Conv`'s parameter (`kernel` [k, k, in, out],
    He fan-out initialisation), so checkpoints and converted weights fit either."""
    features: int
    kernel_size: int
    stride: int = 1
    dtype: Any = jnp.float32
    ops: Ops = PLAIN

    @nn.compact
    def __call__(self, x):
        k = self.kernel_size
        kernel = self.param("kernel", logical(_he_fan_out, CONV_NAMES),
                            (k, k, x.shape[-1], self.features), jnp.float32)
        return self.ops.conv(x, kernel, self.stride, self.dtype)


class BatchNorm(nn.Module):
    """BatchNorm over NHWC (+ a residual) (+ ReLU), with flax `nn.BatchNorm`'s variables
    (`scale`, `bias`; `batch_stats` `mean`, `var`), momentum and statistics."""
    train: bool
    relu: bool = True
    momentum: float = 0.9
    epsilon: float = 1e-5
    zero_scale: bool = False
    dtype: Any = jnp.float32
    ops: Ops = PLAIN

    @nn.compact
    def __call__(self, x, residual: Optional[jax.Array] = None):
        c = x.shape[-1]
        scale = self.param("scale", logical(zeros if self.zero_scale else ones, ("norm",)),
                           (c,), jnp.float32)
        bias = self.param("bias", logical(zeros, ("norm",)), (c,), jnp.float32)
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
        if not self.train:
            return normalise(x, ra_mean.value, ra_var.value, scale, bias, residual,
                             self.epsilon, self.relu, self.dtype)
        y, mean, var = self.ops.batch_norm(
            x, scale, bias, residual, self.epsilon, self.relu, self.dtype)
        if not self.is_initializing():
            m = self.momentum
            ra_mean.value = m * ra_mean.value + (1 - m) * jax.lax.stop_gradient(mean)
            ra_var.value = m * ra_var.value + (1 - m) * jax.lax.stop_gradient(var)
        return y


class Bottleneck(nn.Module):
    """Bottleneck block, expansion 4; stride > 1 is an avg pool before conv3."""
    planes: int
    stride: int = 1
    dtype: Any = jnp.float32
    ops: Ops = PLAIN

    @nn.compact
    def __call__(self, x, train: bool = False):
        d, ops = self.dtype, self.ops
        pool = ops.avg_pool
        out = Conv(self.planes, 1, dtype=d, ops=ops, name="conv1")(x)
        out = BatchNorm(train, dtype=d, ops=ops, name="bn1")(out)
        out = Conv(self.planes, 3, dtype=d, ops=ops, name="conv2")(out)
        out = BatchNorm(train, dtype=d, ops=ops, name="bn2")(out)
        out = Conv(self.planes * 4, 1, dtype=d, ops=ops, name="conv3")(pool(out, self.stride))
        identity = x
        if self.stride > 1 or x.shape[-1] != self.planes * 4:
            identity = Conv(self.planes * 4, 1, dtype=d, ops=ops,
                            name="downsample_conv")(pool(x, self.stride))
            identity = BatchNorm(train, relu=False, dtype=d, ops=ops, name="downsample_bn")(identity)
        return BatchNorm(train, zero_scale=True, dtype=d, ops=ops, name="bn3")(out, identity)


class AttentionPool2d(nn.Module):
    """QKV attention pooling: the mean token (prepended) attends to all positions."""
    spacial_dim: int
    num_heads: int
    output_dim: int
    dtype: Any = jnp.float32
    ops: Ops = PLAIN

    @nn.compact
    def __call__(self, x):
        b, h, w, c = x.shape
        std = c ** -0.5
        x = x.reshape(b, h * w, c)
        x = jnp.concatenate([x.mean(axis=1, keepdims=True), x], axis=1)
        pos = self.param("positional_embedding", logical(normal(std), ("pos", "embed")),
                         (self.spacial_dim ** 2 + 1, c), jnp.float32)
        # Added in float32, so that the embedding's gradient (a sum over the batch) is too.
        x = (x.astype(jnp.float32) + pos).astype(self.dtype)
        out = MultiHeadAttention(num_heads=self.num_heads, qkv_std=std, out_std=std,
                                 out_features=self.output_dim, out_name="joint",
                                 dtype=self.dtype, ops=self.ops, name="attn")(x[:, :1], x)
        return out[:, 0]


class ModifiedResNet(nn.Module):
    layers: Tuple[int, ...]
    output_dim: int
    heads: int
    image_size: int = 224
    width: int = 64
    remat: Any = False          # a remat policy name (layers.REMAT_POLICIES); True is "full"
    scan: bool = False      # each stage's repeated blocks run as one loop (layers.stacked)
    dtype: Any = jnp.float32
    ops: Ops = PLAIN

    @nn.compact
    def __call__(self, x, train: bool = False):
        d, w, ops = self.dtype, self.width, self.ops
        x = jnp.asarray(x, d)
        for i, (features, stride) in enumerate(((w // 2, 2), (w // 2, 1), (w, 1)), start=1):
            x = Conv(features, 3, stride, dtype=d, ops=ops, name=f"conv{i}")(x)
            x = BatchNorm(train, dtype=d, ops=ops, name=f"bn{i}")(x)
        x = ops.avg_pool(x, 2)
        # A platform may run convolutions in a loop slower (clip_jax.ops.cpu): then the
        # stages' loops are unrolled; the parameters are the same.
        scan = self.scan and ops.scan_convolutions
        first = remat_if(Bottleneck, self.remat, static_argnums=(2,))
        rest = remat_if(Bottleneck, self.remat, scanned=scan, static_argnums=(2,))
        for stage, n in enumerate(self.layers, start=1):
            # The first block of a stage changes the width (and from the second stage on
            # the resolution); the rest have one shape, their variables stacked (`stacked`).
            planes = w * 2 ** (stage - 1)
            x = first(planes=planes, stride=2 if stage > 1 else 1, dtype=d, ops=ops,
                      name=f"layer{stage}_0")(x, train)
            if n > 1:
                x = stacked(rest(planes=planes, dtype=d, ops=ops, name=f"layer{stage}_rest"),
                            x, n - 1, train, scan=scan, collections=("params", "batch_stats"))
            x = nn.with_logical_constraint(x, STAGE_SPEC)
        return AttentionPool2d(spacial_dim=self.image_size // 32, num_heads=self.heads,
                               output_dim=self.output_dim, dtype=d, ops=ops,
                               name="attnpool")(x).astype(jnp.float32)
