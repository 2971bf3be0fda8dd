"""XLA:CPU variants of the models' platform-dependent pieces (`CpuOps`).

Each function here computes what its plain counterpart (`clip_jax/ops/plain.py`) computes
(the tests check forward and backward against it) in a form that XLA:CPU runs faster. Why each
one pays, measured piece by piece on 2-core AVX512-BF16 CPUs, is in BUILD_NOTES
("Platform ops on CPU"):

- `matmul`: in bfloat16, the backward products read stored transposes (a copy of a few
  MB). Left to itself XLA folds a transpose into the product's dimension numbers (or reads
  the float32 kernel), forms that XLA:CPU runs by upcasting to float32 at about half the
  rate of its bfloat16 kernel.
- `conv`: 1x1 convolutions as that matmul; wide bfloat16 3x3 convolutions as im2col + one
  such product (XLA:CPU upcasts bfloat16 convolutions to float32); the float32 accumulator
  handed to the BatchNorm that follows every ResNet convolution, instead of a rounding pass
  that the BatchNorm converts straight back.
- `batch_norm`: one custom-VJP function for BatchNorm + residual + ReLU whose backward is
  two passes over the activations and never stores `x - mean` in float32.
- `avg_pool`: the k x k, stride-k pool as a reshape and a float32 mean, whose gradient is a
  broadcast (`nn.avg_pool`'s is a padded `reduce_window`, run in float32 between two
  conversions).
- `scan_convolutions` False: the ResNet's stages unrolled (see `CpuOps`).

None of this is used on a TPU or GPU mesh: `clip_jax.ops.select` picks these only for a
mesh of CPU devices (or `config.kernels.ops = 'cpu'`).
"""
import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental.layout import Layout, with_layout_constraint

from clip_jax.ops import plain

# The pieces of `CpuOps`, each of which `config.kernels.cpu_ops_off` can leave to the plain
# code to measure what it gains (`off`).
PIECES = ("stored_transposes", "conv_1x1_as_matmul", "im2col", "float32_accumulator",
          "batch_norm_backward", "pool_as_mean", "unrolled_convolutions")

# The smallest input width at which `conv` runs a bfloat16 3x3 convolution as im2col: below
# it (RN50's stem and first stage, 32-64 channels at 112x112 and 56x56) the copies cost more
# than the faster product gains.
IM2COL_MIN_CHANNELS = 128


def _row_major(x):
    """The 2-D array x, stored row-major: the layout XLA:CPU's bfloat16 product kernel reads
    and writes."""
    return with_layout_constraint(x, Layout(major_to_minor=(0, 1)))


def _stored_transpose(x):
    """x.T as a stored copy (a few MB), so that the backward products g @ kernel.T and x.T @ g
    read a row-major operand instead of XLA folding the transpose into the product."""
    return _row_major(jnp.transpose(x))


def matmul(x, kernel, bias, dtype, out_dtype=None):
    """`plain.matmul` whose bfloat16 backward products read stored transposes."""
    return plain.matmul(x, kernel, bias, dtype, out_dtype, transpose=_stored_transpose)


def _im2col_3x3(x, per_image):
    """x [N, H, W, C] -> [N*H*W, 9*C]: the 3x3 neighbourhood of each position (zero padding 1),
    tap-major (dy, dx), so that cols @ kernel.reshape(9*C, O) is the 'same' convolution.

    One gather of C-channel rows from the padded input; XLA fuses the padding (and the
    packing below) into it. With `per_image` the batch is the gather's batching dimension,
    so a batch-sharded input stays sharded (gathering from the flattened batch makes XLA
    all-gather it); on one device the flat gather is a few percent faster. Two-byte values
    move as pairs packed in uint32 words (C even): XLA:CPU's gather copies 32-bit words
    several times as fast as 16-bit ones."""
    n, h, w, c = x.shape
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


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv3x3_im2col(x, kernel, out_dtype, per_image):
    """The 3x3, stride-1, padding-1 convolution of x [N, H, W, C] (compute dtype) with the
    float32 kernel [3, 3, C, O] (HWIO), as im2col + one product that takes x's dtype and
    accumulates in float32, rounded once to `out_dtype` (float32: not rounded). The
    backward is two products of the same kind: dx = im2col(g) @ the flipped kernel, and
    dkernel = g.T @ im2col(x), straight in float32."""
    n, h, w, c = x.shape
    y = jnp.dot(_im2col_3x3(x, per_image), kernel.astype(x.dtype).reshape(9 * c, -1),
                preferred_element_type=jnp.float32)
    return y.astype(out_dtype).reshape(n, h, w, -1)


def _conv3x3_im2col_fwd(x, kernel, out_dtype, per_image):
    # The backward rebuilds the im2col buffer: saving it (9x x's memory) was no faster.
    return conv3x3_im2col(x, kernel, out_dtype, per_image), (x, kernel)


def _conv3x3_im2col_bwd(out_dtype, per_image, saved, g):
    x, kernel = saved
    g = g.astype(x.dtype)
    n, h, w, c = x.shape
    o = kernel.shape[-1]
    # The input gradient is the 'same' convolution of g with the kernel rotated by 180
    # degrees and its channel axes swapped: [3, 3, O, C] -> [9*O, C].
    flipped = jnp.transpose(kernel[::-1, ::-1].astype(x.dtype), (0, 1, 3, 2)).reshape(9 * o, c)
    dx = jnp.dot(_im2col_3x3(g, per_image), flipped, preferred_element_type=jnp.float32)
    # g.T stored transposed, and the [O, 9C] product kept in that layout until the transpose
    # below: XLA:CPU has no bf16 x bf16 -> f32 product writing the transposed layout.
    dkernel_t = _row_major(jnp.dot(_stored_transpose(g.reshape(n * h * w, o)),
                                   _im2col_3x3(x, per_image), preferred_element_type=jnp.float32))
    return dx.astype(x.dtype).reshape(x.shape), dkernel_t.T.reshape(3, 3, c, o)


conv3x3_im2col.defvjp(_conv3x3_im2col_fwd, _conv3x3_im2col_bwd)


_STAT_AXES = (0, 1, 2)       # NHWC: statistics per channel over batch and space


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def batch_norm(x, scale, bias, residual, epsilon, relu, dtype):
    """`plain.Ops.batch_norm` (training-mode BatchNorm, `+ residual`, ReLU if `relu`;
    returns (y in `dtype`, batch mean, batch variance)) with a hand-written backward."""
    return _bn_fwd(x, scale, bias, residual, epsilon, relu, dtype)[0]


def _bn_normalise(x, mean, inv, scale, bias, residual, relu, dtype):
    y = (x.astype(jnp.float32) - mean) * (inv * scale) + bias
    if residual is not None:
        y = y + residual.astype(jnp.float32)
    return (jnp.maximum(y, 0.0) if relu else y).astype(dtype)


def _bn_fwd(x, scale, bias, residual, epsilon, relu, dtype):
    xf = x.astype(jnp.float32)
    mean = xf.mean(_STAT_AXES)
    var = jnp.maximum(0.0, (xf * xf).mean(_STAT_AXES) - mean * mean)
    inv = jax.lax.rsqrt(var + epsilon)
    y = _bn_normalise(x, mean, inv, scale, bias, residual, relu, dtype)
    # An empty array of the residual's dtype, or None: whether there is a residual, statically.
    residual_marker = None if residual is None else jnp.zeros((0,), residual.dtype)
    return (y, mean, var), (x, y, scale, mean, inv, residual_marker)


def _bn_bwd(epsilon, relu, dtype, saved, cotangents):
    x, y, scale, mean, inv, residual_marker = saved
    dy, dmean, dvar = cotangents
    m = x.size // x.shape[-1]
    g = dy.astype(jnp.float32)
    if relu:
        g = jnp.where(y > 0, g, 0.0)        # the ReLU's mask, read from the saved output
    xf = x.astype(jnp.float32)
    centred = xf - mean
    dbias = g.sum(_STAT_AXES)
    # sum(g * centred) as sum(g * x) - mean * sum(g): XLA:CPU's reduction kernels take a
    # product but not the subtraction, so the centred form stored x - mean in float32 for
    # them, one more pass over the activations per BatchNorm.
    dscale = ((g * xf).sum(_STAT_AXES) - mean * dbias) * inv
    dx = ((scale * inv) * (g - dbias / m - centred * (inv * dscale / m))
          + dmean / m + centred * (2.0 * dvar / m))
    dresidual = None if residual_marker is None else g.astype(residual_marker.dtype)
    return dx.astype(x.dtype), dscale, dbias, dresidual


batch_norm.defvjp(_bn_fwd, _bn_bwd)


def avg_pool(x, k):
    """`nn.avg_pool` with a k x k window and stride k ('VALID'), as a reshape and a mean
    accumulated in float32 (rounded once). Sides not divisible by k fall back to
    `nn.avg_pool`."""
    n, h, w, c = x.shape
    if k == 1:
        return x
    if h % k or w % k:
        return nn.avg_pool(x, (k, k), strides=(k, k), padding="VALID")
    return x.reshape(n, h // k, k, w // k, k, c).mean((2, 4), dtype=jnp.float32).astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class CpuOps(plain.Ops):
    """The XLA:CPU variants, as the models take them (`ops=` of `models.CLIP`): the plain
    kernels (`plain.Ops`) with these pieces replaced.

    per_image_im2col: gather each image's 3x3 windows separately; True when the batch is
    split over several devices (see `_im2col_3x3`).
    off: pieces (`PIECES`) left to the plain code, so that a side-by-side run measures what
    each gains (`config.kernels.cpu_ops_off`, `benchmarks/side_by_side.py --variant`): a
    piece stays only while that measurement shows it pays (BUILD_NOTES "Platform ops on
    CPU")."""
    per_image_im2col: bool = False
    off: frozenset = frozenset()

    def __post_init__(self):
        unknown = sorted(set(self.off) - set(PIECES))
        if unknown:
            raise ValueError(f"unknown CPU kernel piece(s) {unknown}; the pieces are {PIECES}")
        object.__setattr__(self, "off", frozenset(self.off))

    def _on(self, piece):
        return piece not in self.off

    @property
    def scan_convolutions(self):
        """XLA:CPU runs a convolution's kernel gradient inside a loop (a scanned ResNet
        stage's backward) some 25x slower than the same gradient unrolled: a 4-block 3x3
        stack took 22 s against 0.8 s forward + backward, and RN50's float32 step 72 s
        against 10 s. So on a CPU mesh the ResNet stages run unrolled whatever
        `model.scan_layers` says; the transformer towers still scan."""
        return not self._on("unrolled_convolutions")

    def matmul(self, x, kernel, bias, dtype, out_dtype=None):
        if self._on("stored_transposes"):
            return matmul(x, kernel, bias, dtype, out_dtype)
        return super().matmul(x, kernel, bias, dtype, out_dtype)

    def conv(self, x, kernel, stride, dtype):
        """`plain.Ops.conv` (a bias-free 'same' convolution). With the float32
        accumulator it returns the product's float32 sums, which the BatchNorm after it
        takes as they are, instead of a bfloat16 rounding that it converts straight back."""
        size, _, c, _ = kernel.shape
        x = x.astype(dtype)
        out_dtype = jnp.float32 if self._on("float32_accumulator") else x.dtype
        if size == 1 and stride == 1 and self._on("conv_1x1_as_matmul"):
            y = self.matmul(x.reshape(-1, c), kernel[0, 0], None, dtype, out_dtype=out_dtype)
            return y.reshape(x.shape[:-1] + kernel.shape[-1:])
        if (size == 3 and stride == 1 and x.dtype == jnp.bfloat16
                and c >= IM2COL_MIN_CHANNELS and self._on("im2col")):
            return conv3x3_im2col(x, kernel, out_dtype, self.per_image_im2col)
        return super().conv(x, kernel, stride, dtype, out_dtype)

    def batch_norm(self, x, scale, bias, residual, epsilon, relu, dtype):
        if self._on("batch_norm_backward"):
            return batch_norm(x, scale, bias, residual, epsilon, relu, jnp.dtype(dtype))
        return super().batch_norm(x, scale, bias, residual, epsilon, relu, dtype)

    def avg_pool(self, x, k):
        return avg_pool(x, k) if self._on("pool_as_mean") else super().avg_pool(x, k)
