"""The CLIP model: image tower `visual`, text tower `text`, learned temperature."""
import math
from typing import Any, Optional, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from clip_jax.models.layers import logical
from clip_jax.models.resnet import ModifiedResNet
from clip_jax.models.text import TextTransformer
from clip_jax.models.vit import VisionTransformer
from clip_jax.ops.plain import PLAIN, Ops

# The cap of the logit scale exp(t), as the paper: the model applies it, the optimiser
# clamps the parameter t to [0, log MAX_LOGIT_SCALE] (optim.clip_logit_scale).
MAX_LOGIT_SCALE = 100.0


def l2_normalize(x, eps=1e-12):
    """Rows scaled to unit L2 norm, in float32. JAX arrays (traced or not) stay on device;
    anything else (host features, lists) is computed in NumPy."""
    xp = jnp if isinstance(x, jax.Array) else np
    x = xp.asarray(x, xp.float32)
    return x / xp.maximum(xp.linalg.norm(x, axis=-1, keepdims=True), eps)


class CLIP(nn.Module):
    embed_dim: int
    # vision
    vision_kind: str            # 'resnet' | 'vit'
    image_size: int
    vision_layers: Union[int, Tuple[int, ...]]
    vision_width: int
    vision_patch_size: int
    vision_heads: int
    # text
    vocab_size: int
    context_length: int
    text_width: int
    text_heads: int
    text_layers: int
    # numerics
    dtype: Any = jnp.float32    # compute dtype; parameters are always float32
    remat: Any = False          # a remat policy name (layers.REMAT_POLICIES); True is "full"
    scan_layers: bool = False   # each tower's repeated blocks as one lax.scan
    activation: str = "quick_gelu"   # transformer MLPs: 'quick_gelu' (OpenAI) or 'gelu'
    ops: Ops = PLAIN            # the kernels (clip_jax.ops): the plain code unless a platform's
    # The learned temperature's initial log, and the learned logit bias (None: none): the
    # paper's 1/0.07; SigLIP's log 10 and -10 (its entry in losses.LOSSES).
    logit_scale_init: float = math.log(1 / 0.07)
    logit_bias_init: Optional[float] = None

    def setup(self):
        if self.vision_kind == "resnet":
            self.visual = ModifiedResNet(
                layers=tuple(self.vision_layers), output_dim=self.embed_dim,
                heads=self.vision_heads, image_size=self.image_size,
                width=self.vision_width, remat=self.remat, scan=self.scan_layers, dtype=self.dtype,
                ops=self.ops)
        elif self.vision_kind == "vit":
            self.visual = VisionTransformer(
                image_size=self.image_size, patch_size=self.vision_patch_size,
                width=self.vision_width, layers=int(self.vision_layers),
                heads=self.vision_heads, output_dim=self.embed_dim,
                remat=self.remat, scan=self.scan_layers, activation=self.activation,
                dtype=self.dtype, ops=self.ops)
        else:
            raise ValueError(f"unknown vision kind {self.vision_kind!r}")
        self.text = TextTransformer(
            vocab_size=self.vocab_size, context_length=self.context_length,
            width=self.text_width, heads=self.text_heads, layers=self.text_layers,
            output_dim=self.embed_dim, remat=self.remat, scan=self.scan_layers,
            activation=self.activation, dtype=self.dtype, ops=self.ops)
        self.logit_scale = self.param(
            "logit_scale", logical(nn.initializers.constant(self.logit_scale_init), ()),
            (), jnp.float32)
        if self.logit_bias_init is not None:
            self.logit_bias = self.param(
                "logit_bias", logical(nn.initializers.constant(self.logit_bias_init), ()),
                (), jnp.float32)

    def encode_image(self, images, train: bool = False):
        """images: float [B, H, W, 3] (normalised). Returns float32 [B, embed_dim]."""
        return self.visual(images, train).astype(jnp.float32)

    def encode_text(self, tokens):
        """tokens: int32 [B, context_length]. Returns float32 [B, embed_dim]."""
        return self.text(tokens).astype(jnp.float32)

    def logit_params(self):
        """(logit_scale = min(exp(param), 100), logit_bias or None), as the losses take them."""
        scale = jnp.minimum(jnp.exp(self.logit_scale.astype(jnp.float32)), MAX_LOGIT_SCALE)
        return scale, (self.logit_bias if self.logit_bias_init is not None else None)

    def __call__(self, images, tokens, train: bool = False):
        image_embeds = l2_normalize(self.encode_image(images, train))
        text_embeds = l2_normalize(self.encode_text(tokens))
        logit_scale, logit_bias = self.logit_params()
        return dict(image_embeds=image_embeds, text_embeds=text_embeds,
                    logit_scale=logit_scale, logit_bias=logit_bias)
