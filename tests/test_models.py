"""Model tests: exact paper parameter counts (abstractly), small-config behaviour."""
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import flax.linen as nn
from flax.core import meta

from clip_jax import config_lib, models
from clip_jax.models import CLIP, count_params

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
    model = build(cfg)
    variables = meta.unbox(abstract_init(model, cfg.vision.image_size,
                                         cfg.text.context_length))
    assert all(isinstance(x, jax.ShapeDtypeStruct)
               for x in jax.tree_util.tree_leaves(variables))
    counts = count_params(variables["params"])
    image, text, total = PAPER_COUNTS[name]
    assert counts == dict(image=image, text=text, total=total)
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(variables["params"]))


def build(model_cfg, loss="clip", kernels=None):
    """The CLIP of a run config with this model and loss (`models.from_config`: the plain
    code), or with `kernels` in its place."""
    config = ml_collections.ConfigDict(dict(model=model_cfg, loss=dict(name=loss, block_size=1024)))
    model = models.from_config(config)
    return model if kernels is None else model.clone(ops=kernels)


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
    model = build(cfg)
    size = cfg.vision.image_size
    key = jax.random.key(0)
    variables = fast_jit(model.init)(key, make_images(B, size), make_tokens(B))
    return model, size, meta.unbox(variables)


@functools.lru_cache(maxsize=None)
def forward_fn(kind, dtype="float32", train=False):
    model = build(small_cfg(kind, dtype))
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
    model = build(small_cfg(kind, "bfloat16"))
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
    model = build(small_cfg(kind))
    remat_model = build(small_cfg(kind, remat=True))
    assert (remat_model.remat, model.remat) == ("full", "none")
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


def test_remat_policies_keep_the_values_and_recompute_what_they_do_not_save():
    """Every named policy (`layers.REMAT_POLICIES`): the same loss and gradients as no remat;
    the compiled backward recomputes products as the policy says (counted in the compiled
    program: 24 forward and 48 backward products without remat): 'full' all the forward's
    that the backward reads, 'minimal' only the attention's batched ones, the others
    between."""
    from clip_jax.models.layers import REMAT_POLICIES, Transformer
    x = jax.random.normal(jax.random.key(0), (4, 9, 32))
    weights = jax.random.normal(jax.random.key(2), (4, 9, 32))
    params = Transformer(width=32, layers=3, heads=4, causal=True).init(jax.random.key(1), x)

    def grad_fn(policy):
        model = Transformer(width=32, layers=3, heads=4, causal=True, remat=policy)
        return jax.jit(jax.value_and_grad(lambda p: jnp.sum(model.apply(p, x) * weights)))

    products = {}
    plain_loss, plain_grads = grad_fn("none")(params)
    for policy in REMAT_POLICIES:
        loss, grads = grad_fn(policy)(params)
        np.testing.assert_allclose(loss, plain_loss, rtol=1e-6)
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                               grads, plain_grads)
        products[policy] = grad_fn(policy).lower(params).compile().as_text().count(" dot(")
    assert products["none"] == 72, products
    # 'full': 7 of each block's 8 forward products again (the MLP's output projection's
    # result is not read by the backward).
    assert products["full"] == 72 + 3 * 7, products
    assert products["none"] < products["minimal"] < products["save_qkv_proj"] < products["full"]
    assert products["minimal"] < products["save_attention_out"] < products["full"]
    with pytest.raises(ValueError, match="model.remat: 'most' is not a remat policy"):
        Transformer(width=32, layers=3, heads=4, remat="most").init(jax.random.key(1), x)


def test_remat_policies_act_in_bfloat16_too():
    """In bfloat16 the dense products run inside ops.matmul's custom_vjp: a policy on
    `dot_general` saw nothing there and 'minimal' recomputed as much as 'full' (the same
    memory and FLOPs for ViT-B/16 on v5e-256). XLA's FLOP count of the whole train step,
    scanned towers: 'minimal' between 'none' and 'full'."""
    from clip_jax import cost
    flops = {}
    for policy in ("none", "minimal", "full"):
        c = tiny_config_for_flops()
        config_lib.set_remat(c.model, policy)
        flops[policy] = cost.step_flops(c)
    assert flops["none"] < flops["minimal"] < flops["full"], flops
    assert flops["minimal"] - flops["none"] < (flops["full"] - flops["none"]) / 2, flops


def tiny_config_for_flops():
    from tests.helpers import tiny_config
    return tiny_config(batch_size=16, **{"model.vision.layers": 3, "model.text.layers": 3,
                                          "model.dtype": "bfloat16", "model.scan_layers": True})


def test_remat_accepts_the_booleans_of_configs_before_the_names():
    from clip_jax import validation
    from clip_jax.models.layers import remat_policy
    assert [remat_policy(v) for v in (True, False, "True", "false", None, "minimal")] == [
        "full", "none", "full", "none", "none", "minimal"]
    c = config_lib.paper_config("vit_b32")
    c.model.remat = False                       # an older config file's assignment
    c.model.remat = "save_qkv_proj"
    c.model.remat = "most"
    with pytest.raises(config_lib.ConfigError, match="config.model.remat: 'most' is not a remat"):
        validation.validate(c, 1)


def test_partition_specs():
    P = jax.sharding.PartitionSpec
    for kind in ("vit", "resnet"):
        cfg = small_cfg(kind)
        cfg.text.layers = 3
        if kind == "resnet":
            cfg.vision.layers = (1, 2, 1, 1)
        model = build(cfg)
        specs = nn.get_partition_spec(abstract_init(model, cfg.vision.image_size, CTX))["params"]
        text = specs["text"]
        # The blocks before the last are stacked on a leading 'layers' axis; the last is not.
        for name, lead in (("resblocks", ("layers",)), ("resblocks_last", ())):
            block = text["transformer"][name]
            assert block["attn"]["query"]["kernel"] == P(*lead, "embed", "heads", "kv")
            assert block["attn"]["query"]["bias"] == P(*lead, "heads", "kv")
            assert block["attn"]["out"]["kernel"] == P(*lead, "heads", "kv", "embed")
            assert block["mlp"]["c_fc"]["kernel"] == P(*lead, "embed", "mlp")
            assert block["mlp"]["c_proj"]["kernel"] == P(*lead, "mlp", "embed")
            assert block["ln_1"]["scale"] == P(*lead, "norm")
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
            assert visual["layer2_rest"]["conv2"]["kernel"] == P("layers", None, None, "conv_in", "conv_out")
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
            model = build(small_cfg(kind, remat=True))
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
    blk = text["transformer"]["resblocks_last"]
    w = cfg.text.width
    assert abs(np.std(blk["attn"]["query"]["kernel"]) - w ** -0.5) < 0.02
    assert abs(np.std(blk["mlp"]["c_fc"]["kernel"]) - (2 * w) ** -0.5) < 0.02
    assert not np.any(blk["attn"]["query"]["bias"])


@pytest.mark.parametrize("remat", [False, True])
def test_scanned_transformer_equals_the_unrolled_one(remat):
    """`scan=True` runs the blocks before the last as one loop, False unrolls it, over the
    same stacked parameters (same tree): the same outputs and gradients, with and without
    the read-out row; only the scanned program has a loop."""
    from clip_jax.models.layers import Transformer
    kwargs = dict(width=32, layers=4, heads=4, causal=True, remat=remat)
    plain, scanned = Transformer(**kwargs), Transformer(**kwargs, scan=True)
    x = jax.random.normal(jax.random.key(0), (3, 7, 32))
    params = plain.init(jax.random.key(1), x)
    assert jax.tree.structure(scanned.init(jax.random.key(1), x)) == jax.tree.structure(params)
    for readout in (None, jnp.array([0, 6, 3], jnp.int32)):
        objective = lambda m: lambda p, x: jnp.sum(jnp.sin(m.apply(p, x, readout)))
        want = jax.value_and_grad(objective(plain), argnums=(0, 1))(params, x)
        got = jax.value_and_grad(objective(scanned), argnums=(0, 1))(params, x)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert jax.tree.leaves(params["params"]["resblocks"])[0].shape[0] == 3
    hlo = lambda m: jax.jit(m.apply).lower(params, x).compile().as_text()
    assert " while(" in hlo(scanned) and " while(" not in hlo(plain)


@pytest.mark.parametrize("remat", [False, True])
def test_scanned_resnet_equals_the_unrolled_one(remat):
    """A ResNet's stages scanned over their repeated blocks: the same embeddings, gradients and
    BatchNorm statistics (every block's updated in training), and in evaluation mode."""
    from clip_jax.models.resnet import ModifiedResNet
    kwargs = dict(layers=(1, 3, 4, 1), output_dim=16, heads=2, image_size=64, width=16, remat=remat)
    plain, scanned = ModifiedResNet(**kwargs), ModifiedResNet(**kwargs, scan=True)
    x = make_images(3, 64)
    variables = meta.unbox(plain.init(jax.random.key(1), x))
    assert jax.tree.structure(meta.unbox(scanned.init(jax.random.key(1), x))) == \
        jax.tree.structure(variables)

    def objective(m):
        def loss(params, x):
            y, updates = m.apply({**variables, "params": params}, x, True, mutable=["batch_stats"])
            return jnp.sum(jnp.sin(y)), updates
        return loss

    (l0, stats0), g0 = jax.value_and_grad(objective(plain), has_aux=True)(variables["params"], x)
    (l1, stats1), g1 = jax.value_and_grad(objective(scanned), has_aux=True)(variables["params"], x)
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    assert jax.tree.structure(stats1) == jax.tree.structure(stats0)
    for a, b in zip(jax.tree.leaves(stats1), jax.tree.leaves(stats0)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert not np.allclose(stats1["batch_stats"]["layer3_rest"]["bn1"]["mean"][2],
                           variables["batch_stats"]["layer3_rest"]["bn1"]["mean"][2])
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(scanned.apply(variables, x), plain.apply(variables, x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("size,stride,padding,height", [
    (1, 1, 0, 8), (3, 1, 1, 8), (3, 2, 1, 8), (3, 2, 1, 7), (1, 2, 0, 8), (3, 1, 1, 5),
    (2, 2, 0, 8), (4, 4, 0, 8)])           # the last two: ViT patch embeddings
def test_bfloat16_convolution_keeps_its_kernel_gradient_in_float32(size, stride, padding, height):
    """`ops.plain.conv` in bfloat16 ('same' ResNet convolutions, strided; patch embeddings): the
    forward and the input gradient are JAX's own, and the kernel's gradient is the float32
    sum of the bfloat16 products (what the convolution of the bfloat16-rounded values in
    float32 gives), not rounded to bfloat16: that is what the devices then sum (test_aot
    checks the compiled TPU step)."""
    from clip_jax.ops import plain
    kx, kk, kg = jax.random.split(jax.random.key(size * 10 + stride), 3)
    x = jax.random.normal(kx, (2, height, 8, 8)).astype(jnp.bfloat16)     # H != W: a swap shows
    kernel = jax.random.normal(kk, (size, size, 8, 12)) / (size * 8 ** 0.5)
    conv = lambda x, k: plain.conv(x, k, stride, padding, jnp.bfloat16)
    out = conv(x, kernel)
    cotangent = jax.random.normal(kg, out.shape).astype(jnp.bfloat16)

    def autodiff(x, kernel):       # JAX's own gradient of the bfloat16 convolution
        return plain._conv(x, kernel.astype(jnp.bfloat16), stride, padding)

    def exact(x, rounded_kernel):  # the same values in float32
        return plain._conv(x.astype(jnp.float32), rounded_kernel, stride, padding)

    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(autodiff(x, kernel), np.float32))
    dx, dk = jax.vjp(conv, x, kernel)[1](cotangent)
    want_dx, want_dk16 = jax.vjp(autodiff, x, kernel)[1](cotangent)
    _, want_dk = jax.vjp(exact, x, kernel.astype(jnp.bfloat16).astype(jnp.float32))[1](
        cotangent.astype(jnp.float32))
    assert dx.dtype == jnp.bfloat16 and dk.dtype == jnp.float32 and dk.shape == kernel.shape
    np.testing.assert_array_equal(np.asarray(dx, np.float32), np.asarray(want_dx, np.float32))
    np.testing.assert_allclose(dk, want_dk, rtol=1e-5, atol=1e-5 * float(np.abs(want_dk).max()))
    # JAX's own kernel gradient is the same sums rounded to bfloat16: further from them.
    assert np.abs(np.asarray(want_dk16, np.float32) - want_dk).max() > np.abs(dk - want_dk).max()
