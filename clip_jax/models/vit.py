"""OpenAI CLIP's VisionTransformer (NHWC inputs).

The parameters that meet the compute dtype outside a dense layer (the patch embedding, the
class and positional embeddings, the projection) are used so that their gradients are
float32, as the dense layers' are (`ops.plain.matmul`): the patch embedding is `ops.plain.conv`,
the embeddings are added in float32.
"""
from typing import Any

import jax.numpy as jnp
import flax.linen as nn

from clip_jax.models.layers import ACT_SPEC, Transformer, layer_norm, logical, normal
from clip_jax.ops.plain import PLAIN, Ops, conv

# PyTorch's default Conv2d init (kaiming_uniform(a=sqrt(5))): U(+-1/sqrt(fan_in)).
# OpenAI CLIP keeps the default for the patch embedding.
_torch_default_conv = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


class VisionTransformer(nn.Module):
    image_size: int
    patch_size: int
    width: int
    layers: int
    heads: int
    output_dim: int
    remat: Any = False          # a remat policy name (layers.REMAT_POLICIES); True is "full"
    scan: bool = False   # the transformer's blocks run as one loop (layers.stacked)
    activation: str = "quick_gelu"
    dtype: Any = jnp.float32
    ops: Ops = PLAIN     # the kernels (clip_jax.ops): the plain code unless a platform's

    @nn.compact
    def __call__(self, x, train: bool = False):
        del train  # no batch-dependent layers
        scale = self.width ** -0.5
        grid = self.image_size // self.patch_size
        x = PatchEmbedding(self.width, self.patch_size, dtype=self.dtype,
                           name="conv1")(x)              # [B, g*g, width], float32
        b = x.shape[0]
        cls = self.param("class_embedding", logical(normal(scale), ("embed",)),
                         (self.width,), jnp.float32)
        pos = self.param("positional_embedding", logical(normal(scale), ("pos", "embed")),
                         (grid * grid + 1, self.width), jnp.float32)
        cls = jnp.broadcast_to(cls, (b, 1, self.width))
        x = (jnp.concatenate([cls, x], axis=1) + pos).astype(self.dtype)
        x = layer_norm(self.dtype, "ln_pre")(x)
        x = nn.with_logical_constraint(x, ACT_SPEC)
        x = Transformer(width=self.width, layers=self.layers, heads=self.heads,
                        causal=False, remat=self.remat, scan=self.scan,
                        activation=self.activation, dtype=self.dtype, ops=self.ops,
                        name="transformer")(x, readout=jnp.zeros((b,), jnp.int32))
        x = layer_norm(self.dtype, "ln_post")(x)                    # the class token
        proj = self.param("proj", logical(normal(scale), ("embed", "joint")),
                          (self.width, self.output_dim), jnp.float32)
        return self.ops.matmul(x, proj, None, self.dtype, jnp.float32)


class PatchEmbedding(nn.Module):
    """The non-overlapping patch x patch convolution, with `nn.Conv`'s parameter (`kernel`
    [p, p, 3, width], no bias, PyTorch's default initialisation) and a float32 kernel
    gradient (`ops.plain.conv`). Returns float32 [B, g * g, width].

    (One product of the flattened patches with the kernel gives the same sums, but on a TPU
    the patches' transpose, whose minor dimension is the 3 colour channels, is laid out
    padded: the compiled ViT-B/32 step took 6.01 GiB per v4 chip that way, 4.85 with the
    convolution.)"""
    width: int
    patch_size: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, p = x.shape[0], self.patch_size
        kernel = self.param("kernel", logical(_torch_default_conv, (None, None, "conv_in", "conv_out")),
                            (p, p, x.shape[-1], self.width), jnp.float32)
        return conv(x, kernel, p, 0, self.dtype, jnp.float32).reshape(b, -1, self.width)
