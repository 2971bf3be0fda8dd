"""OpenAI CLIP's ModifiedResNet (NHWC inputs).

Differences from torchvision's ResNet, as in OpenAI CLIP: a 3-conv stem with an
average pool instead of a max pool; anti-aliased strided blocks (an average pool
before conv3, and before the 1x1 shortcut conv); a QKV attention pool instead of
global average pooling.

BatchNorm running statistics live in the `batch_stats` collection (buffers, not
parameters); pass `train=True` with `mutable=['batch_stats']` to update them.
"""
from typing import Any, Tuple

import jax.numpy as jnp
import flax.linen as nn

from clip_jax.models.layers import MultiHeadAttention, logical, matmul, normal, ones, zeros

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

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", logical(_he_fan_out, CONV_NAMES),
                            (1, 1, x.shape[-1], self.features), jnp.float32)
        return matmul(x, kernel[0, 0], self.dtype)


def _conv(features, kernel, name, dtype, stride=1):
    if kernel == 1 and stride == 1:
        return PointwiseConv(features, dtype=dtype, name=name)
    pad = (kernel - 1) // 2
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                   padding=((pad, pad), (pad, pad)), use_bias=False,
                   dtype=dtype, param_dtype=jnp.float32,
                   kernel_init=logical(_he_fan_out, CONV_NAMES), name=name)


def _bn(train, name, dtype, zero_scale=False):
    return nn.BatchNorm(
        use_running_average=not train, momentum=0.9, epsilon=1e-5,
        dtype=dtype, param_dtype=jnp.float32,
        scale_init=logical(zeros if zero_scale else ones, ("norm",)),
        bias_init=logical(zeros, ("norm",)), name=name)


def _avg_pool(x, k):
    if k == 1:
        return x
    return nn.avg_pool(x, (k, k), strides=(k, k), padding="VALID")


class Bottleneck(nn.Module):
    """Bottleneck block, expansion 4; stride > 1 is an avg pool before conv3."""
    planes: int
    stride: int = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        d = self.dtype
        out = nn.relu(_bn(train, "bn1", d)(_conv(self.planes, 1, "conv1", d)(x)))
        out = nn.relu(_bn(train, "bn2", d)(_conv(self.planes, 3, "conv2", d)(out)))
        out = _avg_pool(out, self.stride)
        out = _bn(train, "bn3", d, zero_scale=True)(_conv(self.planes * 4, 1, "conv3", d)(out))
        identity = x
        if self.stride > 1 or x.shape[-1] != self.planes * 4:
            identity = _avg_pool(x, self.stride)
            identity = _conv(self.planes * 4, 1, "downsample_conv", d)(identity)
            identity = _bn(train, "downsample_bn", d)(identity)
        return nn.relu(out + identity)


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
        x = nn.relu(_bn(train, "bn1", d)(_conv(w // 2, 3, "conv1", d, stride=2)(x)))
        x = nn.relu(_bn(train, "bn2", d)(_conv(w // 2, 3, "conv2", d)(x)))
        x = nn.relu(_bn(train, "bn3", d)(_conv(w, 3, "conv3", d)(x)))
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
