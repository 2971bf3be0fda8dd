"""The towers' stacked blocks (`nn.scan`, `models.layout`) and the per-block layout they
replaced: the two views of a model's variables, and checkpoints and converted weights of the
per-block layout loading into the stacked models (init_from, clip_jax.load, resume)."""
import json
import os
import shutil

import jax
import ml_collections
import numpy as np
import optax
import pytest

from clip_jax import checkpoint, inference, metrics, models, train
from clip_jax.models import layout
from tests.helpers import tiny_config

DEEP = {"model__vision__layers": 3, "model__text__layers": 2}


def _resnet(config, layers=(1, 3, 1, 2)):
    config.model.vision = ml_collections.ConfigDict(dict(
        kind="resnet", image_size=32, layers=layers, width=8, patch_size=0, heads=2))
    return config


def _variables(config, seed=0):
    model = models.from_config(config)
    return models.init_variables(model, config.model, jax.random.key(seed))


def _leaves(tree):
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.mark.parametrize("kind", ["vit", "resnet"])
def test_the_per_block_view_names_the_reference_blocks_and_stacks_back_exactly(kind):
    config = tiny_config(**DEEP)
    if kind == "resnet":
        _resnet(config)
    variables = _variables(config)
    per_block = layout.to_per_block(variables)
    assert layout.is_per_block(per_block) and not layout.is_per_block(variables)
    text = variables["params"]["text"]["transformer"]
    assert sorted(per_block["params"]["text"]["transformer"]) == ["resblocks_0", "resblocks_1"]
    np.testing.assert_array_equal(per_block["params"]["text"]["transformer"]["resblocks_0"]["mlp"]["c_fc"]["kernel"],
                                  text["resblocks"]["mlp"]["c_fc"]["kernel"][0])
    np.testing.assert_array_equal(per_block["params"]["text"]["transformer"]["resblocks_1"]["mlp"]["c_fc"]["kernel"],
                                  text["resblocks_last"]["mlp"]["c_fc"]["kernel"])
    visual = per_block["params"]["visual"]
    if kind == "vit":
        assert sorted(visual["transformer"]) == ["resblocks_0", "resblocks_1", "resblocks_2"]
    else:
        assert sorted(k for k in visual if k.startswith("layer")) == [
            "layer1_0", "layer2_0", "layer2_1", "layer2_2", "layer3_0", "layer4_0", "layer4_1"]
        np.testing.assert_array_equal(per_block["batch_stats"]["visual"]["layer2_2"]["bn1"]["var"],
                                      variables["batch_stats"]["visual"]["layer2_rest"]["bn1"]["var"][1])
    back = layout.to_stacked(per_block)
    assert jax.tree.structure(back) == jax.tree.structure(variables)
    got = _leaves(back)
    for k, v in _leaves(variables).items():
        np.testing.assert_array_equal(got[k], v, err_msg=k)
    assert layout.to_stacked(variables) is not None and _leaves(layout.to_stacked(variables)).keys() == got.keys()


def test_optimiser_states_and_shardings_convert_too():
    """The moments inside optax's named-tuple states, and abstract arrays' NamedShardings
    (the stacked axis replicated), convert between the layouts."""
    config = tiny_config(**DEEP)
    params = _variables(config)["params"]
    opt_state = optax.adamw(1e-3).init(params)
    per_block = layout.to_per_block(opt_state)
    assert "resblocks_1" in per_block[0].mu["visual"]["transformer"]
    assert type(per_block[0]) is type(opt_state[0])
    back = layout.to_stacked(per_block)
    assert jax.tree.structure(back) == jax.tree.structure(opt_state)
    mesh = jax.make_mesh((1,), ("fsdp",))
    spec = jax.sharding.PartitionSpec(None, "fsdp", None)
    x = jax.ShapeDtypeStruct((2, 4, 3), np.float32, sharding=jax.sharding.NamedSharding(mesh, spec))
    one = layout.to_per_block({"resblocks": {"w": x}, "resblocks_last": {"w": x}})
    assert one["resblocks_0"]["w"].shape == (4, 3) and one["resblocks_0"]["w"].sharding.spec == jax.sharding.PartitionSpec("fsdp", None)
    assert layout.to_stacked(one)["resblocks"]["w"].sharding.spec == spec


@pytest.mark.parametrize("kind", ["vit", "resnet"])
def test_per_block_weights_load_into_the_stacked_model(kind, tmp_path):
    """Converted weights and parameters-only checkpoints written block by block (before the
    towers stacked them) load exactly, through init_from's reader and `clip_jax.load`."""
    config = tiny_config(**DEEP)
    if kind == "resnet":
        _resnet(config)
    config.data.tokenizer, config.data.tokenizer_path = "clip_bpe", ""   # as converted weights
    config.model.text.vocab_size = 49408
    variables = _variables(config, seed=3)
    old = layout.to_per_block(variables)
    src = str(tmp_path / "old")
    checkpoint.save_params(src, old["params"], old.get("batch_stats"), config=config)
    fresh = _variables(config, seed=4)
    loaded, report = checkpoint.load_model_variables(src, fresh)
    assert not report["missing"] and not report["unexpected"]
    assert any("['resblocks_1']" in k for k in report["loaded"])       # named as saved
    got = _leaves(loaded)
    for k, v in _leaves(variables).items():
        np.testing.assert_array_equal(got[k], v, err_msg=k)
    model = inference.load(src, batch_size=4)
    size = config.model.vision.image_size
    images = np.random.default_rng(0).random((2, size, size, 3), np.float32)
    clip = models.from_config(config)
    want = clip.apply(variables, images, method=clip.encode_image)
    np.testing.assert_allclose(model.encode_image(images), want, rtol=1e-5, atol=1e-6)


def test_init_from_matches_blocks_one_by_one_across_depths(tmp_path):
    """A source of another depth: its blocks go to this model's blocks of the same index,
    the rest are missing (kept fresh) or unexpected -- as when every block was its own array."""
    src_config = tiny_config(model__text__layers=3, model__vision__layers=2, seed=1)
    source = _variables(src_config, seed=1)
    checkpoint.save_params(str(tmp_path / "src"), source["params"])
    config = tiny_config(model__text__layers=2, model__vision__layers=4)
    fresh = _variables(config, seed=2)
    loaded, report = checkpoint.load_model_variables(str(tmp_path / "src"), fresh)
    assert {k.split("['transformer']")[1].split("]")[0] for k in report["missing"]} == \
        {"['resblocks_2'", "['resblocks_3'"}
    assert all("['text']" not in k for k in report["missing"])
    assert report["unexpected"] and all("['text']['transformer']['resblocks_2']" in k for k in report["unexpected"])
    src_pb, got_pb, fresh_pb = (layout.to_per_block(t["params"]) for t in (source, loaded, fresh))
    kernel = lambda t, tower, i: np.asarray(t[tower]["transformer"][f"resblocks_{i}"]["attn"]["query"]["kernel"])
    for i in range(2):
        np.testing.assert_array_equal(kernel(got_pb, "text", i), kernel(src_pb, "text", i))
        np.testing.assert_array_equal(kernel(got_pb, "visual", i), kernel(src_pb, "visual", i))
    for i in (2, 3):
        np.testing.assert_array_equal(kernel(got_pb, "visual", i), kernel(fresh_pb, "visual", i))


@pytest.mark.slow
def test_a_training_checkpoint_of_the_per_block_layout_resumes_exactly(tmp_path):
    """A run checkpointed block by block (optimiser moments too) resumes into the stacked
    model and takes the same steps as the run that never stopped."""
    config = tiny_config(total_steps=6, checkpoint_every=3, **DEEP)
    ref = str(tmp_path / "ref")
    train.train(config, ref)
    # The step-3 checkpoint of the reference, rewritten in the per-block layout.
    run = train.build(config)
    wd = str(tmp_path / "old")
    shutil.copytree(ref, wd)
    shutil.rmtree(os.path.join(wd, "checkpoints"))
    for name in ("metrics.jsonl",):
        if os.path.exists(os.path.join(wd, name)):
            os.remove(os.path.join(wd, name))
    saved = checkpoint.Checkpointer(os.path.join(ref, "checkpoints"), 3, run.mesh)
    with run.context():
        state, data_state, meta = saved._restore_step(3, train.state_to_dict(run.abstract_state), None)
    saved.close()
    old = checkpoint.Checkpointer(os.path.join(wd, "checkpoints"), 3, run.mesh, tokenizer=meta["tokenizer"])
    old.save(layout.to_per_block(state), data_state, config)
    old.close()
    step3 = json.load(open(os.path.join(wd, "checkpoints", "3", "meta", "metadata")))
    assert layout.is_per_block(step3["shapes"])
    assert any("['opt_state']" in k and "resblocks_1" in k for k in step3["shapes"])
    train.train(config, wd)
    want = {r["step"]: r["loss"] for r in metrics.read_metrics(ref) if "loss" in r}
    got = {r["step"]: r["loss"] for r in metrics.read_metrics(wd) if "loss" in r}
    assert [s for s in got if s > 3] == [4, 5, 6]
    for s in (4, 5, 6):
        assert got[s] == want[s], (s, got[s], want[s])
    final = _leaves(checkpoint.read_arrays(wd)["params"])
    for k, v in _leaves(checkpoint.read_arrays(ref)["params"]).items():
        np.testing.assert_array_equal(final[k], v, err_msg=k)


def test_blocks_that_differ_in_structure_are_refused_by_name():
    """An old locked-image optimiser state (moments for some blocks, none for others) cannot be
    stacked: a LayoutError naming the blocks, which the resume turns into its refusal."""
    tree = {"resblocks_0": {"w": optax.MaskedNode()}, "resblocks_1": {"w": np.zeros(2)},
            "resblocks_2": {"w": np.zeros(2)}}
    with pytest.raises(layout.LayoutError, match=r"resblocks_0\.\.1"):
        layout.to_stacked(tree)
