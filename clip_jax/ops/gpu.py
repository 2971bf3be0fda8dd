"""The GPU variant of the models' platform-dependent pieces (`GpuOps`): cuDNN's fused flash
attention.

`jax.nn.dot_product_attention` with no `implementation` is XLA's attention in jax 0.10.2
(the scores [B, N, T, S] built, softmaxed and multiplied out as separate products, and
kept for the backward pass unless the block is rematerialised). `implementation="cudnn"`
compiles to cuDNN's fused kernels instead (the `__cudnn$fmhaSoftmax` and
`__cudnn$fmhaSoftmaxBackward` custom calls, with jax's own sharding rule for them): the
scores never reach memory, and the backward recomputes them from the saved softmax
statistics.

cuDNN takes only some shapes and dtypes; `cudnn_allows` holds the limits jax checks
(jax/_src/cudnn/fused_attention_stablehlo.py, `check_is_flash_attention`): a 16-bit compute
dtype (bfloat16 or float16, never float32), a head dimension that is a multiple of 8 and at
most 128 (256 on Hopper and later; 128 is what can be known when the program is compiled
on a host without that GPU, as clip_jax.aot does). Every attention in the models passes
with the paper configs (head dimension 64, bfloat16): the towers' blocks (the text tower's
causal mask is cuDNN's CAUSAL mask), the read-out block's one query row (its key lengths
are cuDNN's PADDING mask) and the ResNet's attention pool. Other shapes and float32 runs
keep XLA's attention.

jax 0.10.2 also refuses, in training, any odd query or key length (its check treats the
placeholder it passes for "no bias" as a bias, whose backward needs even lengths), and
nearly every length here is odd: 197 (ViT-B/16), 257 (ViT-L/14), 577, 77 (text), 1 (the
read-out row, the attention pool's query). So `GpuOps.attention` pads an odd length by one
zero row and masks it with cuDNN's own padding mask (query and key lengths: the real ones),
then drops the padded output row: what it computes is the same attention, the gradients
of the padding are zero. The tests run this padded path with XLA's attention on a CPU
(`implementation="xla"`) against the plain attention, forward and backward; the GPU
compile shows the cuDNN custom calls (tests/test_aot_gpu.py).

Chosen only on a mesh of GPU devices (`clip_jax.ops.select`); never on a TPU or CPU, where
the cuDNN call does not exist. What the compile shows it changes (memory per GPU, the
custom calls) is in BUILD_NOTES ("GPU kernels").
"""
import dataclasses

import jax
import jax.numpy as jnp

from clip_jax.ops import plain

# The pieces of `GpuOps`, each of which `config.kernels.gpu_ops_off` can leave to the plain
# code (to compare, or to step around a cuDNN that refuses a shape at run time).
PIECES = ("cudnn_attention",)

CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
CUDNN_MAX_HEAD_DIM = 128


def cudnn_allows(query, key, value):
    """Whether cuDNN's flash attention takes these [B, T, N, H] operands (the module
    docstring); the masks the models use (causal, key lengths) all pass."""
    head_dim = query.shape[-1]
    return (query.dtype == key.dtype == value.dtype
            and any(query.dtype == jnp.dtype(d) for d in CUDNN_DTYPES)
            and value.shape[-1] == head_dim
            and head_dim % 8 == 0 and head_dim <= CUDNN_MAX_HEAD_DIM)


def _pad_to_even(x):
    """x [B, L, ...] with one zero row appended along L when L is odd."""
    if x.shape[1] % 2 == 0:
        return x
    return jnp.pad(x, [(0, 0), (0, 1)] + [(0, 0)] * (x.ndim - 2))


def padded_attention(query, key, value, causal, kv_lengths, implementation):
    """`plain.attention` with odd query and key lengths padded to even ones and the padding
    masked by the query and key lengths (the module docstring)."""
    batch, t, s = query.shape[0], query.shape[1], key.shape[1]
    if t % 2 == 0 and s % 2 == 0:
        return plain.attention(query, key, value, causal, kv_lengths, implementation)
    q_lengths = jnp.full((batch,), t, jnp.int32)
    kv_lengths = jnp.full((batch,), s, jnp.int32) if kv_lengths is None else kv_lengths
    out = jax.nn.dot_product_attention(
        _pad_to_even(query), _pad_to_even(key), _pad_to_even(value), is_causal=causal,
        query_seq_lengths=q_lengths, key_value_seq_lengths=jnp.asarray(kv_lengths, jnp.int32),
        implementation=implementation)
    return out[:, :t]


@dataclasses.dataclass(frozen=True)
class GpuOps(plain.Ops):
    """The plain kernels (`plain.Ops`) with the attention run by cuDNN where it can be
    (`cudnn_allows`). off: pieces (`PIECES`) left to the plain code. `implementation`:
    'cudnn'; the tests run the same code with 'xla' on a CPU."""
    off: frozenset = frozenset()
    implementation: str = "cudnn"

    def __post_init__(self):
        unknown = sorted(set(self.off) - set(PIECES))
        if unknown:
            raise ValueError(f"unknown GPU kernel piece(s) {unknown}; the pieces are {PIECES}")
        object.__setattr__(self, "off", frozenset(self.off))

    @property
    def in_shard_map(self):
        """JAX partitions the cuDNN attention call with `custom_partitioning`, which a
        shard_map's manual axes refuse."""
        return "cudnn_attention" in self.off

    def uses_cudnn(self, query, key, value):
        """Whether `attention` runs these operands on cuDNN."""
        return "cudnn_attention" not in self.off and cudnn_allows(query, key, value)

    def attention(self, query, key, value, causal=False, kv_lengths=None):
        if not self.uses_cudnn(query, key, value):
            return plain.attention(query, key, value, causal, kv_lengths)
        return padded_attention(query, key, value, causal, kv_lengths, self.implementation)
