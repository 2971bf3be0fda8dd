"""clip_jax.ops: each XLA:CPU variant equals the plain model code it replaces, forward and
backward; the choice follows the mesh's devices; models/ never asks the process."""
import functools
import os
import re
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax.core import meta

from clip_jax import models, ops
from clip_jax.models import resnet
from clip_jax.ops import PLAIN, cpu, gpu, plain
from tests.helpers import REPO, run_python
from tests.test_models import build, make_images, make_tokens, small_cfg

CPU = cpu.CpuOps()


def _fake_mesh(platform, size=1):
    device = types.SimpleNamespace(platform=platform)
    return types.SimpleNamespace(devices=np.array([device] * size), size=size)


def test_select_follows_the_mesh_devices_not_the_process():
    assert ops.select("auto", _fake_mesh("cpu")) == cpu.CpuOps(per_image_im2col=False)
    assert ops.select("auto", _fake_mesh("cpu", 4)) == cpu.CpuOps(per_image_im2col=True)
    assert ops.select("cpu", _fake_mesh("cpu")) == cpu.CpuOps()
    # On this CPU process, a TPU mesh still gets the plain code, a GPU mesh the GPU kernels.
    assert ops.select("auto", _fake_mesh("tpu")) == PLAIN
    assert ops.select("auto", _fake_mesh("gpu", 8)) == ops.select("gpu", _fake_mesh("gpu")) == gpu.GpuOps()
    assert ops.select("auto", _fake_mesh("gpu"), off={"cudnn_attention"}) == gpu.GpuOps(off={"cudnn_attention"})
    for platform in ("tpu", "gpu"):
        with pytest.raises(ValueError, match="'cpu' kernels need CPU devices"):
            ops.select("cpu", _fake_mesh(platform))
    for platform in ("tpu", "cpu"):
        with pytest.raises(ValueError, match=f"'gpu' kernels need GPU devices, but the mesh's devices are '{platform}'"):
            ops.select("gpu", _fake_mesh(platform))
        assert ops.select("xla", _fake_mesh(platform)) == PLAIN
    assert ops.select("xla", _fake_mesh("gpu")) == PLAIN
    with pytest.raises(ValueError, match=r"config.kernels.ops: must be one of \('auto', 'xla', 'cpu', 'gpu'\) \(got 'fast'\)"):
        ops.select("fast", _fake_mesh("cpu"))


def test_models_and_kernels_never_ask_the_process_for_its_backend_or_devices():
    """The platform comes from the mesh (clip_jax.ops.select), so a step traced on a CPU
    host for a TPU topology is the TPU program."""
    forbidden = re.compile(r"default_backend\(|device_count\(|jax\.devices\(|local_devices\(")
    for package in ("models", "ops"):
        directory = os.path.join(REPO, "clip_jax", package)
        for name in sorted(os.listdir(directory)):
            if name.endswith(".py"):
                with open(os.path.join(directory, name)) as f:
                    assert not forbidden.search(f.read()), name


def test_the_models_call_their_kernels_without_fallbacks():
    """Every module reaches the kernels through its `ops` field, whose default is the plain
    code (`ops.PLAIN`): no getattr fallback, no None."""
    directory = os.path.join(REPO, "clip_jax", "models")
    for name in sorted(os.listdir(directory)):
        if name.endswith(".py"):
            with open(os.path.join(directory, name)) as f:
                text = f.read()
            assert "getattr(self.ops" not in text and "getattr(ops" not in text, name
            assert "ops: Any = None" not in text, name


@pytest.mark.parametrize("kind", ["resnet", "vit"])
def test_cpu_ops_model_equals_the_plain_model_in_float32(kind):
    """The whole model with the CPU kernels (ResNet: 1x1 convolutions as products, the
    BatchNorm's custom backward, the pools; ViT: the dense layers) against the plain code:
    embeddings, BatchNorm statistics and every parameter's gradient."""
    cfg = small_cfg(kind)
    plain = build(cfg)
    config = ml_collections.ConfigDict(dict(model=cfg, loss=dict(name="clip"), kernels=dict(ops="auto")))
    fast = models.from_config(config, _cpu_mesh())
    assert plain.ops == PLAIN and fast.ops == cpu.CpuOps()
    images, tokens = make_images(4, cfg.vision.image_size), make_tokens(4)
    variables = meta.unbox(plain.init(jax.random.key(0), images, tokens))
    weights = jax.random.normal(jax.random.key(1), (4, cfg.embed_dim))

    def objective(model, params):
        out, stats = model.apply({**variables, "params": params}, images, tokens, train=True,
                                 mutable=["batch_stats"])
        return jnp.sum(jnp.sin(3 * out["image_embeds"]) * weights + out["text_embeds"] * weights), stats

    results = [jax.jit(jax.value_and_grad(functools.partial(objective, m), has_aux=True))(
        variables["params"]) for m in (plain, fast)]
    (loss0, stats0), grads0 = results[0]
    (loss1, stats1), grads1 = results[1]
    np.testing.assert_allclose(loss1, loss0, rtol=1e-5)
    for a, b in zip(jax.tree.leaves((stats1, grads1)), jax.tree.leaves((stats0, grads0))):
        _assert_close(a, b, 1e-4)       # relative to each array's largest entry


def test_cpu_ops_unroll_the_resnet_stages_and_the_plain_code_scans_them():
    """XLA:CPU runs a scanned convolution's kernel gradient ~25x slower, so with the CPU
    kernels a ResNet with `scan_layers` runs its stages unrolled (the text tower still
    scans); the plain code scans them. Same embeddings either way."""
    cfg = small_cfg("resnet")
    with cfg.unlocked():
        cfg.vision.layers = (1, 3, 1, 1)       # a stage with blocks to scan
        cfg.text.layers = 3
        cfg.scan_layers = True
    plain, fast = build(cfg), build(cfg, kernels=cpu.CpuOps())
    images, tokens = make_images(2, cfg.vision.image_size), make_tokens(2)
    variables = meta.unbox(plain.init(jax.random.key(0), images, tokens))

    def scans(model, method):      # the loops left rolled (an unrolled one has unroll=length)
        inputs = images if method == "encode_image" else tokens
        jaxpr = jax.make_jaxpr(lambda v: model.apply(v, inputs, method=method))(variables)
        return re.findall(r"\bunroll=(\w+)", str(jaxpr)).count("1")

    assert scans(plain, "encode_image") >= 1 and scans(fast, "encode_image") == 0
    assert scans(fast, "encode_text") >= 1
    embed = lambda model: jax.jit(lambda v: model.apply(v, images, method="encode_image"))(variables)
    np.testing.assert_allclose(embed(fast), embed(plain), rtol=1e-4, atol=1e-5)


def _cpu_mesh():
    return jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


@pytest.mark.parametrize("piece", cpu.PIECES)
def test_each_cpu_piece_can_be_turned_off(piece):
    """`config.kernels.cpu_ops_off` (what the side-by-side turns off to measure a piece) leaves
    that piece to the plain code: the bfloat16 ResNet's gradient program changes, and it
    still computes what the plain model computes, to bfloat16 accuracy (embeddings; every
    gradient relative to the largest gradient entry: the bfloat16 models with and without
    the CPU kernels differ by up to ~5% of it, mostly from the pools' rounding). Each
    piece's own equality with the plain code is checked closely in the tests below."""
    cfg = small_cfg("resnet", dtype="bfloat16")
    with cfg.unlocked():
        cfg.vision.layers = (1, 1, 1, 3)       # a wide stage (im2col) with blocks to scan
        cfg.scan_layers = True
    ops_ = ops.from_config(ml_collections.ConfigDict(dict(ops="auto", cpu_ops_off=f" {piece} ")), _cpu_mesh())
    assert ops_ == cpu.CpuOps(off=frozenset({piece}))
    plain, full, without = build(cfg), build(cfg, kernels=CPU), build(cfg, kernels=ops_)
    images, tokens = make_images(4, cfg.vision.image_size), make_tokens(4)
    variables = meta.unbox(plain.init(jax.random.key(0), images, tokens))

    def objective(model, params):
        out, _ = model.apply({**variables, "params": params}, images, tokens, train=True,
                             mutable=["batch_stats"])
        return jnp.sum(jnp.sin(3 * out["image_embeds"]) + out["text_embeds"]), out["image_embeds"]

    grad = lambda m: jax.value_and_grad(functools.partial(objective, m), has_aux=True)
    assert str(jax.make_jaxpr(grad(without))(variables["params"])) != \
        str(jax.make_jaxpr(grad(full))(variables["params"]))
    (_, want), want_g = jax.jit(grad(plain))(variables["params"])
    (_, got), got_g = jax.jit(grad(without))(variables["params"])
    np.testing.assert_allclose(got, want, atol=2e-2)
    largest = max(float(np.abs(g).max()) for g in jax.tree.leaves(want_g))
    for a, b in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g)):
        assert float(np.abs(a - b).max()) <= 0.1 * largest


def test_cpu_pieces_are_checked_by_name():
    with pytest.raises(ValueError, match=r"unknown CPU kernel piece\(s\) \['im2cols'\]"):
        cpu.CpuOps(off={"im2cols"})
    kernels = ml_collections.ConfigDict(dict(ops="auto", cpu_ops_off="im2col,pool"))
    want = r"config.kernels.cpu_ops_off: unknown CPU kernel piece\(s\) \['pool'\]; the pieces are .* \(got 'im2col,pool'\)"
    for check in (ops.check, lambda k: ops.from_config(k, _cpu_mesh())):
        with pytest.raises(ValueError, match=want):
            check(kernels)


# ------------------------------------------------------------------------ matmul

def test_cpu_matmul_equals_the_plain_one():
    """The CPU matmul (stored transposes in the backward) equals the plain one, forward bit
    for bit and backward to float32 rounding (the kernels sum in another order), in both
    precisions; in bfloat16 both have the value and gradients of the float32 product to
    bfloat16 accuracy, the parameters' gradients in float32."""
    kx, kk, kb, kr = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(kx, (35, 48))
    kernel = jax.random.normal(kk, (48, 40)) * 48 ** -0.5
    bias = jax.random.normal(kb, (40,))
    r = jax.random.normal(kr, (35, 40))

    def loss(fn, dtype):
        return lambda x, k, b: jnp.sum(fn(x.astype(dtype), k, b, dtype).astype(jnp.float32) * r)

    exact, exact_g = jax.value_and_grad(loss(plain.matmul, jnp.float32), argnums=(0, 1, 2))(
        x, kernel, bias)
    for dtype in (jnp.float32, jnp.bfloat16):
        want, want_g = jax.jit(jax.value_and_grad(loss(plain.matmul, dtype), argnums=(0, 1, 2)))(
            x, kernel, bias)
        got, got_g = jax.jit(jax.value_and_grad(loss(cpu.matmul, dtype), argnums=(0, 1, 2)))(
            x, kernel, bias)
        np.testing.assert_array_equal(got, want)
        assert [g.dtype for g in got_g] == [g.dtype for g in want_g] == [jnp.float32] * 3
        for g, w, e in zip(got_g, want_g, exact_g):
            _assert_close(g, w, 1e-5)
            assert float(np.abs(g - e).max()) <= 2e-2 * float(np.abs(e).max())
    # The bfloat16 product is one rounding of the float32-accumulated one, bias included.
    y16 = cpu.matmul(x.astype(jnp.bfloat16), kernel, bias, jnp.bfloat16)
    rounded = jnp.dot(x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16),
                      preferred_element_type=jnp.float32) + bias
    np.testing.assert_array_equal(np.asarray(y16, np.float32),
                                  np.asarray(rounded.astype(jnp.bfloat16), np.float32))


def test_cpu_matmul_can_return_the_float32_accumulator():
    """`out_dtype=float32` (a ResNet convolution feeding its BatchNorm): the float32
    accumulator of the bfloat16 product, unrounded; the backward rounds the incoming
    gradient to bfloat16, so the input and kernel gradients equal the rounded form's."""
    kx, kk, kb, kr = jax.random.split(jax.random.key(1), 4)
    x = jax.random.normal(kx, (6, 48)).astype(jnp.bfloat16)
    kernel = jax.random.normal(kk, (48, 40)) * 48 ** -0.5
    bias = jax.random.normal(kb, (40,))
    r = jax.random.normal(kr, (6, 40)).astype(jnp.bfloat16).astype(jnp.float32)
    y = cpu.matmul(x, kernel, bias, jnp.bfloat16, out_dtype=jnp.float32)
    exact = jnp.dot(x, kernel.astype(jnp.bfloat16), preferred_element_type=jnp.float32) + bias
    assert y.dtype == jnp.float32
    np.testing.assert_array_equal(y, exact)

    def loss(out_dtype):
        return lambda x, k, b: jnp.sum(
            cpu.matmul(x, k, b, jnp.bfloat16, out_dtype=out_dtype).astype(jnp.float32) * r)

    unrounded = jax.grad(loss(jnp.float32), argnums=(0, 1, 2))(x, kernel, bias)
    rounded = jax.grad(loss(None), argnums=(0, 1, 2))(x, kernel, bias)
    for a, b in zip(unrounded, rounded):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def test_cpu_matmul_backward_keeps_bfloat16_products():
    """In the compiled gradient of a bfloat16 `cpu.matmul`, all three products (forward,
    input gradient, kernel gradient) keep bfloat16 operands, and none contracts dimension 0
    of its left operand (the forms XLA:CPU upcasts to float32): both backward products read
    stored transposes."""
    x = jnp.ones((64, 32), jnp.bfloat16)
    kernel = jnp.ones((32, 48), jnp.float32)
    grads = jax.jit(jax.grad(lambda k, x: jnp.sum(
        cpu.matmul(x, k, None, jnp.bfloat16).astype(jnp.float32) ** 2), argnums=(0, 1)))
    hlo = grads.lower(kernel, x).compile().as_text()
    products = []
    for computation in hlo.split("\n\n"):        # instruction names are local to each
        operand_types = dict(re.findall(r"(%[\w.\-]+) = (\w+)\[", computation))
        for operands, lhs_dim in re.findall(r"= \S+ dot\((.*?)\), lhs_contracting_dims=\{(\d)\}",
                                            computation):
            products.append((lhs_dim, [operand_types[n] for n in re.findall(r"%[\w.\-]+", operands)]))
    assert len(products) == 3, hlo              # forward, input gradient, kernel gradient
    assert products == [("1", ["bf16", "bf16"])] * 3, products
    assert "transpose" in hlo
    g = grads(kernel, x)
    np.testing.assert_allclose(np.asarray(g[0]), np.full((32, 48), 2 * 32 * 64, np.float32))


# ------------------------------------------------------------------------ convolutions

def _lax_conv(x, kernel, stride=1):
    pad = (kernel.shape[0] - 1) // 2
    return jax.lax.conv_general_dilated(x, kernel, (stride, stride), ((pad, pad), (pad, pad)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        precision="highest")


@pytest.mark.parametrize("size,stride,dtype,channels", [
    (1, 1, jnp.float32, 16), (1, 1, jnp.bfloat16, 16), (3, 1, jnp.bfloat16, 128),
    (3, 1, jnp.bfloat16, 64), (3, 1, jnp.float32, 128), (3, 2, jnp.bfloat16, 8)])
def test_cpu_conv_equals_the_plain_convolution(size, stride, dtype, channels):
    """Every path of `CpuOps.conv` (1x1 as a product, wide bfloat16 3x3 as im2col, the
    rest as XLA's convolution with a float32 accumulator) against `plain.Ops.conv`, forward
    and both gradients, relative to the largest entry: float32 to rounding, bfloat16 to
    its precision."""
    kx, kk, kg = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (2, 8, 6, channels)).astype(dtype)      # H != W: catches a swap
    kernel = jax.random.normal(kk, (size, size, channels, 12)) / (size * channels ** 0.5)
    out_shape = (2, 8 // stride, 6 // stride, 12)
    cotangent = jax.random.normal(kg, out_shape)
    tol = 1e-5 if dtype == jnp.float32 else 2e-2

    def loss(fn, x, kernel):
        return jnp.sum(fn(x, kernel, stride, dtype).astype(jnp.float32) * cotangent)

    got = jax.jit(CPU.conv, static_argnums=(2, 3))(x, kernel, stride, dtype)
    want = PLAIN.conv(x, kernel, stride, dtype)
    assert got.dtype == jnp.float32 and got.shape == want.shape == out_shape
    _assert_close(got, want, tol)
    g_got = jax.jit(jax.grad(functools.partial(loss, CPU.conv), (0, 1)))(x, kernel)
    g_want = jax.grad(functools.partial(loss, PLAIN.conv), (0, 1))(x, kernel)
    assert g_got[0].dtype == dtype and g_got[1].dtype == jnp.float32
    for a, b in zip(g_got, g_want):
        _assert_close(a, b, tol)


def _assert_close(got, want, tol):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert np.max(np.abs(got - want)) <= tol * np.max(np.abs(want)), (got, want)


@pytest.mark.parametrize("dtype,channels", [(jnp.float32, 5), (jnp.bfloat16, 6), (jnp.bfloat16, 5)])
@pytest.mark.parametrize("out_dtype", [None, jnp.float32])
def test_conv3x3_im2col_matches_the_convolution(dtype, channels, out_dtype):
    """The im2col form of the 3x3 convolution, forward and both gradients, against
    lax.conv_general_dilated in float32 on the values it sees: packed pairs (even bfloat16
    channel count) and plain copies (odd), rounded to bfloat16 or the float32 accumulator."""
    kx, kk, kg = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (2, 7, 5, channels)).astype(dtype)
    kernel = jax.random.normal(kk, (3, 3, channels, 4)) / 3.0
    cotangent = jax.random.normal(kg, (2, 7, 5, 4))
    out_dtype = out_dtype or dtype
    conv = lambda x, k: cpu.conv3x3_im2col(x, k, out_dtype, False)

    def loss(fn, x, kernel):
        return jnp.sum(fn(x, kernel).astype(jnp.float32) * cotangent)

    def reference(x, kernel):
        return _lax_conv(x.astype(jnp.float32), kernel.astype(dtype).astype(jnp.float32))

    got = jax.jit(conv)(x, kernel)
    assert got.dtype == out_dtype and got.shape == (2, 7, 5, 4)
    _assert_close(got, reference(x, kernel), 1e-5 if out_dtype == jnp.float32 else 1e-2)
    dx, dk = jax.jit(jax.grad(functools.partial(loss, conv), (0, 1)))(x, kernel)
    want_dx, want_dk = jax.grad(functools.partial(loss, reference), (0, 1))(x, kernel)
    assert dx.dtype == dtype and dk.dtype == jnp.float32 and dk.shape == kernel.shape
    tol = 1e-5 if dtype == jnp.float32 else 1e-2
    _assert_close(dx, want_dx, tol)
    _assert_close(dk, want_dk, tol)


@pytest.mark.parametrize("per_image", [False, True])
@pytest.mark.parametrize("dtype,channels", [(jnp.bfloat16, 6), (jnp.bfloat16, 5), (jnp.float32, 3)])
def test_im2col_3x3_is_the_nine_shifted_windows(dtype, channels, per_image):
    """`_im2col_3x3` (one gather, flat or per image; packed pairs for an even bfloat16
    channel count) equals the nine zero-padded windows side by side, tap-major, bit for bit."""
    x = jax.random.normal(jax.random.key(0), (2, 4, 3, channels)).astype(dtype)  # H != W
    padded = np.pad(np.asarray(x), ((0, 0), (1, 1), (1, 1), (0, 0)))
    want = np.concatenate([padded[:, dy:dy + 4, dx:dx + 3] for dy in range(3) for dx in range(3)],
                          -1).reshape(2 * 4 * 3, 9 * channels)
    got = jax.jit(functools.partial(cpu._im2col_3x3, per_image=per_image))(x)
    assert got.dtype == dtype
    np.testing.assert_array_equal(np.asarray(got), want)


def test_im2col_keeps_a_batch_sharded_input_sharded():
    """On a 4-device mesh `select` takes the per-image gather, which compiles to no
    collective under a batch-sharded input: each device gathers its own images' windows."""
    out = run_python("""
        import json, jax, jax.numpy as jnp
        from jax.sharding import NamedSharding, PartitionSpec as P
        from clip_jax import ops
        from clip_jax.ops.cpu import _im2col_3x3
        mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
        chosen = ops.select("auto", mesh)
        batch = NamedSharding(mesh, P("data"))
        x = jax.device_put(jnp.zeros((8, 6, 5, 8), jnp.bfloat16), batch)
        im2col = lambda x: _im2col_3x3(x, chosen.per_image_im2col)
        hlo = jax.jit(im2col, out_shardings=batch).lower(x).compile().as_text()
        kinds = ("all-gather", "all-to-all", "collective-permute", "all-reduce")
        found = [k for k in kinds if k + "(" in hlo or k + "-start(" in hlo]
        print(json.dumps({"per_image": chosen.per_image_im2col, "collectives": found}))
    """, n_devices=4)
    assert out == {"per_image": True, "collectives": []}


@pytest.mark.parametrize("dtype,channels,im2col", [
    (jnp.bfloat16, 128, True), (jnp.bfloat16, 64, False), (jnp.float32, 128, False)])
def test_conv_module_has_nn_conv_parameters_and_each_ops_path(dtype, channels, im2col):
    """`resnet.Conv` initialises exactly the parameter nn.Conv would (name, shape, values);
    the plain module is XLA's convolution, and the CPU kernels take the im2col path only in
    bfloat16 from IM2COL_MIN_CHANNELS input channels."""
    assert (channels >= cpu.IM2COL_MIN_CHANNELS) == im2col or dtype == jnp.float32
    x = jax.random.normal(jax.random.key(0), (1, 4, 3, channels)).astype(dtype)
    reference = nn.Conv(8, (3, 3), padding=((1, 1), (1, 1)), use_bias=False, dtype=dtype,
                        param_dtype=jnp.float32,
                        kernel_init=nn.initializers.variance_scaling(2.0, "fan_out", "normal"))
    ref_variables = reference.init(jax.random.key(1), x)
    for ops_, takes_im2col in ((PLAIN, False), (CPU, im2col)):
        layer = resnet.Conv(8, 3, dtype=dtype, ops=ops_)
        variables = meta.unbox(layer.init(jax.random.key(1), x))
        assert jax.tree.structure(variables) == jax.tree.structure(ref_variables)
        np.testing.assert_array_equal(variables["params"]["kernel"], ref_variables["params"]["kernel"])
        jaxpr = str(jax.make_jaxpr(layer.apply)(variables, x))
        assert ("conv_general_dilated" not in jaxpr) == takes_im2col, jaxpr
        np.testing.assert_allclose(np.asarray(layer.apply(variables, x), np.float32),
                                   np.asarray(reference.apply(ref_variables, x), np.float32),
                                   rtol=2e-2, atol=5e-2)


# ------------------------------------------------------------------------ BatchNorm, pools

@pytest.mark.parametrize("ops_", [PLAIN, CPU], ids=["plain", "cpu"])
@pytest.mark.parametrize("relu,with_residual", [(True, False), (False, False), (True, True)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_batch_norm_matches_flax(ops_, relu, with_residual, dtype):
    """resnet.BatchNorm, plain and with the CPU kernel (custom VJP, residual and ReLU fused),
    against flax's nn.BatchNorm followed by the same add and ReLU: variables, outputs,
    running statistics, gradients, and the evaluation mode."""
    class Reference(nn.Module):
        train: bool

        @nn.compact
        def __call__(self, x, residual=None):
            y = nn.BatchNorm(use_running_average=not self.train, momentum=0.9, epsilon=1e-5,
                             dtype=dtype, param_dtype=jnp.float32, name="bn")(x)
            y = y if residual is None else y + residual
            return nn.relu(y) if relu else y

    class Ours(nn.Module):
        train: bool

        @nn.compact
        def __call__(self, x, residual=None):
            return resnet.BatchNorm(self.train, relu=relu, dtype=dtype, ops=ops_, name="bn")(x, residual)

    k = jax.random.split(jax.random.key(0), 6)
    x = (3.0 * jax.random.normal(k[0], (4, 5, 6, 8)) + 1.5).astype(dtype)
    residual = jax.random.normal(k[1], x.shape).astype(dtype) if with_residual else None
    weights = jax.random.normal(k[2], x.shape)
    variables = Reference(True).init(k[3], x, residual)
    assert jax.tree.map(jnp.shape, meta.unbox(Ours(True).init(k[3], x, residual))) == \
        jax.tree.map(jnp.shape, variables)
    # Non-trivial parameters and running statistics.
    variables = {"params": {"bn": {"scale": 1 + jax.random.normal(k[4], (8,)),
                                   "bias": jax.random.normal(k[5], (8,))}},
                 "batch_stats": {"bn": {"mean": jnp.full((8,), 0.5), "var": jnp.full((8,), 2.0)}}}
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == jnp.bfloat16 else dict(rtol=1e-5, atol=1e-5)

    def objective(module, params, x, residual):
        y, updates = module.apply({**variables, "params": params}, x, residual,
                                  mutable=["batch_stats"])
        return (y.astype(jnp.float32) * weights).sum(), (y, updates)

    results = {}
    for name, module in (("reference", Reference(True)), ("ours", Ours(True))):
        grad_fn = jax.jit(jax.grad(functools.partial(objective, module), argnums=(0, 1, 2),
                                   has_aux=True))
        grads, (y, updates) = grad_fn(variables["params"], x, residual)
        assert y.dtype == dtype
        results[name] = (y, updates, grads)
    for got, want in zip(jax.tree.leaves(results["ours"]), jax.tree.leaves(results["reference"])):
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), **tol)
    np.testing.assert_allclose(
        np.asarray(Ours(False).apply(variables, x, residual), np.float32),
        np.asarray(Reference(False).apply(variables, x, residual), np.float32), **tol)


def test_cpu_batch_norm_carries_the_statistics_gradients():
    """The CPU BatchNorm's VJP also carries the batch mean's and variance's cotangents, as
    autodiff of the plain `plain.Ops.batch_norm` does."""
    k = jax.random.split(jax.random.key(1), 4)
    x = 2.0 * jax.random.normal(k[0], (3, 4, 4, 5)) - 1.0
    scale, bias = 1 + jax.random.normal(k[1], (5,)), jax.random.normal(k[2], (5,))
    u, v = jax.random.normal(k[3], (2, 5))

    def objective(fn, *args):
        y, mean, var = fn(*args, None, 1e-5, True, jnp.float32)
        return jnp.sin(y).sum() + (mean * u).sum() + (var * v).sum()

    got = jax.grad(functools.partial(objective, CPU.batch_norm), argnums=(0, 1, 2))(x, scale, bias)
    want = jax.grad(functools.partial(objective, PLAIN.batch_norm), argnums=(0, 1, 2))(x, scale, bias)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype,k,height,width", [
    (jnp.float32, 2, 8, 6), (jnp.bfloat16, 2, 8, 6), (jnp.float32, 4, 8, 12),
    (jnp.float32, 2, 7, 6)])
def test_cpu_avg_pool_equals_the_plain_pool(dtype, k, height, width):
    """The reshape-and-mean pool against `plain.Ops.avg_pool` (nn.avg_pool), forward and
    gradient: float32 to rounding; bfloat16 to one rounding of the float32 mean (nn.avg_pool
    sums in bfloat16); an odd side (height 7) takes the fallback and floors."""
    kx, kg = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (2, height, width, 3)).astype(dtype)    # H != W: catches a swap
    cotangent = jax.random.normal(kg, (2, height // k, width // k, 3))

    def loss(pool, x):
        return jnp.sum(pool(x, k).astype(jnp.float32) * cotangent)

    reference = lambda x, k: PLAIN.avg_pool(x.astype(jnp.float32), k)
    got = jax.jit(CPU.avg_pool, static_argnums=1)(x, k)
    assert got.dtype == dtype and got.shape == (2, height // k, width // k, 3)
    tol = 1e-6 if dtype == jnp.float32 else 2 ** -8
    np.testing.assert_allclose(np.asarray(got, np.float32), reference(x, k), rtol=tol, atol=tol)
    np.testing.assert_allclose(np.asarray(PLAIN.avg_pool(x, k), np.float32), reference(x, k),
                               rtol=2 * tol, atol=2 * tol)
    dx = jax.jit(jax.grad(functools.partial(loss, CPU.avg_pool)))(x)
    want_dx = jax.grad(functools.partial(loss, reference))(x)
    assert dx.dtype == dtype
    np.testing.assert_allclose(np.asarray(dx, np.float32), want_dx, rtol=tol, atol=tol)
    if height % k:                                # the floored row gets no gradient
        assert not np.any(np.asarray(dx, np.float32)[:, height - height % k:])


# ------------------------------------------------------------------------ kernels at load

def test_a_checkpoint_made_with_the_cpu_kernels_loads_and_evaluates_with_the_plain_ones(tmp_path):
    """The kernels are the reading host's choice (`clip_jax.load(kernels=)`, default 'auto'),
    never the saved run's: an old config.json (the kernels in its model block, as in every
    checkpoint before `config.kernels`) loads with this host's choice whatever it says, and a
    model saved by a run with `kernels.ops=cpu` loads with the plain code (what a GPU or TPU
    host runs), giving the CPU kernels' embeddings and evaluation figures."""
    import json
    import clip_jax
    from clip_jax.evals import data as data_lib, zeroshot
    from tests.helpers import write_model_dir
    src = write_model_dir(tmp_path / "model", resnet=True)    # the ResNet: every kernel piece
    path = os.path.join(src, "config.json")
    with open(path) as f:
        saved = json.load(f)
    old = json.loads(json.dumps(saved))
    old["model"].update(ops="xla", cpu_ops_off="im2col")
    old.pop("kernels", None)
    with open(path, "w") as f:
        json.dump(old, f)
    assert clip_jax.load(src, batch_size=8).model.ops == CPU      # 'auto' on this CPU host
    saved["kernels"] = {"ops": "cpu", "cpu_ops_off": ""}
    with open(path, "w") as f:
        json.dump(saved, f)
    plain_model = clip_jax.load(src, kernels="xla", batch_size=8)
    cpu_model = clip_jax.load(src, kernels="cpu", batch_size=8)
    assert plain_model.model.ops == PLAIN and cpu_model.model.ops == CPU
    images = np.random.default_rng(0).standard_normal((3, 32, 32, 3)).astype(np.float32)
    ids = plain_model.tokenize(["a red circle.", "a blue square.", "a star"])
    np.testing.assert_allclose(plain_model.encode_image(images), cpu_model.encode_image(images),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(plain_model.encode_text(ids), cpu_model.encode_text(ids), rtol=1e-5, atol=1e-5)
    data = data_lib.open_eval_data("synthetic:shape", plain_model.config)
    got, want = (zeroshot.evaluate(m, data, progress=False) for m in (plain_model, cpu_model))
    assert got["top1"] == want["top1"] and got["top5"] == want["top5"]


# ------------------------------------------------------------------ GPU kernels (cuDNN attention)

def _qkv(key, batch, t, s, heads, head_dim, dtype):
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(key), 3)
    return (jax.random.normal(kq, (batch, t, heads, head_dim), dtype),
            jax.random.normal(kk, (batch, s, heads, head_dim), dtype),
            jax.random.normal(kv, (batch, s, heads, head_dim), dtype))


def test_gpu_kernels_take_cudnn_attention_only_where_cudnn_allows_the_shape():
    """bfloat16/float16 with a head dimension that is a multiple of 8, at most 128: the
    paper configs' (64); float32 runs and other head dimensions keep XLA's attention."""
    g = gpu.GpuOps()
    assert g.uses_cudnn(*_qkv(0, 2, 197, 197, 12, 64, jnp.bfloat16))
    assert g.uses_cudnn(*_qkv(0, 2, 1, 50, 32, 64, jnp.float16))
    assert not g.uses_cudnn(*_qkv(0, 2, 197, 197, 12, 64, jnp.float32))
    assert not g.uses_cudnn(*_qkv(0, 2, 16, 16, 2, 12, jnp.bfloat16))      # not a multiple of 8
    assert not g.uses_cudnn(*_qkv(0, 2, 16, 16, 2, 256, jnp.bfloat16))     # over 128
    assert not gpu.GpuOps(off={"cudnn_attention"}).uses_cudnn(*_qkv(0, 2, 8, 8, 2, 64, jnp.bfloat16))
    with pytest.raises(ValueError, match=r"unknown GPU kernel piece\(s\) \['flash'\]"):
        gpu.GpuOps(off={"flash"})


@pytest.mark.parametrize("t, s, causal, lengths", [
    (17, 17, False, False),       # a ViT block (197 tokens for ViT-B/16): odd, padded
    (7, 7, True, False),          # the text tower's causal blocks (77 tokens): odd, padded
    (1, 9, False, True),          # the text read-out row: its keys up to the end-of-text token
    (1, 5, False, False),         # the ViT read-out row, the ResNet's attention pool
    (6, 6, True, False),          # even lengths: no padding
])
def test_gpu_attention_equals_the_plain_attention_forward_and_backward(t, s, causal, lengths):
    """`GpuOps.attention`'s own code (odd lengths padded to even ones, the padding masked by
    query and key lengths, the padded rows dropped), run with XLA's attention on this CPU,
    equals the plain attention: values and the gradients of query, key and value."""
    q, k, v = _qkv(1, 3, t, s, 2, 8, jnp.float32)
    kv_lengths = jnp.array([s, 1, s // 2 + 1], jnp.int32) if lengths else None
    w = jax.random.normal(jax.random.PRNGKey(2), q.shape)

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v, causal, kv_lengths) * w)

    padded = functools.partial(gpu.padded_attention, implementation="xla")
    np.testing.assert_allclose(padded(q, k, v, causal, kv_lengths),
                               plain.attention(q, k, v, causal, kv_lengths), rtol=1e-5, atol=1e-5)
    ours = jax.grad(loss(padded), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(loss(plain.attention), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(ours, want):
        assert np.all(np.isfinite(a))
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    # Through the kernels object, in bfloat16 (what runs on a GPU, there with cuDNN).
    qb, kb, vb = (x.astype(jnp.bfloat16) for x in (q, k, v))
    xla_gpu = gpu.GpuOps(implementation="xla")
    assert xla_gpu.uses_cudnn(qb, kb, vb)
    np.testing.assert_allclose(np.asarray(xla_gpu.attention(qb, kb, vb, causal, kv_lengths), np.float32),
                               np.asarray(plain.attention(qb, kb, vb, causal, kv_lengths), np.float32),
                               rtol=2e-2, atol=2e-2)
