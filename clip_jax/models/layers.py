"""Shared building blocks: QuickGELU, multi-head attention, pre-LN residual blocks.

Parameters are always float32 (`param_dtype`); `dtype` is the compute dtype.
Every parameter initialiser carries logical axis names (MaxText style) via
`nn.with_logical_partitioning`; the names are mapped to mesh axes by the rules in
`config_lib.DEFAULT_RULES`.
"""
import functools
import math
from typing import Any, Callable, Optional, Tuple, Union

import jax
import jax.numpy as jnp
import flax.linen as nn
from jax.experimental.layout import Layout, with_layout_constraint

Dtype = Any

LN_EPS = 1e-5
ACT_SPEC = ("batch", "length", "act_embed")


def logical(init, names):
    """Shorthand for `nn.with_logical_partitioning`."""
    return nn.with_logical_partitioning(init, tuple(names))


def normal(std):
    return nn.initializers.normal(stddev=std)


zeros = nn.initializers.zeros_init()
ones = nn.initializers.ones_init()


def quick_gelu(x):
    """QuickGELU as in OpenAI CLIP: x * sigmoid(1.702 x)."""
    return x * jax.nn.sigmoid(1.702 * x)


# config.model.activation -> function. OpenAI's models (and OpenCLIP's '-quickgelu' ones)
# use QuickGELU; OpenCLIP's other models use the exact (erf) GELU of torch's nn.GELU.
ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": lambda x: jax.nn.gelu(x, approximate=False)}


class QuickGELU(nn.Module):
    @nn.compact
    def __call__(self, x):
        return quick_gelu(x)


def layer_norm(dtype, name):
    """LayerNorm (eps 1e-5) with logically-named scale/bias ('norm')."""
    return nn.LayerNorm(
        epsilon=LN_EPS, dtype=dtype, param_dtype=jnp.float32,
        scale_init=logical(ones, ("norm",)), bias_init=logical(zeros, ("norm",)),
        name=name)


def _row_major(x):
    """The 2-D array x, stored row-major on CPU (other backends: as it is). Pins the layout
    XLA:CPU's bfloat16 product kernel reads and writes; see `_stored_transpose`."""
    if jax.default_backend() != "cpu":
        return x
    return with_layout_constraint(x, Layout(major_to_minor=(0, 1)))


def _stored_transpose(x):
    """x.T, stored transposed on CPU, for the backward products g @ kernel.T and x.T @ g.
    Left to itself XLA folds a transpose into the product (contracting the operand's other
    dimension, or, via `allow_excess_precision`, reading the float32 kernel), and XLA:CPU
    runs those forms by upcasting to float32: ~200 GFLOP/s on the profiled CPU against ~400
    for its bfloat16 kernel, which a stored copy of a few MB lets it use (ViT-B/32 bf16
    step 8.9 s -> 6.1 s; BUILD_NOTES "Performance"). Other backends take x.T as it is."""
    return _row_major(jnp.transpose(x))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _low_precision_matmul(x, kernel, bias, out_dtype):
    """x [M, K] (bfloat16) @ kernel [K, N] + bias [N] (float32 parameters, the kernel cast to
    x's dtype), accumulated in float32 and rounded to `out_dtype` once (float32: not rounded);
    the backward products likewise (see `matmul`)."""
    y = jnp.dot(x, kernel.astype(x.dtype), preferred_element_type=jnp.float32)
    return (y + bias).astype(out_dtype)


def _low_precision_matmul_fwd(x, kernel, bias, out_dtype):
    return _low_precision_matmul(x, kernel, bias, out_dtype), (x, kernel.astype(x.dtype))


def _low_precision_matmul_bwd(out_dtype, saved, g):
    x, kernel = saved
    dbias = jnp.sum(g, axis=0, dtype=jnp.float32)
    g = g.astype(x.dtype)
    dx = jnp.dot(g, _stored_transpose(kernel), preferred_element_type=jnp.float32).astype(x.dtype)
    # The parameters' gradients straight in float32 (their dtype): no rounding to bfloat16
    # and back.
    dkernel = jnp.dot(_stored_transpose(x), g, preferred_element_type=jnp.float32)
    return dx, dkernel, dbias


_low_precision_matmul.defvjp(_low_precision_matmul_fwd, _low_precision_matmul_bwd)


def matmul(x, kernel, dtype, bias=None, out_dtype=None):
    """x [..., K] @ kernel [K, N] (+ bias [N]) -> [..., N] in `out_dtype` (default: the
    compute `dtype`); kernel and bias are float32 parameters.

    In float32 this is `jnp.dot`. In a lower precision (bfloat16) the products take bfloat16
    inputs, accumulate in float32 and round the result to bfloat16, forward and backward
    (what mixed precision does on GPUs and TPUs, and torch.autocast on CPUs). Written so
    because XLA:CPU runs a bfloat16 x bfloat16 -> bfloat16 dot, which is what JAX's own
    gradient of a bfloat16 dot gives, on a slow upcasting path: profiled on a 2-core
    AVX512-BF16 CPU, ~160 GFLOP/s against ~350 for the same product accumulated in float32
    and rounded (BUILD_NOTES "Performance"). `out_dtype=float32` returns the float32
    accumulator unrounded (for a consumer that computes in float32 anyway: BatchNorm).
    """
    lead = x.shape[:-1]
    x = jnp.asarray(x, dtype).reshape(-1, x.shape[-1])
    if jnp.dtype(dtype) == jnp.float32:
        y = jnp.dot(x, kernel)
        if bias is not None:
            y = y + bias
    else:
        zero = jnp.zeros(kernel.shape[1:], jnp.float32)
        y = _low_precision_matmul(x, kernel, zero if bias is None else bias,
                                  jnp.dtype(out_dtype or dtype))
    return y.reshape(lead + kernel.shape[1:])


class DenseGeneral(nn.Module):
    """A dense layer over the trailing input axes `axis` to output axes `features`, whose
    kernel is created with its full shape (flax's `nn.DenseGeneral` initialises a flattened
    2-D kernel and reshapes it, which breaks logical sharding constraints on 3-D kernels
    under a mesh). The product runs as one 2-D `matmul` (float32 accumulation in bfloat16)."""
    features: Union[int, Tuple[int, ...]]
    axis: Union[int, Tuple[int, ...]] = -1
    use_bias: bool = True
    kernel_init: Callable = nn.initializers.lecun_normal()
    bias_init: Callable = zeros
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
        axis = (self.axis,) if isinstance(self.axis, int) else tuple(self.axis)
        axis = tuple(a % x.ndim for a in axis)
        if axis != tuple(range(x.ndim - len(axis), x.ndim)):
            raise ValueError(f"DenseGeneral contracts trailing axes in order; got axis={self.axis}")
        kernel = self.param("kernel", self.kernel_init,
                            tuple(x.shape[a] for a in axis) + features, self.param_dtype)
        lead = x.shape[:x.ndim - len(axis)]
        bias = self.param("bias", self.bias_init, features, self.param_dtype) if self.use_bias else None
        y = matmul(x.reshape(lead + (-1,)), kernel.reshape(-1, math.prod(features)), self.dtype,
                   None if bias is None else bias.reshape(-1))
        return y.reshape(lead + features)


class MultiHeadAttention(nn.Module):
    """Multi-head attention with separate, biased q/k/v and output projections.

    Same parameter count as PyTorch's `nn.MultiheadAttention` (fused in_proj 3d*d+3d,
    out_proj d*d+d, or d*out+out when `out_features` differs).
    """
    num_heads: int
    qkv_std: float
    out_std: float
    out_features: Optional[int] = None
    out_name: str = "embed"       # logical name of the output dimension
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, inputs_q, inputs_kv=None, causal=False, kv_lengths=None):
        """kv_lengths: optional int [B]; query b attends only to keys [0, kv_lengths[b])."""
        if inputs_kv is None:
            inputs_kv = inputs_q
        width = inputs_q.shape[-1]
        assert width % self.num_heads == 0, (width, self.num_heads)
        head_dim = width // self.num_heads
        out_features = self.out_features or width

        def proj(name):
            return DenseGeneral(
                features=(self.num_heads, head_dim), axis=-1, use_bias=True,
                dtype=self.dtype, param_dtype=jnp.float32,
                kernel_init=logical(normal(self.qkv_std), ("embed", "heads", "kv")),
                bias_init=logical(zeros, ("heads", "kv")), name=name)

        q = proj("query")(inputs_q)      # [B, T, N, H]
        k = proj("key")(inputs_kv)       # [B, S, N, H]
        v = proj("value")(inputs_kv)
        x = jax.nn.dot_product_attention(q, k, v, is_causal=causal,
                                         key_value_seq_lengths=kv_lengths)
        return DenseGeneral(
            features=out_features, axis=(-2, -1), use_bias=True,
            dtype=self.dtype, param_dtype=jnp.float32,
            kernel_init=logical(normal(self.out_std), ("heads", "kv", self.out_name)),
            bias_init=logical(zeros, (self.out_name,)), name="out")(x)


class MLP(nn.Module):
    """c_fc (4x width) -> QuickGELU (or `activation`) -> c_proj."""
    fc_std: float
    proj_std: float
    activation: str = "quick_gelu"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        width = x.shape[-1]
        x = DenseGeneral(4 * width, dtype=self.dtype,
                         kernel_init=logical(normal(self.fc_std), ("embed", "mlp")),
                         bias_init=logical(zeros, ("mlp",)), name="c_fc")(x)
        x = ACTIVATIONS[self.activation](x)
        return DenseGeneral(width, dtype=self.dtype,
                            kernel_init=logical(normal(self.proj_std), ("mlp", "embed")),
                            bias_init=logical(zeros, ("embed",)), name="c_proj")(x)


class ResidualAttentionBlock(nn.Module):
    """Pre-LN block: x + attn(ln_1(x)); x + mlp(ln_2(x)).

    With `readout` (int [B], one position per sample) only that row of each sample is
    computed: its query attends to every key (causally, to keys up to it), and the
    output is [B, 1, width]. Used for the last block, whose other rows nobody reads.
    """
    heads: int
    attn_std: float
    proj_std: float
    fc_std: float
    causal: bool = False
    activation: str = "quick_gelu"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, readout=None):
        x = nn.with_logical_constraint(x, ACT_SPEC)
        attn = MultiHeadAttention(num_heads=self.heads, qkv_std=self.attn_std,
                                  out_std=self.proj_std, dtype=self.dtype, name="attn")
        h = layer_norm(self.dtype, "ln_1")(x)
        if readout is None:
            x = x + attn(h, causal=self.causal)
        else:
            readout = jnp.asarray(readout, jnp.int32)
            rows = readout[:, None, None]
            x = jnp.take_along_axis(x, rows, axis=1)                  # [B, 1, width]
            x = x + attn(jnp.take_along_axis(h, rows, axis=1), h,
                         kv_lengths=readout + 1 if self.causal else None)
        x = x + MLP(fc_std=self.fc_std, proj_std=self.proj_std, activation=self.activation,
                    dtype=self.dtype, name="mlp")(layer_norm(self.dtype, "ln_2")(x))
        return nn.with_logical_constraint(x, ACT_SPEC)


class Transformer(nn.Module):
    """A stack of `layers` residual blocks (`resblocks_{i}`), optionally rematerialised.

    Initialisation follows OpenAI's `initialize_parameters`: attention q/k/v std
    width^-0.5, attention output and MLP c_proj std width^-0.5 * (2 layers)^-0.5,
    MLP c_fc std (2 width)^-0.5.

    Called with `readout` (int [B]), it returns only the row `readout[b]` of each sample,
    [B, width], and its last block computes only those rows: the towers read out one token
    (ViT's class token, the text's end-of-text token), so the last block's query, output
    projection and MLP over the other rows are dead work, ~80% of that block (~6% of a
    ViT-B/32 or text tower step). Same parameters, same result up to rounding.
    """
    width: int
    layers: int
    heads: int
    causal: bool = False
    remat: bool = False
    activation: str = "quick_gelu"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, readout=None):
        attn_std = self.width ** -0.5
        proj_std = self.width ** -0.5 * (2 * self.layers) ** -0.5
        fc_std = (2 * self.width) ** -0.5
        block_cls = nn.remat(ResidualAttentionBlock) if self.remat else ResidualAttentionBlock
        for i in range(self.layers):
            last = i == self.layers - 1
            x = block_cls(heads=self.heads, attn_std=attn_std, proj_std=proj_std,
                          fc_std=fc_std, causal=self.causal, activation=self.activation,
                          dtype=self.dtype,
                          name=f"resblocks_{i}")(x, readout if last else None)
        return x if readout is None else x[:, 0]
