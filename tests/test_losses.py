"""The sharded contrastive loss equals the plain full-batch loss, forward and backward."""
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
for name, shape in {"data8": (-1, 1, 1), "data4_fsdp2": (4, 2, 1), "data2_fsdp2_model2": (2, 2, 2)}.items():
    mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(zip(("data", "fsdp", "model"), shape))))
    axes = sharding.batch_axes(DEFAULT_RULES)
    bs = sharding.batch_sharding(mesh, DEFAULT_RULES)
    f = jax.jit(jax.value_and_grad(lambda i, t, s: losses.clip_loss(i, t, s, mesh, axes), argnums=(0, 1, 2)))
    v, g = f(jax.device_put(img, bs), jax.device_put(txt, bs), 9.0)
    hlo = jax.jit(lambda i, t, s: losses.clip_loss(i, t, s, mesh, axes)).lower(
        jax.device_put(img, bs), jax.device_put(txt, bs), 9.0).compile().as_text()
    out[name] = {
        "loss_err": abs(float(v) - float(v0)) / abs(float(v0)),
        "grad_err": max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in zip(g, g0)),
        "shards": sharding.num_batch_shards(mesh, DEFAULT_RULES),
        "has_full_logits": "f32[32,32]" in hlo,
        "has_local_logits": "f32[%d,32]" % (32 // sharding.num_batch_shards(mesh, DEFAULT_RULES)) in hlo,
    }
print(json.dumps(out))
"""


@pytest.mark.parametrize("mesh_name,shards", [("data8", 8), ("data4_fsdp2", 8), ("data2_fsdp2_model2", 4)])
def test_sharded_loss_on_8_devices_equals_naive(mesh_name, shards, _multi_result={}):
    if not _multi_result:
        _multi_result.update(run_python(MULTI, n_devices=8))
    r = _multi_result[mesh_name]
    assert r["shards"] == shards
    assert r["loss_err"] < 1e-6
    assert r["grad_err"] < 1e-6
    # Each device computes only its B_local x B rows; the B x B matrix never appears.
    assert r["has_local_logits"] and not r["has_full_logits"]


def test_unknown_loss_name_is_rejected():
    with pytest.raises(ValueError, match="config.loss.name"):
        losses.get_loss("nope")
