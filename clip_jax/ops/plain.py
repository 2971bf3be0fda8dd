"""The kernel interface the models call, and its plain code.

Every module of `clip_jax/models` that runs a platform-dependent piece takes an `ops`
field, an `Ops`, and calls the piece on it: `matmul` (every dense layer), `conv` (the
ResNet's convolutions), `batch_norm` (training-mode BatchNorm + residual + ReLU),
`avg_pool` (the ResNet's pools), `attention` (every multi-head attention), and reads `scan_convolutions` (whether a ResNet stage may
run as a loop). `Ops` itself is the plain code, which is what runs on TPUs (and on GPUs,
but for the attention), whose compilers fuse and lay out those pieces themselves; `PLAIN` is every module's default, so
whatever needs only shapes builds the plain model. A platform's kernels subclass it and
replace pieces (`clip_jax/ops/cpu.py`: `CpuOps`, `clip_jax/ops/gpu.py`: `GpuOps`);
`clip_jax.ops` chooses them.

Parameters are always float32; `dtype` is the compute dtype. The products (`matmul`,
`conv`, which the ViT's patch embedding uses too) keep the parameters' gradients in
float32 in a lower precision (BUILD_NOTES "Plain models and platform ops").

This is model code that lives beside the platform kernels rather than in `models/`: the
models' factory (`models.from_config`) chooses the kernels (`clip_jax.ops`), which
subclass these, so the interface sits below both.
"""
import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

_STAT_AXES = (0, 1, 2)       # NHWC: statistics per channel over batch and space


def matmul(x, kernel, bias, dtype, out_dtype=None, transpose=jnp.transpose):
    """x [M, K] @ kernel [K, N] (+ bias [N]) in the compute `dtype`; kernel and bias are
    float32 parameters. The result is in `out_dtype` (default: `dtype`).

    float32: `jnp.dot` + bias. A lower precision (bfloat16): the products take `dtype`
    operands and accumulate in float32, the bias is added in float32 before the one
    rounding, and the backward products likewise, with the parameters' gradients left in
    float32. JAX's own gradient would round the kernel's gradient to bfloat16 (the dtype of
    its cast copy), and XLA then sums it across the data-parallel devices in bfloat16 (the
    TPU compile shows bf16 all-reduces; BUILD_NOTES "Plain models and platform ops"); so the
    backward is written out, as plain `jnp.dot`s. `transpose` is how those products take
    their transposed operands (a platform may store them: `CpuOps`)."""
    x = x.astype(dtype)
    if jnp.dtype(dtype) == jnp.float32:
        y = jnp.dot(x, kernel)
        return (y if bias is None else y + bias).astype(out_dtype or dtype)
    # *_like: the kernel's shard_map type (varying copies in the gradient cache's pass 3)
    zero = jnp.zeros_like(kernel[0], jnp.float32)
    return _low_precision_matmul(x, kernel, zero if bias is None else bias,
                                 jnp.dtype(out_dtype or dtype), transpose)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _low_precision_matmul(x, kernel, bias, out_dtype, transpose):
    y = jnp.dot(x, kernel.astype(x.dtype), preferred_element_type=jnp.float32)
    return (y + bias).astype(out_dtype)


def _low_precision_matmul_fwd(x, kernel, bias, out_dtype, transpose):
    return _low_precision_matmul(x, kernel, bias, out_dtype, transpose), (x, kernel.astype(x.dtype))


def _low_precision_matmul_bwd(out_dtype, transpose, saved, g):
    x, kernel = saved
    dbias = jnp.sum(g, axis=0, dtype=jnp.float32)
    g = g.astype(x.dtype)
    dx = jnp.dot(g, transpose(kernel), preferred_element_type=jnp.float32).astype(x.dtype)
    dkernel = jnp.dot(transpose(x), g, preferred_element_type=jnp.float32)
    return dx, dkernel, dbias


_low_precision_matmul.defvjp(_low_precision_matmul_fwd, _low_precision_matmul_bwd)


def conv(x, kernel, stride, padding, dtype, out_dtype=None):
    """The bias-free convolution of x [N, H, W, C] with the float32 kernel [k, k, C, O]
    (HWIO), `stride` and `padding` (pixels on every side), in the compute `dtype`; the
    result in `out_dtype` (default: `dtype`).

    In a lower precision (bfloat16) the backward is written out, as `matmul`'s is, so that
    the kernel's gradient is float32: JAX's own rounds it to the dtype of the kernel's
    bfloat16 copy, and XLA then sums it across the data-parallel devices in bfloat16
    (`lax.conv_general_dilated` takes no mixed dtypes). The input gradient is JAX's own."""
    x = x.astype(dtype)
    if jnp.dtype(dtype) == jnp.float32:
        return _conv(x, kernel, stride, padding, out_dtype)
    return _low_precision_conv(x, kernel, stride, padding, jnp.dtype(out_dtype or dtype))


def _conv(x, kernel, stride, padding, out_dtype=None):
    return jax.lax.conv_general_dilated(
        x, kernel, (stride, stride), ((padding, padding), (padding, padding)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), preferred_element_type=out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _low_precision_conv(x, kernel, stride, padding, out_dtype):
    return _conv(x, kernel.astype(x.dtype), stride, padding, out_dtype)


def _low_precision_conv_fwd(x, kernel, stride, padding, out_dtype):
    return (_low_precision_conv(x, kernel, stride, padding, out_dtype),
            (x, kernel.astype(x.dtype)))


def _low_precision_conv_bwd(stride, padding, out_dtype, saved, g):
    x, kernel = saved
    g = g.astype(x.dtype)
    dx, = jax.vjp(lambda x: _conv(x, kernel, stride, padding), x)[1](g)
    return dx, conv_kernel_gradient(x, g, kernel.shape[0], stride, padding)


_low_precision_conv.defvjp(_low_precision_conv_fwd, _low_precision_conv_bwd)


def conv_kernel_gradient(x, g, size, stride, padding):
    """The gradient of `_conv(x, kernel, stride, padding)`'s kernel [size, size, C, O] for the
    output gradient g [N, H', W', O], accumulated and returned in float32: the convolution
    JAX's own transpose computes (batch and channels of x swapped, g as the window, dilated
    by the stride), with a float32 result."""
    pads = [(padding, size + stride * (out - 1) - n - padding)
            for n, out in zip(x.shape[1:3], g.shape[1:3])]
    return jax.lax.conv_general_dilated(
        x, g, (1, 1), pads, rhs_dilation=(stride, stride),
        dimension_numbers=("CHWN", "IHWO", "HWNC"), preferred_element_type=jnp.float32)


def attention(query, key, value, causal=False, kv_lengths=None, implementation=None):
    """Scaled dot-product attention of query [B, T, N, H] over key and value [B, S, N, H]
    (`jax.nn.dot_product_attention`): `causal`, query t attends to keys up to t; `kv_lengths`
    (int [B] or None), query row b attends to keys [0, kv_lengths[b]). `implementation`:
    None is XLA's attention (the plain code), 'cudnn' cuDNN's fused kernel (GPUs only:
    `clip_jax.ops.gpu`)."""
    return jax.nn.dot_product_attention(query, key, value, is_causal=causal,
                                        key_value_seq_lengths=kv_lengths,
                                        implementation=implementation)


def normalise(x, mean, var, scale, bias, residual, epsilon, relu, dtype):
    """BatchNorm with the statistics `mean`, `var`, then `+ residual` (None: none), then
    ReLU if `relu`; in float32, the result in `dtype`."""
    y = (x.astype(jnp.float32) - mean) * (jax.lax.rsqrt(var + epsilon) * scale) + bias
    if residual is not None:
        y = y + residual.astype(jnp.float32)
    return (jax.nn.relu(y) if relu else y).astype(dtype)


@dataclasses.dataclass(frozen=True)
class Ops:
    """The pieces a platform may replace, as the plain code (`PLAIN`). Frozen and compared
    by value: a module field, and part of the traced program."""
    # Whether a ResNet stage's repeated blocks may run as a loop (`model.scan_layers`).
    scan_convolutions = True
    # Whether the model may run inside a shard_map manual over some mesh axes (the gradient
    # cache's one-reduction pass, `train.make_gradient_fn`).
    in_shard_map = True

    def matmul(self, x, kernel, bias, dtype, out_dtype=None):
        """x [M, K] @ kernel [K, N] (+ bias [N]): the one dense product (`matmul`)."""
        return matmul(x, kernel, bias, dtype, out_dtype)

    def conv(self, x, kernel, stride, dtype, out_dtype=None):
        """The bias-free convolution of x [N, H, W, C] with the float32 kernel [k, k, C, O]
        (HWIO), 'same' padding (k - 1) // 2, in the compute `dtype` (`conv`: the kernel's
        gradient stays float32); the result in `out_dtype` (default: `dtype`)."""
        return conv(x, kernel, stride, (kernel.shape[0] - 1) // 2, dtype, out_dtype)

    def batch_norm(self, x, scale, bias, residual, epsilon, relu, dtype):
        """Training-mode BatchNorm over N, H, W in float32 (the biased variance, as flax's
        fast variance), then `+ residual` (None: none), then ReLU if `relu`.
        Returns (y in `dtype`, batch mean, batch variance)."""
        xf = x.astype(jnp.float32)
        mean = xf.mean(_STAT_AXES)
        var = jnp.maximum(0.0, (xf * xf).mean(_STAT_AXES) - mean * mean)
        return normalise(x, mean, var, scale, bias, residual, epsilon, relu, dtype), mean, var

    def attention(self, query, key, value, causal=False, kv_lengths=None):
        """Multi-head attention of query [B, T, N, H] over key, value [B, S, N, H]
        (`attention`): XLA's."""
        return attention(query, key, value, causal, kv_lengths)

    def avg_pool(self, x, k):
        """The k x k, stride-k average pool."""
        return x if k == 1 else nn.avg_pool(x, (k, k), strides=(k, k), padding="VALID")


PLAIN = Ops()
