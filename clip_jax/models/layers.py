"""Shared building blocks: dense layers, multi-head attention, pre-LN residual blocks.

Parameters are always float32 (`param_dtype`); `dtype` is the compute dtype.
Every parameter initialiser carries logical axis names (MaxText style) via
`nn.with_logical_partitioning`; the names are mapped to mesh axes by the rules in
`config_lib.DEFAULT_RULES`.

The dense products run on `ops` (`clip_jax.ops.plain.Ops`: the plain code, `PLAIN`, unless
a platform's kernels are given).
"""
import math
from typing import Any, Callable, Optional, Tuple, Union

import jax
import jax.numpy as jnp
import flax.linen as nn
from jax.ad_checkpoint import checkpoint_name
from clip_jax.models.layout import LAYERS
from clip_jax.ops.plain import PLAIN, Ops

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


def layer_norm(dtype, name):
    """LayerNorm (eps 1e-5) with logically-named scale/bias ('norm')."""
    return nn.LayerNorm(
        epsilon=LN_EPS, dtype=dtype, param_dtype=jnp.float32,
        scale_init=logical(ones, ("norm",)), bias_init=logical(zeros, ("norm",)),
        name=name)


class DenseGeneral(nn.Module):
    """A dense layer over the trailing input axes `axis` to output axes `features`, whose
    kernel is created with its full shape (flax's `nn.DenseGeneral` initialises a flattened
    2-D kernel and reshapes it, which breaks logical sharding constraints on 3-D kernels
    under a mesh). The product is one 2-D `matmul`."""
    features: Union[int, Tuple[int, ...]]
    axis: Union[int, Tuple[int, ...]] = -1
    use_bias: bool = True
    kernel_init: Callable = nn.initializers.lecun_normal()
    bias_init: Callable = zeros
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    ops: Ops = PLAIN

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
        n_in, n_out = math.prod(kernel.shape[:len(axis)]), math.prod(features)
        y = self.ops.matmul(
            x.reshape(-1, n_in), kernel.reshape(n_in, n_out),
            None if bias is None else bias.reshape(n_out), self.dtype)
        # Named for the 'minimal' remat policy: in a lower precision the product is inside a
        # custom_vjp (ops.matmul), where a policy on `dot_general` does not see it.
        return checkpoint_name(y, "dense").reshape(lead + features)


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
    ops: Ops = PLAIN

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
                dtype=self.dtype, param_dtype=jnp.float32, ops=self.ops,
                kernel_init=logical(normal(self.qkv_std), ("embed", "heads", "kv")),
                bias_init=logical(zeros, ("heads", "kv")), name=name)

        # Named for the remat policies that keep them (`REMAT_POLICIES`).
        q = checkpoint_name(proj("query")(inputs_q), "query_proj")      # [B, T, N, H]
        k = checkpoint_name(proj("key")(inputs_kv), "key_proj")         # [B, S, N, H]
        v = checkpoint_name(proj("value")(inputs_kv), "value_proj")
        x = self.ops.attention(q, k, v, causal=causal, kv_lengths=kv_lengths)
        x = checkpoint_name(x, "attention_out")
        return DenseGeneral(
            features=out_features, axis=(-2, -1), use_bias=True,
            dtype=self.dtype, param_dtype=jnp.float32, ops=self.ops,
            kernel_init=logical(normal(self.out_std), ("heads", "kv", self.out_name)),
            bias_init=logical(zeros, (self.out_name,)), name="out")(x)


class MLP(nn.Module):
    """c_fc (4x width) -> QuickGELU (or `activation`) -> c_proj."""
    fc_std: float
    proj_std: float
    activation: str = "quick_gelu"
    dtype: Dtype = jnp.float32
    ops: Ops = PLAIN

    @nn.compact
    def __call__(self, x):
        width = x.shape[-1]
        x = DenseGeneral(4 * width, dtype=self.dtype, ops=self.ops,
                         kernel_init=logical(normal(self.fc_std), ("embed", "mlp")),
                         bias_init=logical(zeros, ("mlp",)), name="c_fc")(x)
        x = ACTIVATIONS[self.activation](x)
        return DenseGeneral(width, dtype=self.dtype, ops=self.ops,
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
    ops: Ops = PLAIN

    @nn.compact
    def __call__(self, x, readout=None):
        x = nn.with_logical_constraint(x, ACT_SPEC)
        attn = MultiHeadAttention(num_heads=self.heads, qkv_std=self.attn_std,
                                  out_std=self.proj_std, dtype=self.dtype, ops=self.ops,
                                  name="attn")
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
                    dtype=self.dtype, ops=self.ops, name="mlp")(layer_norm(self.dtype, "ln_2")(x))
        return nn.with_logical_constraint(x, ACT_SPEC)


class Transformer(nn.Module):
    """A stack of `layers` residual blocks, optionally rematerialised.

    Initialisation follows OpenAI's `initialize_parameters`: attention q/k/v std
    width^-0.5, attention output and MLP c_proj std width^-0.5 * (2 layers)^-0.5,
    MLP c_fc std (2 width)^-0.5.

    Called with `readout` (int [B]), it returns only the row `readout[b]` of each sample,
    [B, width], and its last block computes only those rows: the towers read out one token
    (ViT's class token, the text's end-of-text token), so the last block's query, output
    projection and MLP over the other rows are dead work, ~80% of that block (~6% of a
    ViT-B/32 or text tower step). Same parameters, same result up to rounding.

    The blocks before the last are one module, `resblocks`, whose parameters are stacked
    on a leading 'layers' axis (`stacked`, `nn.scan`); the last is `resblocks_last`
    (`models.layout`). `scan`: they run as one loop, compiled once; otherwise the loop is
    unrolled in the program. The parameters are the same either way.
    """
    width: int
    layers: int
    heads: int
    causal: bool = False
    remat: Union[bool, str] = False      # a policy name (`REMAT_POLICIES`); True is 'full'
    scan: bool = False
    activation: str = "quick_gelu"
    dtype: Dtype = jnp.float32
    ops: Ops = PLAIN

    @nn.compact
    def __call__(self, x, readout=None):
        kwargs = dict(heads=self.heads, attn_std=self.width ** -0.5,
                      proj_std=self.width ** -0.5 * (2 * self.layers) ** -0.5,
                      fc_std=(2 * self.width) ** -0.5, causal=self.causal,
                      activation=self.activation, dtype=self.dtype, ops=self.ops)
        if self.layers > 1:
            block = remat_if(ResidualAttentionBlock, self.remat, scanned=self.scan)
            x = stacked(block(**kwargs, name="resblocks"), x, self.layers - 1, scan=self.scan)
        last = remat_if(ResidualAttentionBlock, self.remat)(**kwargs, name="resblocks_last")
        x = last(x, readout)
        return x if readout is None else x[:, 0]


# Remat policies by name (MaxText's style): what a rematerialised residual block keeps from
# its forward pass for the backward; the rest is recomputed. `jax.checkpoint_policies` builds
# them; the names are the `checkpoint_name`s of `DenseGeneral` and `MultiHeadAttention`.
_policies = jax.checkpoint_policies
REMAT_POLICIES = {
    "none": None,                                          # not rematerialised: keeps everything
    "full": _policies.nothing_saveable,                    # keeps the block's input only
    # every dense layer's output (q/k/v, attention output and MLP projections: the products
    # without batch dimensions, MaxText's 'minimal'); recomputes the attention's batched
    # products, softmax, norms and activations. By name, not `dots_with_no_batch_dims_
    # saveable`: in bfloat16 the products are inside ops.matmul's custom_vjp, which that
    # policy does not see (it then kept nothing, as 'full': the same 5.60 GiB and FLOPs for
    # ViT-B/16 on v5e-256)
    "minimal": _policies.save_only_these_names("dense"),
    "save_qkv_proj": _policies.save_only_these_names("query_proj", "key_proj", "value_proj"),
    "save_attention_out": _policies.save_only_these_names("attention_out"),
}


def remat_policy(value):
    """A `model.remat` value as a policy name: a name of `REMAT_POLICIES`, or (configs
    before the names) True for 'full' and False for 'none', also as the strings a command
    line gives ('True', 'false')."""
    if isinstance(value, bool) or value is None:
        return "full" if value else "none"
    name = str(value)
    name = {"true": "full", "false": "none"}.get(name.lower(), name)
    if name not in REMAT_POLICIES:
        raise ValueError(f"model.remat: {value!r} is not a remat policy; the policies: "
                         f"{', '.join(REMAT_POLICIES)} (True is 'full', False 'none')")
    return name


def remat_if(cls, remat, scanned=False, static_argnums=()):
    """`cls`, rematerialised (`nn.remat`) with the policy `remat` (`remat_policy`) unless it is
    'none': its activations, but those the policy keeps, are recomputed in the backward pass.
    Inside a rolled loop (`scanned`) common subexpressions need no guarding
    (`prevent_cse=False`, as jax recommends under `lax.scan`)."""
    name = remat_policy(remat)
    if name == "none":
        return cls
    return nn.remat(cls, policy=REMAT_POLICIES[name], prevent_cse=not scanned,
                    static_argnums=static_argnums)


def stacked(block, x, length, *args, scan=True, collections=("params",)):
    """`x` through `length` copies of the module `block` in sequence (each called as
    `block(x, *args)`, `args` the same for all), their variables stacked on a leading axis
    of logical name 'layers' (`nn.scan`, as big_vision and MaxText do).

    `scan`: the copies run as one loop, which XLA compiles once (unrolled, a ViT-L/14 train
    step took more than the 24 GB of this project's host to compile for a TPU pod); False
    unrolls the loop in the program (`unroll=length`), for a platform that runs some
    operations slower in a loop (`clip_jax.ops.cpu`). Variables and results are the same.
    `collections` are stacked: 'params' and, for BatchNorm, 'batch_stats' (updated for
    every copy when mutable)."""
    def body(module, carry):
        return module(carry, *args), None
    scanned = nn.scan(body, variable_axes={c: 0 for c in collections},
                      split_rngs={"params": True}, length=length,
                      unroll=1 if scan else length,
                      metadata_params={nn.PARTITION_NAME: LAYERS})
    return scanned(block, x)[0]
