"""The sharded contrastive loss equals the plain full-batch loss, forward and backward."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clip_jax import losses
from tests.helpers import run_python


def _embeds(n=16, d=8, seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    norm = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
    return norm(jax.random.normal(k1, (n, d))), norm(jax.random.normal(k2, (n, d)))


def test_naive_loss_matches_hand_computation():
    img, txt = _embeds(6, 4)
    scale = 3.0
    logits = np.asarray(scale * img @ txt.T, np.float64)
    def ce(l):
        l = l - l.max(axis=1, keepdims=True)
        return -(np.diag(l) - np.log(np.exp(l).sum(axis=1))).mean()
    expected = (ce(logits) + ce(logits.T)) / 2
    np.testing.assert_allclose(losses.clip_loss_naive(img, txt, scale), expected, rtol=1e-5)


def test_naive_loss_is_low_for_matched_pairs_and_symmetric():
    img, txt = _embeds(8, 8)
    assert losses.clip_loss_naive(img, img, 50.0) < 0.01
    np.testing.assert_allclose(losses.clip_loss_naive(img, txt, 5.0),
                               losses.clip_loss_naive(txt, img, 5.0), rtol=1e-6)


def test_sharded_loss_single_device_equals_naive():
    from clip_jax import sharding
    from clip_jax.config_lib import DEFAULT_RULES
    import ml_collections
    mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1, model=1)))
    img, txt = _embeds()
    axes = sharding.batch_axes(DEFAULT_RULES)
    f = lambda i, t, s: losses.clip_loss(i, t, s, mesh, axes)
    g = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))
    v, grads = g(img, txt, 7.0)
    v0, grads0 = jax.value_and_grad(losses.clip_loss_naive, argnums=(0, 1, 2))(img, txt, 7.0)
    np.testing.assert_allclose(v, v0, rtol=1e-6)
    for a, b in zip(grads, grads0):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


MULTI = """
import json, jax, jax.numpy as jnp, numpy as np, ml_collections
from clip_jax import losses, sharding
from clip_jax.config_lib import DEFAULT_RULES
assert jax.device_count() == 8
out = {}
k1, k2 = jax.random.split(jax.random.key(1))
norm = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
img, txt = norm(jax.random.normal(k1, (32, 16))), norm(jax.random.normal(k2, (32, 16)))
v0, g0 = jax.value_and_grad(losses.clip_loss_naive, argnums=(0, 1, 2))(img, txt, 9.0)
sv0, sg0 = jax.value_and_grad(losses.siglip_loss_naive, argnums=(0, 1, 2, 3))(img, txt, 9.0, -3.0)
rel = lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(b))))
for name, shape in {"data8": (-1, 1, 1), "data4_fsdp2": (4, 2, 1), "data2_fsdp2_model2": (2, 2, 2)}.items():
    mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(zip(("data", "fsdp", "model"), shape))))
    axes = sharding.batch_axes(DEFAULT_RULES)
    bs = sharding.batch_sharding(mesh, DEFAULT_RULES)
    n_local = 32 // sharding.num_batch_shards(mesh, DEFAULT_RULES)
    i, t = jax.device_put(img, bs), jax.device_put(txt, bs)
    f = jax.jit(jax.value_and_grad(lambda i, t, s: losses.clip_loss(i, t, s, mesh, axes), argnums=(0, 1, 2)))
    v, g = f(i, t, 9.0)
    hlo = jax.jit(lambda i, t, s: losses.clip_loss(i, t, s, mesh, axes)).lower(i, t, 9.0).compile().as_text()
    out[name] = {
        "loss_err": abs(float(v) - float(v0)) / abs(float(v0)),
        "grad_err": max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in zip(g, g0)),
        "shards": sharding.num_batch_shards(mesh, DEFAULT_RULES),
        "has_full_logits": "f32[32,32]" in hlo,
        "has_local_logits": "f32[%d,32]" % n_local in hlo,
    }
    # clip_loss_blockwise: a non-dividing block (5 of 32: the last one padded) and one block.
    for block in (5, 64):
        compiled = jax.jit(jax.value_and_grad(
            lambda i, t, s: losses.clip_loss_blockwise(i, t, s, mesh, axes, block),
            argnums=(0, 1, 2))).lower(i, t, 9.0).compile()
        v, g = compiled(i, t, 9.0)
        hlo = compiled.as_text()   # forward and backward
        out[name]["blockwise%d" % block] = {
            "loss_err": abs(float(v) - float(v0)) / abs(float(v0)),
            "grad_err": max(rel(a, b) for a, b in zip(g, g0)),
            "has_local_logits": "f32[%d,32]" % n_local in hlo,
            "has_block_logits": "f32[%d,%d]" % (n_local, min(block, 32)) in hlo,
        }
    for block in (None, 3):      # SigLIP's ring blocks whole, and 3 columns at a time
        compiled = jax.jit(jax.value_and_grad(
            lambda i, t, s, b: losses.siglip_loss(i, t, s, b, mesh, axes, block),
            argnums=(0, 1, 2, 3))).lower(i, t, 9.0, -3.0).compile()
        v, g = compiled(i, t, 9.0, -3.0)
        hlo = compiled.as_text()
        out[name]["siglip" if block is None else "siglip3"] = {
            "loss_err": abs(float(v) - float(sv0)) / abs(float(sv0)),
            "grad_err": max(rel(a, b) for a, b in zip(g, sg0)),
            "has_all_text": "f32[32,16]" in hlo, "all_gather": "all-gather" in hlo,
            "permutes": "collective-permute" in hlo,
            "has_block_logits": "f32[%d,%d]" % (n_local, n_local) in hlo,
            "has_chunk_logits": "f32[%d,%d]" % (n_local, min(3, n_local)) in hlo,
        }
    # clip_ring: a block of 3 (not dividing B_local: padded chunks) and one of 64 (whole blocks),
    # float32 and bfloat16 inputs; bfloat16 against the naive loss of the same (rounded) values.
    for dtype in ("float32", "bfloat16"):
        for block in (3, 64):
            ii, tt = (x.astype(dtype) for x in (i, t))
            v_ref, g_ref = (v0, g0) if dtype == "float32" else jax.value_and_grad(
                losses.clip_loss_naive, argnums=(0, 1, 2))(ii.astype("float32"), tt.astype("float32"), 9.0)
            compiled = jax.jit(jax.value_and_grad(
                lambda i, t, s: losses.clip_loss_ring(i, t, s, mesh, axes, block),
                argnums=(0, 1, 2))).lower(ii, tt, 9.0).compile()
            v, g = compiled(ii, tt, 9.0)
            hlo = compiled.as_text()
            out[name][f"ring_{dtype}_{block}"] = {
                "loss_err": abs(float(v) - float(v_ref)) / abs(float(v_ref)),
                "grad_err": max(rel(a, b) for a, b in zip(g, g_ref)),
                "grad_dtypes": [str(x.dtype) for x in g[:2]],
                "all_gather": "all-gather" in hlo, "permutes": "collective-permute" in hlo,
                "has_gathered": any(f"{d}[32,16]" in hlo for d in ("f32", "bf16")),
                "has_local_logits": "f32[%d,32]" % n_local in hlo,
                "has_chunk_logits": "f32[%d,%d]" % (n_local, min(block, n_local)) in hlo,
            }
print(json.dumps(out))
"""

MESHES = [("data8", 8), ("data4_fsdp2", 8), ("data2_fsdp2_model2", 4)]


def _multi(_cache={}):
    """All 8-device checks, in one subprocess (started once per test process)."""
    if not _cache:
        _cache.update(run_python(MULTI, n_devices=8))
    return _cache


@pytest.mark.parametrize("mesh_name,shards", MESHES)
def test_sharded_loss_on_8_devices_equals_naive(mesh_name, shards):
    r = _multi()[mesh_name]
    assert r["shards"] == shards
    assert r["loss_err"] < 1e-6
    assert r["grad_err"] < 1e-6
    # Each device computes only its B_local x B rows; the B x B matrix never appears.
    assert r["has_local_logits"] and not r["has_full_logits"]


@pytest.mark.parametrize("mesh_name,shards", MESHES)
def test_blockwise_loss_on_8_devices_equals_naive(mesh_name, shards):
    for block in (5, 64):
        r = _multi()[mesh_name]["blockwise%d" % block]
        assert r["loss_err"] < 1e-5 and r["grad_err"] < 1e-5, (block, r)
        assert r["has_block_logits"], block
    # With a block < B, no [B_local, B] logits anywhere, forward or backward.
    assert not _multi()[mesh_name]["blockwise5"]["has_local_logits"]


@pytest.mark.parametrize("mesh_name,shards", MESHES)
def test_siglip_loss_on_8_devices_equals_naive(mesh_name, shards):
    r = _multi()[mesh_name]["siglip"]
    assert r["loss_err"] < 1e-5 and r["grad_err"] < 1e-5, r
    # Text blocks go round the ring: no all-gather, no [B, d] text array, B_local^2 logits.
    assert r["permutes"] and not r["all_gather"] and not r["has_all_text"]
    assert r["has_block_logits"]
    # ... and with block_size 3, B_local x 3 logits at a time, never B_local^2.
    r = _multi()[mesh_name]["siglip3"]
    assert r["loss_err"] < 1e-5 and r["grad_err"] < 1e-5, r
    assert r["permutes"] and not r["all_gather"] and r["has_chunk_logits"] and not r["has_block_logits"]


@pytest.mark.parametrize("mesh_name,shards", MESHES)
def test_ring_loss_on_8_devices_equals_naive(mesh_name, shards):
    for dtype in ("float32", "bfloat16"):
        for block in (3, 64):
            r = _multi()[mesh_name][f"ring_{dtype}_{block}"]
            # bfloat16: the gradients are rounded to bfloat16 (2^-8), the loss is float32
            tol = (1e-5, 1e-5) if dtype == "float32" else (1e-5, 8e-3)
            assert r["loss_err"] < tol[0] and r["grad_err"] < tol[1], (dtype, block, r)
            assert r["grad_dtypes"] == [dtype, dtype]
            # Nothing gathered: the text blocks travel a ring; B_local x block logits at a time.
            assert r["permutes"] and not r["all_gather"] and not r["has_gathered"], r
            assert r["has_chunk_logits"], (dtype, block)
            if block < 32 // shards:
                assert not r["has_local_logits"]


RING_FEW = """
import json, jax, jax.numpy as jnp, numpy as np, ml_collections
from clip_jax import losses, sharding
from clip_jax.config_lib import DEFAULT_RULES
k1, k2 = jax.random.split(jax.random.key(2))
norm = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
img, txt = norm(jax.random.normal(k1, (12, 8))), norm(jax.random.normal(k2, (12, 8)))
v0, g0 = jax.value_and_grad(losses.clip_loss_naive, argnums=(0, 1, 2))(img, txt, 4.0)
mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1, model=1)))
axes = sharding.batch_axes(DEFAULT_RULES)
i, t = (jax.device_put(x, sharding.batch_sharding(mesh, DEFAULT_RULES)) for x in (img, txt))
out = {"devices": jax.device_count()}
for block in (1, 2, 5, 12):
    v, g = jax.jit(jax.value_and_grad(lambda i, t, s: losses.clip_loss_ring(i, t, s, mesh, axes, block),
                                      argnums=(0, 1, 2)))(i, t, 4.0)
    out[block] = [abs(float(v) - float(v0)) / float(v0)] + [
        float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(b)))) for a, b in zip(g, g0)]
print(json.dumps(out))
"""


@pytest.mark.parametrize("devices", [1, 2, 4])
def test_ring_loss_on_1_2_and_4_devices_equals_naive(devices):
    """A ring of 1 (no permute), 2 and 4 shards, blocks of 1 to the whole B_local (3 to 12
    rows per shard): value and gradients (image, text, scale) equal the naive loss."""
    out = run_python(RING_FEW, n_devices=devices)
    assert out["devices"] == devices
    for block in ("1", "2", "5", "12"):
        assert max(out[block]) < 1e-5, (block, out[block])


def test_ring_loss_without_batch_axes_equals_naive():
    img, txt = _embeds()
    for block in (3, 100):
        f = lambda i, t, s: losses.clip_loss_ring(i, t, s, None, (), block)  # noqa: E731
        v, grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(img, txt, 7.0)
        v0, grads0 = jax.value_and_grad(losses.clip_loss_naive, argnums=(0, 1, 2))(img, txt, 7.0)
        np.testing.assert_allclose(v, v0, rtol=1e-6)
        for a, b in zip(grads, grads0):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_unknown_loss_name_is_one_error_listing_the_registry():
    want = r"config.loss.name: must be one of \['clip', 'clip_blockwise', 'clip_ring', 'siglip'\] \(got 'nope'\)"
    with pytest.raises(ValueError, match=want):
        losses.get("nope")
    with pytest.raises(ValueError, match=want):
        losses.make_loss(_loss_cfg("nope"), None, ())
    from clip_jax import config_lib, validation
    from tests.helpers import tiny_config
    with pytest.raises(config_lib.ConfigError, match=want):
        validation.validate(tiny_config(loss__name="nope"))


def test_a_loss_checks_the_options_it_reads_in_one_place():
    """The registry entry's checks are what validation and make_loss both apply: the
    blockwise loss's block size, and nothing of a key that the chosen loss does not read."""
    from clip_jax import config_lib, validation
    from tests.helpers import tiny_config
    config = tiny_config()
    for bad in (0, -3, 2.5, True, None):
        want = rf"config.loss.block_size: must be a positive integer \(got {bad!r}\)"
        with pytest.raises(ValueError, match=want):
            losses.make_loss(_loss_cfg("clip_blockwise", bad), None, ())
        config.loss = _loss_cfg("clip_blockwise", bad)
        with pytest.raises(config_lib.ConfigError, match=want):
            validation.validate(config)
    config.loss = _loss_cfg("clip", 0)
    validation.validate(config)          # the loss 'clip' reads no block size
    assert losses.check(config.loss) is losses.LOSSES["clip"]


def _one_device_mesh():
    import ml_collections
    from clip_jax import sharding
    from clip_jax.config_lib import DEFAULT_RULES
    return (sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1, model=1)),
                               devices=jax.devices()[:1]), sharding.batch_axes(DEFAULT_RULES))


def _assert_close(got, want, rtol=1e-5):
    """Values / gradient trees equal to `rtol` relative to each array's largest entry."""
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        a, b = np.asarray(a), np.asarray(b)
        np.testing.assert_allclose(a, b, rtol=0, atol=rtol * max(np.max(np.abs(b)), 1e-30))


@pytest.fixture(scope="module")
def clip_references():
    """(value, grads) of the plain sharded loss and the naive loss on _embeds(16, 8), scale 7."""
    mesh, axes = _one_device_mesh()
    img, txt = _embeds(16, 8)
    plain = jax.jit(jax.value_and_grad(lambda i, t, s: losses.clip_loss(i, t, s, mesh, axes), argnums=(0, 1, 2)))
    naive = jax.jit(jax.value_and_grad(losses.clip_loss_naive, argnums=(0, 1, 2)))
    return plain(img, txt, 7.0), naive(img, txt, 7.0)


@pytest.mark.parametrize("block_size", [1, 5, 8, 16, 64])   # 5: padded last block; 16, 64: one block
def test_blockwise_loss_equals_plain_single_device(block_size, clip_references):
    mesh, axes = _one_device_mesh()
    img, txt = _embeds(16, 8)
    blockwise = jax.jit(jax.value_and_grad(
        lambda i, t, s: losses.clip_loss_blockwise(i, t, s, mesh, axes, block_size), argnums=(0, 1, 2)))
    compiled = blockwise.lower(img, txt, 7.0).compile()
    got = compiled(img, txt, 7.0)
    for reference in clip_references:
        _assert_close(got, reference)
    if block_size == 5:   # no sharding at all (batch_axes=()) takes the same blockwise path
        _assert_close(jax.jit(jax.value_and_grad(
            lambda i, t, s: losses.clip_loss_blockwise(i, t, s, None, (), block_size),
            argnums=(0, 1, 2)))(img, txt, 7.0), got)
    hlo = compiled.as_text()
    assert ("f32[16,16]" in hlo) == (block_size >= 16)            # B x B logits only as one block
    assert f"f32[16,{min(block_size, 16)}]" in hlo


def test_blockwise_loss_is_stable_for_large_logits():
    # The streaming LSE must not overflow: scale 1000 gives logits up to ~1000 (exp: inf).
    img, txt = _embeds(12, 8)
    got = jax.jit(jax.value_and_grad(lambda i, t, s: losses.clip_loss_blockwise(i, t, s, None, (), 5),
                                     argnums=(0, 1, 2)))(img, txt, 1000.0)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(got))
    _assert_close(got, jax.jit(jax.value_and_grad(losses.clip_loss_naive, argnums=(0, 1, 2)))(img, txt, 1000.0))


def test_siglip_naive_matches_hand_computation():
    img = jnp.array([[1.0, 0.0], [0.0, 1.0]])
    txt = jnp.array([[0.6, 0.8], [0.8, -0.6]])
    t, b = 10.0, -2.0
    log_sigmoid = lambda x: -np.log1p(np.exp(-x))
    # logits t<img_i, txt_j> + b: [[6 - 2, 8 - 2], [8 - 2, -6 - 2]]; z = +1 on the diagonal.
    expected = -(log_sigmoid(4.0) + log_sigmoid(-6.0) + log_sigmoid(-6.0) + log_sigmoid(-8.0)) / 2
    np.testing.assert_allclose(losses.siglip_loss_naive(img, txt, t, b), expected, rtol=1e-6)


def test_siglip_sharded_single_device_equals_naive():
    mesh, axes = _one_device_mesh()
    img, txt = _embeds(16, 8)
    args = (img, txt, 10.0, -10.0)
    got = jax.jit(jax.value_and_grad(lambda i, t, s, b: losses.siglip_loss(i, t, s, b, mesh, axes),
                                     argnums=(0, 1, 2, 3)))(*args)
    _assert_close(got, jax.jit(jax.value_and_grad(losses.siglip_loss_naive, argnums=(0, 1, 2, 3)))(*args))


def _loss_cfg(name, block_size=4):
    import ml_collections
    return ml_collections.ConfigDict(dict(name=name, block_size=block_size))


def test_make_loss_dispatches_and_checks_the_bias():
    mesh, axes = _one_device_mesh()
    img, txt = _embeds(8, 4)
    clip = losses.clip_loss_naive(img, txt, 5.0)
    run = lambda name, bias, block=4: jax.jit(losses.make_loss(_loss_cfg(name, block), mesh, axes))(
        img, txt, 5.0, bias)
    np.testing.assert_allclose(run("clip", None), clip, rtol=1e-6)
    np.testing.assert_allclose(run("clip_blockwise", None, 3), clip, rtol=1e-5)
    np.testing.assert_allclose(run("clip_ring", None, 3), clip, rtol=1e-5)
    np.testing.assert_allclose(run("siglip", -1.0), losses.siglip_loss_naive(img, txt, 5.0, -1.0), rtol=1e-5)
    with pytest.raises(ValueError, match="siglip.*logit_bias"):
        losses.make_loss(_loss_cfg("siglip"), mesh, axes)(img, txt, 5.0, None)
    with pytest.raises(ValueError, match="takes no logit_bias"):
        losses.make_loss(_loss_cfg("clip"), mesh, axes)(img, txt, 5.0, 0.0)
    assert set(losses.LOSSES) == {"clip", "clip_blockwise", "clip_ring", "siglip"}


def test_model_options():
    import math
    assert losses.model_options(_loss_cfg("clip")) == {}
    assert losses.model_options(_loss_cfg("clip_blockwise")) == {}
    assert losses.model_options(_loss_cfg("siglip")) == {"logit_scale_init": math.log(10.0),
                                                         "logit_bias_init": -10.0}


def test_loss_memory_benchmark_mode():
    from tests.helpers import run_cli
    proc = run_cli(["clip_jax.benchmark", "loss", "--global_batches=64,128", "--embed_dim=8",
                    "--block_size=8", "--budget_gib=0.00005", "--search_max=512", "--json"], n_devices=8)
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["mode"] == "loss" and r["devices"] == 8 and set(r["results"]) == {"clip", "clip_blockwise", "clip_ring", "siglip"}
    for name, by_batch in r["results"].items():
        assert set(by_batch) == {"64", "128"}
        for m in by_batch.values():
            assert m["peak_bytes"] == m["argument_bytes"] + m["output_bytes"] + m["temp_bytes"] > 0
        fit = r["largest_fitting"][name]
        assert fit["global_batch"] % 64 == 0 and fit["local_batch"] == fit["global_batch"] // 8
        assert fit["global_batch"] == 0 or fit["peak_bytes"] <= 0.00005 * 2 ** 30
    clip, blockwise, ring = (r["results"][n] for n in ("clip", "clip_blockwise", "clip_ring"))
    assert clip["128"]["peak_bytes"] > clip["64"]["peak_bytes"]
    assert blockwise["128"]["peak_bytes"] < clip["128"]["peak_bytes"]
    assert ring["128"]["peak_bytes"] < blockwise["128"]["peak_bytes"]     # nothing gathered
    assert "| 128 | 16 |" in proc.stdout                              # the table
