"""OpenAI CLIP's VisionTransformer (NHWC inputs)."""
from typing import Any

import jax.numpy as jnp
import flax.linen as nn

from clip_jax.models.layers import ACT_SPEC, Transformer, layer_norm, logical, normal

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
    remat: bool = False
    scan: bool = False   # the transformer's blocks as one lax.scan (layers.scan_blocks)
    activation: str = "quick_gelu"
    dtype: Any = jnp.float32
    ops: Any = None      # a platform's kernels (clip_jax.ops); None: plain

    @nn.compact
    def __call__(self, x, train: bool = False):
        del train  # no batch-dependent layers
        scale = self.width ** -0.5
        grid = self.image_size // self.patch_size
        x = jnp.asarray(x, self.dtype)
        x = nn.Conv(self.width, (self.patch_size, self.patch_size),
                    strides=(self.patch_size, self.patch_size), padding="VALID",
                    use_bias=False, dtype=self.dtype, param_dtype=jnp.float32,
                    kernel_init=logical(_torch_default_conv,
                                        (None, None, "conv_in", "conv_out")),
                    name="conv1")(x)                      # [B, g, g, width]
        b = x.shape[0]
        x = x.reshape(b, -1, self.width)                  # [B, g*g, width]
        cls = self.param("class_embedding", logical(normal(scale), ("embed",)),
                         (self.width,), jnp.float32)
        pos = self.param("positional_embedding", logical(normal(scale), ("pos", "embed")),
                         (grid * grid + 1, self.width), jnp.float32)
        cls = jnp.broadcast_to(cls.astype(self.dtype), (b, 1, self.width))
        x = jnp.concatenate([cls, x], axis=1) + pos.astype(self.dtype)
        x = layer_norm(self.dtype, "ln_pre")(x)
        x = nn.with_logical_constraint(x, ACT_SPEC)
        x = Transformer(width=self.width, layers=self.layers, heads=self.heads,
                        causal=False, remat=self.remat, scan=self.scan,
                        activation=self.activation, dtype=self.dtype, ops=self.ops,
                        name="transformer")(x, readout=jnp.zeros((b,), jnp.int32))
        x = layer_norm(self.dtype, "ln_post")(x)                    # the class token
        proj = self.param("proj", logical(normal(scale), ("embed", "joint")),
                          (self.width, self.output_dim), jnp.float32)
        return jnp.dot(x, proj.astype(self.dtype), preferred_element_type=jnp.float32)
