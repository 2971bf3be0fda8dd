"""The train step's batch scaling and locking (train.make_gradient_fn, optim.trainable_rows):
the micro-batched (gradient-cache) gradient equals the full-batch gradient, and locked
image-tower parameters stay put with no optimiser state."""
import jax
import ml_collections
import numpy as np
import pytest

from clip_jax import checkpoint, optim, train
from clip_jax.data import pipeline
from tests.helpers import run_python, tiny_config


def _batch(config, seed=0):
    rng = np.random.default_rng(seed)
    s, n = config.model.vision.image_size, config.batch_size
    tokens = rng.integers(1, 200, (n, config.model.text.context_length)).astype(np.int32)
    tokens[:, 0], tokens[:, 7] = 254, 255     # sot ... eot (the largest id)
    return {"images": rng.standard_normal((n, s, s, 3)).astype(np.float32), "tokens": tokens}


def loss_and_grads(config, batch):
    """(loss, grads) of the gradient function at the config's fresh initial state."""
    run = train.build(config)
    with run.context():
        state = run.init_state()
        fn = jax.jit(train.make_gradient_fn(config, run.model, run.mesh, run.rules))
        sharded = jax.device_put(batch, train.sharding.batch_sharding(run.mesh, run.rules))
        (loss, _), grads = fn(state.params, state.batch_stats, sharded)
    return float(loss), jax.tree.map(np.asarray, grads)


def assert_same_gradient(a, b, rtol=1e-5):
    """Each leaf within rtol of its own scale, or of the whole gradient's for leaves whose
    true gradient is 0 (attention key biases: softmax ignores them) and hold only rounding."""
    flat_a, flat_b = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b)
    overall = max(np.abs(x).max() for _, x in flat_a)
    for (path, x), y in zip(flat_a, flat_b):
        scale = max(np.abs(x).max(), 1e-3 * overall)
        assert np.abs(x - y).max() <= rtol * scale, (jax.tree_util.keystr(path), np.abs(x - y).max(), scale)


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_micro_batched_gradient_equals_the_full_batch_gradient(loss):
    config = tiny_config(batch_size=32, **{"loss.name": loss})
    batch = _batch(config)
    loss1, grads1 = loss_and_grads(config, batch)
    config.micro_batches = 4
    loss4, grads4 = loss_and_grads(config, batch)
    np.testing.assert_allclose(loss4, loss1, rtol=1e-6)
    assert_same_gradient(grads4, grads1)
    if loss != "clip":   # (SigLIP at initialisation is dominated by the positives' bias term)
        return
    # ... and it is not the mean of the micro-batches' own losses, a different objective.
    small = tiny_config(batch_size=8, **{"loss.name": loss})
    mean_of_small = np.mean([loss_and_grads(small, {k: v[i::4] for k, v in batch.items()})[0]
                             for i in range(4)])
    assert abs(mean_of_small - loss1) > 1e-3 * abs(loss1)


def test_pixel_rows_enter_the_micro_batched_step_as_normalised_images_do():
    """uint8 pixel rows (`pipeline.pixel_rows`: what the pipeline yields), normalised inside
    the step one micro-batch at a time: the loss and gradient of the same images as float32
    [B, S, S, 3] normalised beforehand, in one batch. A row read from the wrong place of the
    batch would pair an image with another caption."""
    config = tiny_config(batch_size=32, micro_batches=4)
    s = config.model.vision.image_size
    pixels = np.random.default_rng(1).integers(0, 256, (32, s, s, 3), dtype=np.uint8)
    batch = _batch(config)
    loss_rows, grads_rows = loss_and_grads(config, {**batch, "images": pipeline.pixel_rows(pixels)})
    config.micro_batches = 1
    loss_float, grads_float = loss_and_grads(config, {**batch, "images": pipeline.normalize_images(pixels)})
    np.testing.assert_allclose(loss_rows, loss_float, rtol=1e-6)
    assert_same_gradient(grads_rows, grads_float)


@pytest.mark.parametrize("kind", ["vit", "resnet"])
def test_scanned_towers_give_the_unrolled_gradient_through_the_micro_batched_step(kind):
    """`model.scan_layers` (each tower's repeated blocks as one lax.scan), with remat and
    micro-batches, as the paper configs run: the same loss, gradient and BatchNorm statistics
    as the unrolled towers. The plain code (`kernels.ops=xla`), as on a pod: with the CPU
    kernels a ResNet's stages run unrolled anyway (tests/test_ops.py)."""
    config = tiny_config(batch_size=16, **{"model.text.layers": 3, "model.remat": True,
                                           "micro_batches": 2, "model.vision.layers": 3})
    config.kernels.ops = "xla"
    if kind == "resnet":
        config.model.vision = ml_collections.ConfigDict(dict(
            kind="resnet", image_size=32, layers=(1, 3, 1, 1), width=8, patch_size=0, heads=2))
    batch = _batch(config)
    results = {}
    for scan in (False, True):
        config.model.scan_layers = scan
        run = train.build(config)
        with run.context():
            state = run.init_state()
            fn = jax.jit(train.make_gradient_fn(config, run.model, run.mesh, run.rules))
            (loss, (stats, _)), grads = fn(state.params, state.batch_stats, batch)
        results[scan] = (float(loss), jax.tree.map(np.asarray, grads), jax.tree.map(np.asarray, stats))
    np.testing.assert_allclose(results[True][0], results[False][0], rtol=1e-6)
    assert_same_gradient(results[True][1], results[False][1])
    for a, b in zip(jax.tree.leaves(results[True][2]), jax.tree.leaves(results[False][2])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    if kind == "resnet":
        assert set(results[True][2]["visual"]) >= {"layer2_0", "layer2_rest"}


MULTI = """
import json, jax, numpy as np
from tests.helpers import tiny_config
from tests.test_train_step import _batch, loss_and_grads
out = {}
for mesh in ({"data": 2, "fsdp": 2},):   # both batch axes: micro-batches split over 4 shards
    config = tiny_config(batch_size=32)
    config.mesh.update(mesh)
    batch = _batch(config)
    l1, g1 = loss_and_grads(config, batch)
    config.micro_batches = 4
    l4, g4 = loss_and_grads(config, batch)
    overall = max(float(np.abs(a).max()) for a in jax.tree.leaves(g1))
    err = max(float(np.abs(a - b).max() / max(np.abs(a).max(), 1e-3 * overall))
              for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g4)))
    out["x".join(map(str, mesh.values()))] = {"loss": [l1, l4], "grad_err": err}
print(json.dumps(out))
"""


@pytest.mark.slow
def test_micro_batched_gradient_on_4_devices_equals_the_full_batch_gradient():
    out = run_python(MULTI, n_devices=4)
    assert set(out) == {"2x2"}
    for r in out.values():
        np.testing.assert_allclose(r["loss"][1], r["loss"][0], rtol=1e-6)
        assert r["grad_err"] <= 1e-5, out


RING_STEPS = """
import json, jax, numpy as np
from clip_jax import train
from tests.helpers import tiny_config
from tests.test_train_step import _batch
out = {}
for name, loss, k in (("clip", "clip", 1), ("ring_k4", "clip_ring", 4)):
    config = tiny_config(batch_size=32, **{"loss.name": loss, "micro_batches": k, "loss.block_size": 3})
    config.mesh.update({"data": 8, "fsdp": 1})
    config.optim.eps = 1e-2   # Adam's eps: a zero gradient's rounding noise is not made a full step
    run = train.build(config)
    with run.context():
        state = run.init_state()
        losses = []
        for step in range(3):
            batch = jax.device_put(_batch(config, seed=step), train.sharding.batch_sharding(run.mesh, run.rules))
            state, metrics = run.train_step(state, batch)
            losses.append(float(metrics["loss"]))
    out[name] = {"losses": losses, "params": [np.asarray(x).tolist() for x in jax.tree.leaves(state.params)]}
print(json.dumps(out))
"""


@pytest.mark.slow
def test_ring_loss_with_micro_batches_trains_as_the_plain_loss_on_8_devices():
    """The trainer's own step on 8 devices: `clip_ring` with 4 micro-batches (2 rows per device
    each; blocks of 3 columns) gives the losses and parameters of `clip` without micro-batches
    after 3 steps. (Adam with eps 1e-2: with the paper's 1e-6 the rounding noise of gradients
    that are 0 by symmetry, such as attention key biases', becomes a full update of random
    sign in either run.)"""
    out = run_python(RING_STEPS, n_devices=8)
    np.testing.assert_allclose(out["ring_k4"]["losses"], out["clip"]["losses"], rtol=1e-5)
    assert out["clip"]["losses"][2] != out["clip"]["losses"][0]         # the parameters moved
    for a, b in zip(out["ring_k4"]["params"], out["clip"]["params"]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


REDUCED_ONCE = """
import json, jax
from clip_jax import cost, train
from tests.helpers import tiny_config
out = {}
for k in (1, 4):
    config = tiny_config(batch_size=32, **{"loss.name": "clip_ring", "micro_batches": k})
    config.mesh.update({"data": 8, "fsdp": 1})
    run = train.build(config)
    with run.context():
        hlo = run.train_step.lower(run.abstract_state, run.abstract_batch()).compile().as_text()
    params = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(run.abstract_state.params))
    out[k] = {"collectives": cost.collective_bytes(hlo), "param_bytes": params}
print(json.dumps(out))
"""


def test_micro_batches_reduce_the_parameter_gradient_once_per_step():
    """Data parallel with 4 micro-batches: each device sums its micro-batches' parameter
    gradients and the step all-reduces them once, as without micro-batches (the compiled
    step's all-reduce bytes: one gradient, not four); `clip_ring` gathers nothing."""
    out = run_python(REDUCED_ONCE, n_devices=8)
    one, four = (out[k]["collectives"] for k in ("1", "4"))
    params = out["1"]["param_bytes"]
    assert params <= one["all-reduce"]["bytes"] < 1.2 * params
    assert four["all-reduce"]["bytes"] <= 1.05 * one["all-reduce"]["bytes"]
    assert four["all-gather"]["bytes"] < 0.05 * params and four["collective-permute"]["count"] > 0


def _leaves(tree):
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.mark.slow
@pytest.mark.parametrize("kind,unlocked", [("vit", 0), ("resnet", 0), ("vit", 2)])
def test_locked_image_tower_is_unchanged_after_steps(kind, unlocked, tmp_path):
    overrides = {"lock_image.enabled": True, "lock_image.unlocked_blocks": unlocked, "total_steps": 3}
    if kind == "resnet":
        import ml_collections
        base = tiny_config()
        base.model.vision = ml_collections.ConfigDict(dict(kind="resnet", image_size=32, layers=(1, 1, 1, 1),
                                                           width=16, patch_size=0, heads=8))
    else:   # 3 blocks: 2 stacked and the last; unlocking 2 trains one row of the stacked ones
        base = tiny_config()
        base.model.vision.layers = 3
    src = str(tmp_path / "pretrained")
    run = train.build(base)
    with run.context():
        state = run.init_state()
    checkpoint.save_params(src, state.params, state.batch_stats)
    config = base.copy_and_resolve_references()
    config.init_from = src
    config.evals = {}        # (no evaluation: only the parameters matter here)
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = config
        for p in parents:
            node = node[p]
        node[leaf] = value
    wd = str(tmp_path / "run")
    train.train(config, wd)
    before, after = _leaves(state.params), _leaves(checkpoint.read_arrays(wd)["params"])
    rows = {jax.tree_util.keystr(p): v for p, v in
            jax.tree_util.tree_leaves_with_path(optim.trainable_rows(state.params, config.lock_image))}
    frozen = [k for k in before if rows[k] is False]
    trained = [k for k in before if rows[k] is not False]
    partly = [k for k in before if not isinstance(rows[k], bool)]
    assert frozen and all(k.startswith("['visual']") for k in frozen)
    for k in frozen:
        np.testing.assert_array_equal(after[k], before[k], err_msg=k)
    # Partly trained stacked blocks: the frozen rows stay, the unlocked ones move.
    assert bool(partly) == (kind == "vit" and unlocked == 2)
    for k in partly:
        assert list(rows[k]) == [False, True], k
        np.testing.assert_array_equal(after[k][0], before[k][0], err_msg=k)
    assert not partly or any(not np.array_equal(after[k][1], before[k][1]) for k in partly)
    assert any(not np.array_equal(after[k], before[k]) for k in trained if k.startswith("['text']"))
    unlocked_visual = [k for k in trained if k.startswith("['visual']")]
    if unlocked:
        assert any("attnpool" in k or "ln_post" in k or "proj" in k for k in unlocked_visual)
        assert any(not np.array_equal(after[k], before[k]) for k in unlocked_visual)
    else:
        assert not unlocked_visual
        if kind == "resnet":   # a fully locked ResNet runs BatchNorm on its running statistics
            stats_after = _leaves(checkpoint.read_arrays(wd)["batch_stats"])
            for k, v in _leaves(state.batch_stats).items():
                np.testing.assert_array_equal(stats_after[k], v, err_msg=k)
    # Frozen parameters have no optimiser state: the Adam moments cover the trained ones only
    # (partly trained stacked arrays whole).
    run = train.build(config)
    mu_sizes = sum(x.size for x in jax.tree.leaves(run.abstract_state.opt_state))
    trained_size = sum(before[k].size for k in trained)
    assert trained_size * 2 <= mu_sizes < trained_size * 2 + 64, (mu_sizes, trained_size)
