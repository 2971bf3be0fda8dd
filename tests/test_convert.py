"""clip_jax.convert and clip_jax.pytorch_io without torch: the name table, shape inference,
export -> import round trips, and refusals. Parity with the reference implementation
itself is tests/test_parity.py (needs the `parity` extra)."""
import json
import os
import pickle
import zipfile

import ml_collections
import ml_dtypes
import numpy as np
import pytest

from clip_jax import checkpoint, config_lib, convert, pytorch_io, validation
from clip_jax.models import layout
from tests.helpers import tiny_config, write_model_dir

PAPER = list(config_lib.PAPER_MODELS)


def _random_variables(config, seed=0):
    """Every array of the run config's model filled with distinct random values (numpy trees,
    the blocks stacked as the model stores them)."""
    rng = np.random.default_rng(seed)
    out = {"params": {}, "batch_stats": {}}
    for entry, shape in convert.name_table(config):     # the per-block view
        convert._set(out[entry.collection], entry.path, rng.standard_normal(shape).astype(np.float32))
    return layout.to_stacked(out)


def _flat(tree, prefix=()):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _flat(v, prefix + (k,))
        else:
            yield prefix + (k,), v


def _model(kind="vit", **kw):
    cfg = tiny_config().model
    if kind == "resnet":
        cfg.vision = ml_collections.ConfigDict(dict(kind="resnet", image_size=64, layers=(1, 2, 1, 1),
                                                    width=16, patch_size=0, heads=8))
    cfg.text.heads = 1                      # the reference convention: width / 64 ...
    cfg.vision.heads = cfg.vision.heads if kind == "resnet" else 1
    cfg.text.width = cfg.vision.width = 64  # ... with width 64
    cfg.update(kw)
    return cfg


# ----------------------------------------------------------------------------- name table

@pytest.mark.parametrize("kind", ["vit", "resnet"])
def test_to_torch_then_from_torch_is_the_identity(kind):
    cfg = convert.converted_config(_model(kind))
    variables = _random_variables(cfg)
    tensors = convert.to_torch(variables, cfg)
    back = convert.from_torch(tensors, cfg)
    got, want = dict(_flat(back)), dict(_flat(variables))
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=str(k))


def test_reference_names_and_layouts():
    cfg = convert.converted_config(_model("vit"))
    v = _random_variables(cfg)
    t = convert.to_torch(v, cfg)
    p = layout.to_per_block(v)["params"]         # the reference's blocks, one by one
    attn = p["text"]["transformer"]["resblocks_0"]["attn"]
    w = attn["query"]["kernel"].shape[0]
    # fused in_proj: rows [q; k; v], each torch Linear [out, in] = our kernel transposed
    in_proj = t["transformer.resblocks.0.attn.in_proj_weight"]
    assert in_proj.shape == (3 * w, w)
    np.testing.assert_array_equal(in_proj[w:2 * w], attn["key"]["kernel"].reshape(w, w).T)
    np.testing.assert_array_equal(t["transformer.resblocks.0.attn.in_proj_bias"][2 * w:],
                                  attn["value"]["bias"].reshape(-1))
    np.testing.assert_array_equal(t["transformer.resblocks.0.attn.out_proj.weight"],
                                  attn["out"]["kernel"].reshape(w, w).T)
    np.testing.assert_array_equal(t["transformer.resblocks.0.mlp.c_fc.weight"],
                                  p["text"]["transformer"]["resblocks_0"]["mlp"]["c_fc"]["kernel"].T)
    # conv OIHW <- HWIO; layer norm weight <- scale; projections untouched
    np.testing.assert_array_equal(t["visual.conv1.weight"], p["visual"]["conv1"]["kernel"].transpose(3, 2, 0, 1))
    np.testing.assert_array_equal(t["ln_final.weight"], p["text"]["ln_final"]["scale"])
    np.testing.assert_array_equal(t["text_projection"], p["text"]["text_projection"])
    np.testing.assert_array_equal(t["token_embedding.weight"], p["text"]["token_embedding"]["embedding"])
    assert t["logit_scale"].shape == ()


def test_resnet_names_include_batch_norm_statistics_and_the_attention_pool():
    cfg = convert.converted_config(_model("resnet"))
    v = _random_variables(cfg)
    t = convert.to_torch(v, cfg)
    block = v["batch_stats"]["visual"]["layer2_0"]
    np.testing.assert_array_equal(t["visual.layer2.0.downsample.1.running_var"], block["downsample_bn"]["var"])
    np.testing.assert_array_equal(t["visual.layer2.0.bn3.running_mean"], block["bn3"]["mean"])
    assert t["visual.layer2.0.bn3.num_batches_tracked"].dtype == np.int64
    assert "visual.layer2.1.downsample.0.weight" not in t        # only the first block projects
    pool = v["params"]["visual"]["attnpool"]["attn"]
    c = pool["query"]["kernel"].shape[0]
    np.testing.assert_array_equal(t["visual.attnpool.q_proj.weight"], pool["query"]["kernel"].reshape(c, c).T)
    np.testing.assert_array_equal(t["visual.attnpool.c_proj.weight"],
                                  pool["out"]["kernel"].reshape(c, -1).T)


@pytest.mark.parametrize("name", PAPER)
def test_each_paper_architecture_is_recognised_from_its_tensor_shapes(name):
    cfg = config_lib.model_config(name)
    # Shape-only stand-ins (no memory): inference reads shapes and names only.
    tensors = {}
    for entry, shape in convert.name_table(convert.converted_config(cfg)):
        if entry.part is not None:
            shape = (3 * int(np.prod(shape[1:])), shape[0]) if entry.layout == "heads_in" else (3 * int(np.prod(shape)),)
        elif entry.layout in ("dense", "heads_in", "heads_out"):
            shape = (int(np.prod(shape[1:])), shape[0]) if entry.layout == "heads_in" else \
                (shape[-1], int(np.prod(shape[:-1])))
        elif entry.layout == "conv":
            shape = (shape[3], shape[2], shape[0], shape[1])
        elif entry.layout == "heads_bias":
            shape = (int(np.prod(shape)),)
        tensors[entry.torch_name] = np.broadcast_to(np.float32(0), shape)
    inferred = convert.infer_model_config(tensors)
    assert convert.paper_name(inferred) == name
    assert convert._shape_dict(inferred) == convert._shape_dict(cfg)
    assert (inferred.dtype, inferred.remat, inferred.activation) == ("float32", "none", "quick_gelu")
    assert convert.arch_config({"vit_l14_336": "ViT-L/14@336px", "vit_b32": "ViT-B-32",
                                "rn50x4": "RN50x4"}.get(name, name)).vision.image_size == cfg.vision.image_size


# ----------------------------------------------------------------------------- round trips

def test_export_import_round_trip_keeps_arrays_heads_and_activation(tmp_path):
    # The smoke ViT has 3 heads of width 32 (not the reference's width / 64): the
    # open_clip_config.json written beside the weights carries it back.
    src = write_model_dir(tmp_path / "model", seed=1, model__vision__width=96, model__vision__heads=3,
                          model__activation="gelu")
    out = tmp_path / "export" / "model.safetensors"
    convert.main([src, "--to", "open_clip", "--out", str(out)])
    oc = json.loads((tmp_path / "export" / "open_clip_config.json").read_text())
    assert oc["model_cfg"]["vision_cfg"]["head_width"] == 32 and oc["model_cfg"]["quick_gelu"] is False
    tensors = pytorch_io.read_tensors(str(out))
    assert "visual.transformer.resblocks.0.attn.in_proj_weight" in tensors
    convert.main([str(tmp_path / "export"), "--out", str(tmp_path / "back")])
    saved = json.loads((tmp_path / "back" / "config.json").read_text())["model"]
    want = json.loads((tmp_path / "model" / "config.json").read_text())["model"]
    assert saved["vision"] == want["vision"] and saved["text"] == want["text"]
    assert saved["activation"] == "gelu"
    a, b = checkpoint.read_arrays(src), checkpoint.read_arrays(str(tmp_path / "back"))
    fa, fb = dict(_flat(a["params"])), dict(_flat(b["params"]))
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(fa[k], fb[k], err_msg=str(k))


def test_a_siglip_runs_logit_bias_survives_load_export_and_import(tmp_path):
    """A SigLIP run's model has a learned logit bias (the loss's model options). Every reader
    of a checkpoint builds the model from the whole config (`models.from_config`), so
    `clip_jax.load` keeps the bias, and the loaded model's match probabilities,
    sigmoid(scale * cos + bias), are the trainer's model's; the export to OpenCLIP writes it
    (with `init_logit_bias`, so that OpenCLIP makes the parameter) and the import back
    says loss.name=siglip, so it loads there too."""
    import jax
    import clip_jax
    from clip_jax import models, train
    wd = str(tmp_path / "run")
    config = tiny_config(total_steps=2, batch_size=16, checkpoint_every=0, loss__name="siglip")
    config.evals = ml_collections.ConfigDict()
    train.train(config, wd)
    trained = checkpoint.read_arrays(wd)["params"]
    bias = float(trained["logit_bias"])
    assert bias != 0.0

    loaded = clip_jax.load(wd, batch_size=8)
    assert "logit_bias" in loaded.variables["params"] and loaded.logit_bias == bias
    target = models.abstract_variables(models.from_config(loaded.config), loaded.config.model)
    _, report = checkpoint.load_model_variables(wd, target, what="clip_jax.load")
    assert report["unexpected"] == [] and report["missing"] == []
    rng = np.random.default_rng(0)
    images = rng.standard_normal((3, loaded.image_size, loaded.image_size, 3)).astype(np.float32)
    ids = loaded.tokenize(["a red circle.", "a blue square.", "a green star."])
    image, text = loaded.encode_image(images, normalize=True), loaded.encode_text(ids, normalize=True)
    probabilities = 1 / (1 + np.exp(-(loaded.logit_scale * image @ text.T + loaded.logit_bias)))
    out = train.build(config).model.apply({"params": trained}, images, ids)    # the trainer's model
    want = jax.nn.sigmoid(out["logit_scale"] * out["image_embeds"] @ out["text_embeds"].T + out["logit_bias"])
    np.testing.assert_allclose(probabilities, want, rtol=1e-5, atol=1e-6)

    out = tmp_path / "export" / "model.safetensors"
    convert.main([wd, "--to", "open_clip", "--out", str(out)])
    assert pytorch_io.read_tensors(str(out))["logit_bias"] == np.float32(bias)
    oc = json.loads((tmp_path / "export" / "open_clip_config.json").read_text())
    assert oc["model_cfg"]["init_logit_bias"] == -10.0
    convert.main([str(tmp_path / "export"), "--out", str(tmp_path / "back")])
    back = config_lib.from_json(json.loads((tmp_path / "back" / "config.json").read_text()))
    assert back.loss.name == "siglip"
    target = models.abstract_variables(models.from_config(back), back.model)
    variables, report = checkpoint.load_model_variables(str(tmp_path / "back"), target)
    assert report["unexpected"] == [] and float(variables["params"]["logit_bias"]) == bias


def test_safetensors_round_trip_of_dtypes_and_scalars(tmp_path):
    tensors = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "s": np.array(2.5, np.float32),
               "h": np.ones(3, np.float16), "b": np.array([1.5, -2], ml_dtypes.bfloat16),
               "i": np.arange(4, dtype=np.int64)}
    path = str(tmp_path / "x.safetensors")
    pytorch_io.write_state_dict(tensors, path)
    back = pytorch_io.read_tensors(path)
    assert back.keys() == tensors.keys()
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape, k
        np.testing.assert_array_equal(np.asarray(back[k], np.float64), np.asarray(v, np.float64))


# ----------------------------------------------------------------------------- refusals

class _Evil:
    def __reduce__(self):
        return (os.system, ("touch EVIL_RAN",))


def test_a_pickle_that_would_run_code_is_refused_without_running_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("evil/data.pkl", pickle.dumps({"x": _Evil()}, protocol=2))
    with pytest.raises(pytorch_io.CheckpointFormatError, match=r"evil.pt: refusing to load '(posix|os)\.system'"):
        pytorch_io.read_tensors(str(path))
    assert not (tmp_path / "EVIL_RAN").exists()


def test_command_line_errors_name_the_problem(tmp_path, capsys):
    cfg = convert.converted_config(_model("vit"))
    tensors = convert.to_torch(_random_variables(cfg), cfg)

    def error(args):
        with pytest.raises(SystemExit) as e:
            convert.main(args)
        return str(e.value.code)

    missing = dict(tensors)
    del missing["transformer.resblocks.0.mlp.c_fc.bias"]
    missing["visual.extra_head.weight"] = np.zeros(3, np.float32)
    pytorch_io.write_state_dict(missing, str(tmp_path / "bad.safetensors"))
    msg = error([str(tmp_path / "bad.safetensors"), "--out", str(tmp_path / "o1")])
    assert "missing transformer.resblocks.0.mlp.c_fc.bias" in msg and "unexpected visual.extra_head.weight" in msg
    assert not (tmp_path / "o1").exists()

    pytorch_io.write_state_dict({"w": np.zeros(2, np.float32)}, str(tmp_path / "other.safetensors"))
    assert "no tensor 'ln_final.weight'" in error([str(tmp_path / "other.safetensors"), "--out", str(tmp_path / "o2")])

    pytorch_io.write_state_dict(tensors, str(tmp_path / "ok.safetensors"))
    assert "--arch RN50 is rn50" in error([str(tmp_path / "ok.safetensors"), "--arch", "RN50", "--out", str(tmp_path / "o3")])
    assert "not one of the paper's" in error([str(tmp_path / "ok.safetensors"), "--arch", "RN51", "--out", str(tmp_path / "o4")])
    (tmp_path / "o5").mkdir()
    (tmp_path / "o5" / "keep.txt").write_text("x")
    assert "already exists and is not empty" in error([str(tmp_path / "ok.safetensors"), "--out", str(tmp_path / "o5")])
    assert (tmp_path / "o5" / "keep.txt").read_text() == "x"
    assert "no such file" in error([str(tmp_path / "nope.pt"), "--out", str(tmp_path / "o6")])
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert "junk.pt" in error([str(tmp_path / "junk.pt"), "--out", str(tmp_path / "o7")])


def test_open_clip_options_the_models_lack_are_refused(tmp_path):
    cfg = convert.converted_config(_model("vit"))
    d = tmp_path / "hub"
    d.mkdir()
    pytorch_io.write_state_dict(convert.to_torch(_random_variables(cfg), cfg), str(d / "open_clip_model.safetensors"))
    oc = {"model_cfg": {"embed_dim": 32, "vision_cfg": {"width": 64, "ls_init_value": 0.1}, "text_cfg": {}}}
    (d / "open_clip_config.json").write_text(json.dumps(oc))
    with pytest.raises(convert.ConvertError, match=r"vision_cfg.ls_init_value=0.1"):
        convert.import_checkpoint(str(d), str(tmp_path / "out"))


def test_init_from_with_another_tokenizer_is_a_config_error(tmp_path):
    cfg = _model("vit", embed_dim=32)
    cfg.text.vocab_size = 49408
    variables = _random_variables(convert.converted_config(cfg))
    out = str(tmp_path / "converted")
    checkpoint.save_params(out, variables["params"], config=convert.converted_config(cfg))
    config = tiny_config(init_from=out)
    with pytest.raises(config_lib.ConfigError, match=r"config.data.tokenizer: 'sentencepiece', but .* 'clip_bpe'"):
        validation.validate(config)


def test_an_open_clip_config_that_is_not_a_json_object_is_refused_naming_the_file(tmp_path):
    """A Hugging Face directory's open_clip_config.json must be a JSON object (as must its
    model_cfg, vision_cfg and text_cfg): anything else is a one-line refusal, not a traceback."""
    d = tmp_path / "hub"
    d.mkdir()
    cfg_file = d / "open_clip_config.json"
    (d / "open_clip_model.safetensors").write_bytes(b"")   # never read: the config is refused first
    for content, expected in [
            ([{"model_cfg": {}}], "expected a JSON object, found an array"),
            ("not json", "not valid JSON"),
            ({"model_cfg": [1, 2]}, "expected model_cfg to be a JSON object, found [1, 2]"),
            ({"model_cfg": {"vision_cfg": "big"}}, "expected model_cfg.vision_cfg to be a JSON object")]:
        cfg_file.write_text(content if isinstance(content, str) else json.dumps(content))
        with pytest.raises(SystemExit) as e:
            convert.main([str(d), "--out", str(tmp_path / "out")])
        assert str(e.value).startswith(f"error: {cfg_file}: ") and expected in str(e.value), str(e.value)
    assert not (tmp_path / "out").exists()
