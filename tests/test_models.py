"""Model tests: exact paper parameter counts (abstractly), small-config behaviour."""
import functools
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import flax.linen as nn
from flax.core import meta

from clip_jax import config_lib
from clip_jax.models import CLIP, build_model, count_params

# Reference table (shared/reference/clip_models.md), counted on OpenAI's PyTorch code.
PAPER_COUNTS = {
    "rn50": (38_316_896, 63_690_240, 102_007_137),
    "rn101": (56_259_936, 63_428_096, 119_688_033),
    "rn50x4": (87_137_080, 91_163_520, 178_300_601),
    "rn50x16": (167_328_912, 123_650_304, 290_979_217),
    "rn50x64": (420_380_352, 202_877_952, 623_258_305),
    "vit_b32": (87_849_216, 63_428_096, 151_277_313),
    "vit_b16": (86_192_640, 63_428_096, 149_620_737),
    "vit_l14": (303_966_208, 123_650_304, 427_616_513),
    "vit_l14_336": (304_293_888, 123_650_304, 427_944_193),
}

CTX, VOCAB, EMBED = 16, 100, 24
EOT = VOCAB - 1


def abstract_init(model, image_size, ctx):
    return jax.eval_shape(model.init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32),
                          jax.ShapeDtypeStruct((1, ctx), jnp.int32))


def test_paper_table_covers_all_models():
    assert set(PAPER_COUNTS) == set(config_lib.PAPER_MODELS)


@pytest.mark.parametrize("name", list(config_lib.PAPER_MODELS))
def test_paper_param_counts(name):
    cfg = config_lib.model_config(name)
    model = build_model(cfg)
    variables = meta.unbox(abstract_init(model, cfg.vision.image_size,
                                         cfg.text.context_length))
    assert all(isinstance(x, jax.ShapeDtypeStruct)
               for x in jax.tree_util.tree_leaves(variables))
    counts = count_params(variables["params"])
    image, text, total = PAPER_COUNTS[name]
    assert counts == dict(image=image, text=text, total=total)
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(variables["params"]))


def small_cfg(kind, dtype="float32", remat=False):
    if kind == "resnet":
        vision = dict(kind="resnet", image_size=64, layers=(1, 1, 1, 1), width=16,
                      patch_size=0, heads=16 * 32 // 64)
    else:
        vision = dict(kind="vit", image_size=32, layers=1, width=64, patch_size=8, heads=2)
    return ml_collections.ConfigDict(dict(
        embed_dim=EMBED, vision=vision,
        text=dict(vocab_size=VOCAB, context_length=CTX, width=32, heads=4, layers=1),
        dtype=dtype, remat=remat))


def make_tokens(batch, seed=0):
    rng = np.random.default_rng(seed)
    toks = np.zeros((batch, CTX), np.int32)
    for b in range(batch):
        n = 3 + (b + seed) % (CTX - 5)
        toks[b, 0] = EOT - 1                               # start-of-text
        toks[b, 1:n] = rng.integers(1, EOT - 1, n - 1)
        toks[b, n] = EOT
    return jnp.asarray(toks)


def make_images(batch, size, seed=0):
    return jax.random.normal(jax.random.key(seed), (batch, size, size, 3), jnp.float32)


# XLA:CPU compile time dominates these tests; skip its expensive passes.
fast_jit = functools.partial(jax.jit, compiler_options=dict(
    xla_backend_optimization_level=0, xla_llvm_disable_expensive_passes=True,
    xla_cpu_use_fusion_emitters=False))
B = 2


def unit(x):
    x = np.asarray(x)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@functools.lru_cache(maxsize=None)
def init_small(kind):
    cfg = small_cfg(kind)
    model = build_model(cfg)
    size = cfg.vision.image_size
    key = jax.random.key(0)
    variables = fast_jit(model.init)(key, make_images(B, size), make_tokens(B))
    return model, size, meta.unbox(variables)


@functools.lru_cache(maxsize=None)
def forward_fn(kind, dtype="float32", train=False):
    model = build_model(small_cfg(kind, dtype))
    if train:
        return fast_jit(lambda v, i, t: model.apply(v, i, t, train=True,
                                                    mutable=["batch_stats"]))
    return fast_jit(model.apply)


@pytest.mark.parametrize("kind", ["resnet", "vit"])
def test_forward(kind):
    _, size, variables = init_small(kind)
    images, tokens = make_images(B, size, 1), make_tokens(B, 1)
    out = forward_fn(kind)(variables, images, tokens)
    assert out["image_embeds"].shape == (B, EMBED)
    assert out["text_embeds"].shape == (B, EMBED)
    for k in ("image_embeds", "text_embeds"):
        assert out[k].dtype == jnp.float32
        np.testing.assert_allclose(np.linalg.norm(out[k], axis=-1), 1.0, rtol=1e-5)
    assert out["logit_scale"].shape == () and out["logit_scale"].dtype == jnp.float32
    np.testing.assert_allclose(out["logit_scale"], 1 / 0.07, rtol=1e-5)
    np.testing.assert_allclose(variables["params"]["logit_scale"], np.log(1 / 0.07), rtol=1e-6)
    # The temperature is clipped at 100.
    params = dict(variables["params"], logit_scale=jnp.float32(10.0))
    out = forward_fn(kind)(dict(variables, params=params), images, tokens)
    assert float(out["logit_scale"]) == 100.0


def test_resnet_batch_stats_and_init():
    _, size, variables = init_small("resnet")
    assert "batch_stats" in variables
    visual = variables["params"]["visual"]
    # bn3 of every bottleneck is zero-initialised; the stem's bn3 is not.
    blocks = [k for k in visual if k.startswith("layer")]
    assert blocks == ["layer1_0", "layer2_0", "layer3_0", "layer4_0"]
    for name in blocks:
        assert not np.any(visual[name]["bn3"]["scale"])
    assert np.all(visual["bn3"]["scale"] == 1.0)
    images, tokens = make_images(B, size, 2), make_tokens(B)
    out, updates = forward_fn("resnet", train=True)(variables, images, tokens)
    old = jax.tree_util.tree_leaves(variables["batch_stats"])
    new = jax.tree_util.tree_leaves(updates["batch_stats"])
    assert len(old) == len(new)
    assert all(o.shape == n.shape for o, n in zip(old, new))
    assert all(not np.allclose(o, n) for o, n in zip(old, new))
    # Eval mode uses running stats and differs from train mode.
    eval_out = forward_fn("resnet")(variables, images, tokens)
    assert not np.allclose(eval_out["image_embeds"], out["image_embeds"])


@pytest.mark.parametrize("relu,with_residual", [(True, False), (False, False), (True, True)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_batch_norm_matches_flax(relu, with_residual, dtype):
    """resnet.BatchNorm (custom VJP, residual and ReLU fused) against flax's nn.BatchNorm
    followed by the same add and ReLU: variables, outputs, running statistics, gradients."""
    from clip_jax.models.resnet import BatchNorm

    class Reference(nn.Module):
        train: bool

        @nn.compact
        def __call__(self, x, residual=None):
            y = nn.BatchNorm(use_running_average=not self.train, momentum=0.9, epsilon=1e-5,
                             dtype=dtype, param_dtype=jnp.float32, name="bn")(x)
            y = y if residual is None else y + residual
            return nn.relu(y) if relu else y

    class Fused(nn.Module):
        train: bool

        @nn.compact
        def __call__(self, x, residual=None):
            return BatchNorm(self.train, relu=relu, dtype=dtype, name="bn")(x, residual)

    k = jax.random.split(jax.random.key(0), 6)
    x = (3.0 * jax.random.normal(k[0], (4, 5, 6, 8)) + 1.5).astype(dtype)
    residual = jax.random.normal(k[1], x.shape).astype(dtype) if with_residual else None
    weights = jax.random.normal(k[2], x.shape)
    variables = Reference(True).init(k[3], x, residual)
    assert jax.tree.map(jnp.shape, meta.unbox(Fused(True).init(k[3], x, residual))) == \
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
    for name, module in (("reference", Reference(True)), ("fused", Fused(True))):
        grad_fn = jax.jit(jax.grad(functools.partial(objective, module), argnums=(0, 1, 2),
                                   has_aux=True))
        grads, (y, updates) = grad_fn(variables["params"], x, residual)
        assert y.dtype == dtype
        results[name] = (y, updates, grads)
    for got, want in zip(jax.tree.leaves(results["fused"]), jax.tree.leaves(results["reference"])):
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), **tol)
    # Evaluation mode: running statistics.
    np.testing.assert_allclose(
        np.asarray(Fused(False).apply(variables, x, residual), np.float32),
        np.asarray(Reference(False).apply(variables, x, residual), np.float32), **tol)


def test_batch_norm_statistics_gradient():
    """batch_norm_act's VJP also carries the batch mean's and variance's cotangents."""
    from clip_jax.models.resnet import batch_norm_act

    k = jax.random.split(jax.random.key(1), 4)
    x = 2.0 * jax.random.normal(k[0], (3, 4, 4, 5)) - 1.0
    scale, bias = 1 + jax.random.normal(k[1], (5,)), jax.random.normal(k[2], (5,))
    u, v = jax.random.normal(k[3], (2, 5))

    def plain(x, scale, bias):
        mean = x.mean((0, 1, 2))
        var = (x * x).mean((0, 1, 2)) - mean ** 2
        y = jax.nn.relu((x - mean) * jax.lax.rsqrt(var + 1e-5) * scale + bias)
        return y, mean, var

    def objective(fn, *args):
        y, mean, var = fn(*args)
        return jnp.sin(y).sum() + (mean * u).sum() + (var * v).sum()

    fused = lambda x, s, b: batch_norm_act(x, s, b, None, 1e-5, True, jnp.dtype(jnp.float32))
    got = jax.grad(functools.partial(objective, fused), argnums=(0, 1, 2))(x, scale, bias)
    want = jax.grad(functools.partial(objective, plain), argnums=(0, 1, 2))(x, scale, bias)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


def test_causal_text():
    _, size, variables = init_small("vit")
    images = make_images(B, size)
    encode = lambda t: np.asarray(
        forward_fn("vit")(variables, images, jnp.asarray(t))["text_embeds"])
    tokens = np.asarray(make_tokens(B))
    eot_pos = np.argmax(tokens, axis=-1)
    assert np.all(eot_pos < CTX - 1)
    base = encode(tokens)
    after = tokens.copy()
    for b, p in enumerate(eot_pos):
        after[b, p + 1:] = np.arange(1, CTX - p) % (EOT - 1) + 1   # all < EOT
    np.testing.assert_allclose(encode(after), base, rtol=1e-5, atol=1e-6)
    before = tokens.copy()
    before[:, 1] = np.where(tokens[:, 1] == 1, 2, 1)     # one token before the EOT
    assert np.all(np.abs(encode(before) - base).max(axis=-1) > 1e-4)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("remat", [False, True])
def test_transformer_readout_matches_full(causal, remat):
    """Transformer(x, readout) (the last block computes one row per sample) equals the
    full stack's output at those rows, forward and gradients (parameters and input)."""
    from clip_jax.models.layers import Transformer
    model = Transformer(width=32, layers=3, heads=4, causal=causal, remat=remat)
    x = jax.random.normal(jax.random.key(0), (5, 9, 32))
    readout = jnp.array([0, 8, 3, 5, 0], jnp.int32)
    params = model.init(jax.random.key(1), x)
    assert (jax.tree_util.tree_structure(model.init(jax.random.key(1), x, readout))
            == jax.tree_util.tree_structure(params))
    weights = jax.random.normal(jax.random.key(2), (5, 32))

    def full(p, x):
        out = model.apply(p, x)
        return jnp.take_along_axis(out, readout[:, None, None], axis=1)[:, 0]

    def pruned(p, x):
        return model.apply(p, x, readout)

    ref, got = full(params, x), pruned(params, x)
    assert got.shape == (5, 32)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    # Causal: the row at position p ignores later positions; non-causal: it sees them all.
    later = x.at[2, 4:].set(0.0)              # sample 2 reads position 3
    moved = np.abs(np.asarray(pruned(params, later) - got)[2]).max()
    assert (moved == 0.0) if causal else (moved > 1e-3)
    objective = lambda f: lambda p, x: jnp.sum(jnp.sin(f(p, x)) * weights)
    g_ref = jax.grad(objective(full), argnums=(0, 1))(params, x)
    g_got = jax.grad(objective(pruned), argnums=(0, 1))(params, x)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), g_got, g_ref)
    assert np.abs(np.asarray(g_got[1][1, :, :])).max() > 0     # reaches the input rows


@pytest.mark.parametrize("kind", ["resnet", "vit"])
def test_bfloat16(kind):
    model = build_model(small_cfg(kind, "bfloat16"))
    _, size, variables = init_small(kind)
    abstract = meta.unbox(abstract_init(model, size, CTX))
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(abstract))
    assert (jax.tree_util.tree_structure(abstract)
            == jax.tree_util.tree_structure(variables))
    images, tokens = make_images(B, size), make_tokens(B)
    out = forward_fn(kind, "bfloat16")(variables, images, tokens)
    assert out["image_embeds"].dtype == out["text_embeds"].dtype == jnp.float32
    for k in ("image_embeds", "text_embeds"):
        assert np.all(np.isfinite(out[k]))
        np.testing.assert_allclose(np.linalg.norm(out[k], axis=-1), 1.0, rtol=1e-5)
    # Close to the float32 computation with the same parameters.
    ref = forward_fn(kind)(variables, images, tokens)
    for k in ("image_embeds", "text_embeds"):
        cos = np.sum(np.asarray(ref[k]) * np.asarray(out[k]), axis=-1)
        assert np.all(cos > 0.98), (k, cos)


@pytest.mark.parametrize("kind", ["resnet", "vit"])
def test_remat_matches(kind):
    """remat=True gives the same parameter tree and the same results. ViT: loss and
    gradients through the text tower (the same `Transformer` as the ViT's). ResNet:
    the train-mode forward (remat with a static `train` and mutable batch_stats).
    Also checks that encode_text / encode_image agree with __call__."""
    _, size, variables = init_small(kind)
    model = build_model(small_cfg(kind))
    remat_model = build_model(small_cfg(kind, remat=True))
    assert remat_model.remat and not model.remat
    remat_vars = meta.unbox(abstract_init(remat_model, size, CTX))
    assert (jax.tree_util.tree_structure(remat_vars)
            == jax.tree_util.tree_structure(variables))
    images, tokens = make_images(B, size, 3), make_tokens(B, 3)
    if kind == "resnet":
        train_fwd = fast_jit(lambda v, i: remat_model.apply(
            v, i, train=True, method=CLIP.encode_image, mutable=["batch_stats"]))
        emb1, upd1 = train_fwd(variables, images)
        out0, upd0 = forward_fn("resnet", train=True)(variables, images, tokens)
        assert emb1.shape == (B, EMBED) and emb1.dtype == jnp.float32
        np.testing.assert_allclose(unit(emb1), out0["image_embeds"], rtol=1e-5, atol=1e-6)
        jax.tree_util.tree_map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
            upd0, upd1)
        return
    weights = jax.random.normal(jax.random.key(1), (B, EMBED))

    def loss(m, params):
        emb = m.apply(dict(variables, params=params), tokens, method=CLIP.encode_text)
        return jnp.sum(emb * weights), emb

    grad = lambda m: fast_jit(jax.value_and_grad(functools.partial(loss, m), has_aux=True))
    (l0, emb0), g0 = grad(model)(variables["params"])
    (l1, emb1), g1 = grad(remat_model)(variables["params"])
    np.testing.assert_allclose(l0, l1, rtol=1e-5)
    assert emb0.shape == (B, EMBED) and emb0.dtype == jnp.float32
    ref = forward_fn("vit")(variables, images, tokens)["text_embeds"]
    np.testing.assert_allclose(unit(emb0), ref, rtol=1e-5, atol=1e-6)
    assert any(np.any(g) for g in jax.tree_util.tree_leaves(g0["text"]))
    # atol: the key biases' gradients are zero up to rounding (softmax ignores a shift
    # shared by all keys), ~1e-6 here, with a different rounding under remat.
    is_key_bias = lambda path: jax.tree_util.keystr(path).endswith("['key']['bias']")
    jax.tree_util.tree_map_with_path(
        lambda path, a, b: np.testing.assert_allclose(
            a, b, rtol=1e-4, atol=1e-5 if is_key_bias(path) else 1e-6,
            err_msg=jax.tree_util.keystr(path)), g0, g1)


def test_partition_specs():
    P = jax.sharding.PartitionSpec
    for kind in ("vit", "resnet"):
        model = build_model(small_cfg(kind))
        size = small_cfg(kind).vision.image_size
        specs = nn.get_partition_spec(abstract_init(model, size, CTX))["params"]
        text = specs["text"]
        block = text["transformer"]["resblocks_0"]
        assert block["attn"]["query"]["kernel"] == P("embed", "heads", "kv")
        assert block["attn"]["query"]["bias"] == P("heads", "kv")
        assert block["attn"]["out"]["kernel"] == P("heads", "kv", "embed")
        assert block["mlp"]["c_fc"]["kernel"] == P("embed", "mlp")
        assert block["mlp"]["c_proj"]["kernel"] == P("mlp", "embed")
        assert block["ln_1"]["scale"] == P("norm")
        assert text["token_embedding"]["embedding"] == P("vocab", "embed")
        assert text["positional_embedding"] == P("pos", "embed")
        assert text["text_projection"] == P("embed", "joint")
        assert specs["logit_scale"] == P()
        visual = specs["visual"]
        if kind == "vit":
            assert visual["conv1"]["kernel"] == P(None, None, "conv_in", "conv_out")
            assert visual["proj"] == P("embed", "joint")
            assert visual["class_embedding"] == P("embed")
        else:
            assert visual["layer1_0"]["conv2"]["kernel"] == P(None, None, "conv_in", "conv_out")
            assert visual["layer1_0"]["bn1"]["scale"] == P("norm")
            assert visual["attnpool"]["attn"]["out"]["kernel"] == P("heads", "kv", "joint")
        # Every logical name used is one the sharding rules know.
        known = {name for name, _ in config_lib.DEFAULT_RULES}
        names = {n for s in jax.tree_util.tree_leaves(
            specs, is_leaf=lambda x: isinstance(x, P)) for n in s if n is not None}
        assert names <= known, names - known


def test_logical_constraints_with_rules():
    """Under a mesh with the default rules: abstract init (both towers) gives shardings,
    and the forward runs with the constraints applied, unchanged."""
    mesh = jax.make_mesh((1, 1, 1), ("data", "fsdp", "model"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 3)
    rules = config_lib.DEFAULT_RULES
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        for kind in ("resnet", "vit"):
            model = build_model(small_cfg(kind, remat=True))
            abstract = abstract_init(model, small_cfg(kind).vision.image_size, CTX)
            shardings = nn.logical_to_mesh_sharding(
                nn.get_partition_spec(abstract), mesh, rules)
            assert all(isinstance(x, jax.sharding.NamedSharding)
                       for x in jax.tree_util.tree_leaves(shardings))
        model, size, variables = init_small("vit")
        out = fast_jit(model.apply)(variables, make_images(B, size), make_tokens(B))
    ref = forward_fn("vit")(variables, make_images(B, size), make_tokens(B))
    np.testing.assert_allclose(out["image_embeds"], ref["image_embeds"], rtol=1e-5, atol=1e-6)


def test_init_statistics():
    """Spot-check OpenAI's initialisation scales on the text tower."""
    cfg = small_cfg("vit")
    params = init_small("vit")[2]["params"]
    text = params["text"]
    assert abs(np.std(text["token_embedding"]["embedding"]) - 0.02) < 0.002
    assert abs(np.std(text["positional_embedding"]) - 0.01) < 0.002
    blk = text["transformer"]["resblocks_0"]
    w = cfg.text.width
    assert abs(np.std(blk["attn"]["query"]["kernel"]) - w ** -0.5) < 0.02
    assert abs(np.std(blk["mlp"]["c_fc"]["kernel"]) - (2 * w) ** -0.5) < 0.02
    assert not np.any(blk["attn"]["query"]["bias"])


def test_low_precision_matmul_gradients():
    """bfloat16 `layers.matmul` (custom VJP: float32 accumulation, products in bfloat16) has the
    value and gradients of the float32 product to bfloat16 accuracy, the parameters' gradients
    in float32; and float32 `matmul` is exactly jnp.dot + bias."""
    from clip_jax.models.layers import matmul
    kx, kk, kb, kr = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(kx, (5, 7, 48))
    kernel = jax.random.normal(kk, (48, 40)) * 48 ** -0.5
    bias = jax.random.normal(kb, (40,))
    r = jax.random.normal(kr, (5, 7, 40))

    def loss(dtype):
        return lambda x, k, b: jnp.sum(matmul(x.astype(dtype), k, dtype, b).astype(jnp.float32) * r)

    ref_loss = lambda x, k, b: jnp.sum((jnp.einsum("abk,kn->abn", x, k, precision="highest") + b) * r)
    want, want_g = jax.value_and_grad(ref_loss, argnums=(0, 1, 2))(x, kernel, bias)
    got32, g32 = jax.value_and_grad(loss(jnp.float32), argnums=(0, 1, 2))(x, kernel, bias)
    got16, g16 = jax.value_and_grad(loss(jnp.bfloat16), argnums=(0, 1, 2))(x, kernel, bias)
    np.testing.assert_allclose(got32, want, rtol=1e-4)
    np.testing.assert_allclose(got16, want, rtol=2e-2, atol=0.5)
    assert [g.dtype for g in g16] == [jnp.float32] * 3      # x's cotangent upcast by astype's VJP
    for w, a, b in zip(want_g, g32, g16):
        np.testing.assert_allclose(a, w, rtol=1e-4, atol=1e-4)
        scale = float(np.abs(w).max())
        assert float(np.abs(b - w).max()) < 2e-2 * scale, (float(np.abs(b - w).max()), scale)
    # The bfloat16 product is one rounding of the float32-accumulated one.
    y16 = matmul(x.astype(jnp.bfloat16), kernel, jnp.bfloat16, bias)
    assert y16.dtype == jnp.bfloat16 and y16.shape == (5, 7, 40)
    exact = jnp.dot(x.astype(jnp.bfloat16).reshape(35, 48), kernel.astype(jnp.bfloat16),
                    preferred_element_type=jnp.float32) + bias
    np.testing.assert_array_equal(np.asarray(y16.reshape(35, 40), np.float32),
                                  np.asarray(exact.astype(jnp.bfloat16), np.float32))


def test_low_precision_matmul_can_return_the_float32_accumulator():
    """`out_dtype=float32` (ResNet's convolutions feeding BatchNorm): the float32 accumulator
    of the bfloat16 product, unrounded; the backward rounds the incoming gradient to bfloat16,
    so the input and kernel gradients equal the rounded form's exactly."""
    from clip_jax.models.layers import matmul
    kx, kk, kb, kr = jax.random.split(jax.random.key(1), 4)
    x = jax.random.normal(kx, (6, 48)).astype(jnp.bfloat16)
    kernel = jax.random.normal(kk, (48, 40)) * 48 ** -0.5
    bias = jax.random.normal(kb, (40,))
    r = jax.random.normal(kr, (6, 40)).astype(jnp.bfloat16).astype(jnp.float32)
    y = matmul(x, kernel, jnp.bfloat16, bias, out_dtype=jnp.float32)
    exact = jnp.dot(x, kernel.astype(jnp.bfloat16), preferred_element_type=jnp.float32) + bias
    assert y.dtype == jnp.float32
    np.testing.assert_array_equal(y, exact)

    def loss(out_dtype):
        return lambda x, k, b: jnp.sum(
            matmul(x, k, jnp.bfloat16, b, out_dtype=out_dtype).astype(jnp.float32) * r)

    unrounded = jax.grad(loss(jnp.float32), argnums=(0, 1, 2))(x, kernel, bias)
    rounded = jax.grad(loss(None), argnums=(0, 1, 2))(x, kernel, bias)
    for a, b in zip(unrounded, rounded):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def test_low_precision_matmul_backward_keeps_bfloat16_products():
    """In the compiled gradient of a bfloat16 `matmul`, all three products (forward, input
    gradient, kernel gradient) keep bfloat16 operands, and none contracts dimension 0 of its
    left operand (the forms XLA:CPU upcasts to float32): both backward products read stored
    transposes."""
    from clip_jax.models.layers import matmul
    x = jnp.ones((64, 32), jnp.bfloat16)
    kernel = jnp.ones((32, 48), jnp.float32)
    grads = jax.jit(jax.grad(lambda k, x: jnp.sum(matmul(x, k, jnp.bfloat16).astype(jnp.float32) ** 2),
                             argnums=(0, 1)))
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


def test_pointwise_conv_is_the_1x1_convolution():
    """ResNet's 1x1 convolutions run as matmuls with the convolution's own parameter."""
    from clip_jax.models.resnet import PointwiseConv
    x = jax.random.normal(jax.random.key(0), (2, 5, 5, 16))
    layer = PointwiseConv(24)
    variables = layer.init(jax.random.key(1), x)
    kernel = meta.unbox(variables)["params"]["kernel"]
    assert kernel.shape == (1, 1, 16, 24)
    want = jax.lax.conv_general_dilated(x, kernel, (1, 1), "VALID",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        precision="highest")
    np.testing.assert_allclose(layer.apply(variables, x), want, rtol=1e-5, atol=1e-5)


def _lax_conv3x3(x, kernel):
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        precision="highest")


@pytest.mark.parametrize("dtype,channels,out_dtype", [
    (jnp.float32, 5, None), (jnp.bfloat16, 6, None), (jnp.bfloat16, 5, None),
    (jnp.bfloat16, 6, jnp.float32)])
def test_conv3x3_im2col_matches_the_convolution(dtype, channels, out_dtype):
    """The im2col form of the 3x3 convolution, forward and both gradients, against
    lax.conv_general_dilated: float32 to rounding; bfloat16 (packed pairs for an even channel
    count, plain copies for an odd one) against the float32 convolution of the same
    bfloat16 values, to bfloat16's precision, or, with a float32 output (the unrounded
    accumulator), the forward to float32's."""
    from clip_jax.models.resnet import conv3x3_im2col
    kx, kk, kg = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (2, 7, 5, channels)).astype(dtype)   # H != W: catches a swap
    kernel = jax.random.normal(kk, (3, 3, channels, 4)) / 3.0
    cotangent = jax.random.normal(kg, (2, 7, 5, 4))

    def loss(conv, x, kernel):
        return jnp.sum(conv(x, kernel).astype(jnp.float32) * cotangent)

    def reference(x, kernel):     # float32 throughout, on the values the fast path sees
        return _lax_conv3x3(x.astype(jnp.float32), kernel.astype(dtype).astype(jnp.float32))

    def assert_close(got, want):      # relative to the largest entry: sums of rounded terms
        got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
        assert np.max(np.abs(got - want)) <= tol * np.max(np.abs(want)), (got, want)

    conv = functools.partial(conv3x3_im2col, out_dtype=out_dtype)
    tol = 1e-5 if dtype == jnp.float32 or out_dtype == jnp.float32 else 1e-2
    got = jax.jit(conv)(x, kernel)
    assert got.dtype == (out_dtype or dtype) and got.shape == (2, 7, 5, 4)
    assert_close(got, reference(x, kernel))
    tol = 1e-5 if dtype == jnp.float32 else 1e-2
    dx, dk = jax.jit(jax.grad(functools.partial(loss, conv), (0, 1)))(x, kernel)
    want_dx, want_dk = jax.grad(functools.partial(loss, reference), (0, 1))(x, kernel)
    assert dx.dtype == dtype and dk.dtype == jnp.float32 and dk.shape == kernel.shape
    assert_close(dx, want_dx)
    assert_close(dk, want_dk)


@pytest.mark.parametrize("per_image", [False, True])
@pytest.mark.parametrize("dtype,channels", [
    (jnp.bfloat16, 6), (jnp.bfloat16, 5), (jnp.float32, 3)])
def test_im2col_3x3_is_the_nine_shifted_windows(dtype, channels, per_image):
    """`_im2col_3x3` (one gather, flat or per image; packed pairs for an even bfloat16
    channel count) equals the nine zero-padded windows side by side, tap-major, bit for
    bit."""
    from clip_jax.models.resnet import _im2col_3x3
    x = jax.random.normal(jax.random.key(0), (2, 4, 3, channels)).astype(dtype)  # H != W
    padded = np.pad(np.asarray(x), ((0, 0), (1, 1), (1, 1), (0, 0)))
    want = np.concatenate([padded[:, dy:dy + 4, dx:dx + 3] for dy in range(3) for dx in range(3)],
                          -1).reshape(2 * 4 * 3, 9 * channels)
    got = jax.jit(functools.partial(_im2col_3x3, per_image=per_image))(x)
    assert got.dtype == dtype
    np.testing.assert_array_equal(np.asarray(got), want)


def test_im2col_3x3_keeps_a_batch_sharded_input_sharded():
    """Under a batch-sharded input (4 fake devices, so the per-image gather) the im2col
    compiles to no collective: each device gathers its own images' windows."""
    from tests.helpers import run_python
    out = run_python("""
        import json, jax, jax.numpy as jnp
        from jax.sharding import NamedSharding, PartitionSpec as P
        from clip_jax.models.resnet import _im2col_3x3
        mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
        batch = NamedSharding(mesh, P("data"))
        x = jax.device_put(jnp.zeros((8, 6, 5, 8), jnp.bfloat16), batch)
        hlo = jax.jit(_im2col_3x3, out_shardings=batch).lower(x).compile().as_text()
        ops = ("all-gather", "all-to-all", "collective-permute", "all-reduce")
        found = [op for op in ops if op + "(" in hlo or op + "-start(" in hlo]
        print(json.dumps({"collectives": found}))
    """, n_devices=4)
    assert out["collectives"] == []


@pytest.mark.parametrize("dtype,channels,im2col", [
    (jnp.bfloat16, 128, True), (jnp.bfloat16, 64, False), (jnp.float32, 128, False)])
def test_conv3x3_has_nn_conv_parameters_and_picks_its_path(dtype, channels, im2col):
    """Conv3x3 initialises exactly the parameter nn.Conv would (name, shape, values), and
    takes the im2col path only on CPU in bfloat16 from IM2COL_MIN_CHANNELS input channels."""
    from clip_jax.models.resnet import IM2COL_MIN_CHANNELS, Conv3x3
    assert (channels >= IM2COL_MIN_CHANNELS) == im2col or dtype == jnp.float32
    x = jax.random.normal(jax.random.key(0), (1, 4, 3, channels)).astype(dtype)
    layer = Conv3x3(8, dtype=dtype)
    plain = nn.Conv(8, (3, 3), padding=((1, 1), (1, 1)), use_bias=False, dtype=dtype,
                    param_dtype=jnp.float32,
                    kernel_init=nn.initializers.variance_scaling(2.0, "fan_out", "normal"))
    variables = meta.unbox(layer.init(jax.random.key(1), x))
    plain_variables = plain.init(jax.random.key(1), x)
    assert jax.tree.structure(variables) == jax.tree.structure(plain_variables)
    np.testing.assert_array_equal(variables["params"]["kernel"], plain_variables["params"]["kernel"])
    jaxpr = str(jax.make_jaxpr(layer.apply)(variables, x))
    assert ("conv_general_dilated" not in jaxpr) == im2col, jaxpr
    got = layer.apply(variables, x)
    assert got.dtype == dtype
    np.testing.assert_allclose(np.asarray(got, np.float32),
                               np.asarray(plain.apply(plain_variables, x), np.float32),
                               rtol=2e-2, atol=5e-2)


@pytest.mark.parametrize("dtype,k,height,width", [
    (jnp.float32, 2, 8, 6), (jnp.bfloat16, 2, 8, 6), (jnp.float32, 4, 8, 12),
    (jnp.float32, 2, 7, 6)])
def test_avg_pool_matches_flax(dtype, k, height, width):
    """ResNet's reshape-and-mean pool against `nn.avg_pool` (k x k, stride k, 'VALID'),
    forward and gradient: float32 to rounding; bfloat16 to one rounding of the float32 mean
    (nn.avg_pool sums in bfloat16); an odd side (height 7) takes the fallback and floors."""
    from clip_jax.models.resnet import _avg_pool
    kx, kg = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (2, height, width, 3)).astype(dtype)    # H != W: catches a swap
    cotangent = jax.random.normal(kg, (2, height // k, width // k, 3))

    def loss(pool, x):
        return jnp.sum(pool(x).astype(jnp.float32) * cotangent)

    def reference(x):
        return nn.avg_pool(x.astype(jnp.float32), (k, k), strides=(k, k), padding="VALID")

    got = jax.jit(_avg_pool, static_argnums=1)(x, k)
    assert got.dtype == dtype and got.shape == (2, height // k, width // k, 3)
    want = reference(x)
    tol = 1e-6 if dtype == jnp.float32 else 2 ** -8
    np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=tol, atol=tol)
    dx = jax.jit(jax.grad(lambda x: loss(lambda v: _avg_pool(v, k), x)))(x)
    want_dx = jax.grad(functools.partial(loss, reference))(x)
    assert dx.dtype == dtype
    np.testing.assert_allclose(np.asarray(dx, np.float32), want_dx, rtol=tol, atol=tol)
    if height % k:                                # the floored row gets no gradient
        assert not np.any(np.asarray(dx, np.float32)[:, height - height % k:])
