"""OpenAI CLIP's text tower: a causal transformer read out at the end-of-text token."""
from typing import Any

import jax.numpy as jnp
import flax.linen as nn

from clip_jax.models.layers import ACT_SPEC, Transformer, layer_norm, logical, normal
from clip_jax.ops.plain import PLAIN, Ops


class TextTransformer(nn.Module):
    vocab_size: int
    context_length: int
    width: int
    heads: int
    layers: int
    output_dim: int
    remat: Any = False          # a remat policy name (layers.REMAT_POLICIES); True is "full"
    scan: bool = False   # the transformer's blocks run as one loop (layers.stacked)
    activation: str = "quick_gelu"
    dtype: Any = jnp.float32
    ops: Ops = PLAIN     # the kernels (clip_jax.ops): the plain code unless a platform's

    @nn.compact
    def __call__(self, tokens):
        """tokens: int32 [B, context_length], 0 = padding; EOT has the largest id."""
        tokens = jnp.asarray(tokens, jnp.int32)
        # Looked up and added in float32, then cast: the gradients of the table (a
        # scatter-add of every token's gradient) and of the positional embedding (a sum
        # over the batch) are summed in float32, not in the compute dtype.
        x = nn.Embed(self.vocab_size, self.width, dtype=jnp.float32, param_dtype=jnp.float32,
                     embedding_init=logical(normal(0.02), ("vocab", "embed")),
                     name="token_embedding")(tokens)
        pos = self.param("positional_embedding", logical(normal(0.01), ("pos", "embed")),
                         (self.context_length, self.width), jnp.float32)
        x = (x + pos[: tokens.shape[1]]).astype(self.dtype)
        x = nn.with_logical_constraint(x, ACT_SPEC)
        eot = jnp.argmax(tokens, axis=-1)
        x = Transformer(width=self.width, layers=self.layers, heads=self.heads,
                        causal=True, remat=self.remat, scan=self.scan,
                        activation=self.activation, dtype=self.dtype, ops=self.ops,
                        name="transformer")(x, readout=eot)             # [B, width]
        x = layer_norm(self.dtype, "ln_final")(x)
        proj = self.param("text_projection",
                          logical(normal(self.width ** -0.5), ("embed", "joint")),
                          (self.width, self.output_dim), jnp.float32)
        return self.ops.matmul(x, proj, None, self.dtype, jnp.float32)
