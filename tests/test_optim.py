import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from clip_jax import optim

CFG = ml_collections.ConfigDict(dict(lr=1e-3, b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.2,
                                     warmup_steps=10, grad_clip_norm=0.0))


def _params():
    return {"visual": {"conv": {"kernel": jnp.ones((3, 3, 3, 8))}, "ln": {"scale": jnp.ones(8), "bias": jnp.zeros(8)},
                       "class_embedding": jnp.ones(8)},
            "text": {"token_embedding": {"embedding": jnp.ones((10, 8))}, "dense": {"kernel": jnp.ones((8, 8)), "bias": jnp.ones(8)}},
            "logit_scale": jnp.array(2.0)}


def test_weight_decay_mask_skips_gains_biases_and_temperature():
    m = optim.weight_decay_mask(_params())
    assert m["visual"]["conv"]["kernel"] and m["text"]["dense"]["kernel"] and m["text"]["token_embedding"]["embedding"]
    assert not m["visual"]["ln"]["scale"] and not m["visual"]["ln"]["bias"]
    assert not m["text"]["dense"]["bias"] and not m["logit_scale"] and not m["visual"]["class_embedding"]


def test_decay_applied_only_where_masked():
    tx, _ = optim.make_optimizer(CFG, 100)
    p = _params()
    zeros = optax.tree_utils.tree_zeros_like(p)
    state = tx.init(p)
    for _ in range(12):   # past warm-up so lr > 0
        upd, state = tx.update(zeros, state, p)
    assert float(upd["text"]["dense"]["kernel"][0, 0]) < 0        # decayed toward 0
    assert float(upd["text"]["dense"]["bias"][0]) == 0.0            # untouched
    assert float(upd["logit_scale"]) == 0.0


def test_schedule_warmup_then_cosine_to_zero():
    s = optim.make_schedule(CFG, 110)
    np.testing.assert_allclose(s(0), 0.0)
    np.testing.assert_allclose(s(5), 5e-4, rtol=1e-6)
    np.testing.assert_allclose(s(10), 1e-3, rtol=1e-6)
    np.testing.assert_allclose(s(60), 5e-4, rtol=1e-5)     # halfway through the cosine
    np.testing.assert_allclose(s(110), 0.0, atol=1e-9)
    assert all(s(i) >= s(i + 1) for i in range(10, 110))


def test_gradient_clipping_scales_the_update():
    # With a huge eps, Adam's update is linear in the gradient, so clipping shows up 1:1.
    def first_update(clip):
        cfg = CFG.copy_and_resolve_references()
        cfg.update(grad_clip_norm=clip, weight_decay=0.0, eps=1e6, warmup_steps=0)
        tx, _ = optim.make_optimizer(cfg, 100)
        p = {"w": jnp.ones((4, 4))}
        upd, _ = tx.update({"w": jnp.full((4, 4), 100.0)}, tx.init(p), p)
        return float(optax.global_norm(upd))
    # gradient norm is 400; clipping to 1 shrinks the update 400-fold
    np.testing.assert_allclose(first_update(0.0) / first_update(1.0), 400.0, rtol=1e-3)


def test_logit_scale_clamped_at_log_100():
    p = optim.clip_logit_scale({"logit_scale": jnp.array(9.0), "x": jnp.ones(2)})
    np.testing.assert_allclose(p["logit_scale"], np.log(100.0), rtol=1e-6)
    p = optim.clip_logit_scale({"logit_scale": jnp.array(-1.0)})
    assert float(p["logit_scale"]) == 0.0
