"""Configs: every shipped config is valid; bad keys and values stop with a message naming them."""
import glob
import os
import importlib.util

import pytest

from clip_jax import cli, config_lib, validation
from tests.helpers import REPO, run_cli

# configs/finetune.py needs an argument (converted weights): tested on its own below.
CONFIGS = sorted(p for p in glob.glob(os.path.join(REPO, "configs", "*.py"))
                 if not p.endswith("finetune.py"))


def load(path, *args):
    spec = importlib.util.spec_from_file_location("cfg", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(*args)


def test_finetune_config_takes_model_tokenizer_and_weights_from_converted_weights(tmp_path):
    from clip_jax import checkpoint, convert
    from tests.test_convert import _model, _random_variables
    cfg = _model("resnet", embed_dim=32)
    cfg.text.vocab_size = 49408
    out = str(tmp_path / "converted")
    config = convert.converted_config(cfg)
    checkpoint.save_params(out, _random_variables(config)["params"], config=config)
    path = os.path.join(REPO, "configs", "finetune.py")
    c = load(path, out)
    validation.validate(c, num_devices=8)
    assert c.init_from == out and c.data.tokenizer == "clip_bpe"
    assert c.model.vision.layers == (1, 2, 1, 1) and c.model.text.vocab_size == 49408
    assert (c.model.dtype, c.model.remat, c.optim.lr) == ("bfloat16", "full", 1e-5)
    with pytest.raises(ValueError, match="configs/finetune.py:DIR"):
        load(path)
    with pytest.raises(ValueError, match="no .*config.json"):
        load(path, str(tmp_path))


def test_every_paper_model_has_a_config():
    names = {os.path.basename(p)[:-3] for p in CONFIGS}
    assert set(config_lib.PAPER_MODELS) | {"smoke"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: os.path.basename(p))
def test_shipped_configs_validate(path):
    validation.validate(load(path), num_devices=8)


@pytest.mark.parametrize("name", sorted(config_lib.PAPER_MODELS))
def test_paper_recipe(name):
    c = load(os.path.join(REPO, "configs", f"{name}.py"))
    assert c.batch_size == 32768
    assert c.optim.weight_decay == 0.2 and c.optim.b1 == 0.9
    if name.startswith("rn"):
        assert (c.optim.b2, c.optim.eps) == (0.999, 1e-8)
    else:
        assert (c.optim.b2, c.optim.eps) == (0.98, 1e-6)
    assert c.optim.lr == config_lib.PAPER_LR[name]
    if name != "vit_l14_336":
        assert c.optim.warmup_steps == 2000


@pytest.mark.parametrize("key,value,match", [
    ("batch_size", 0, "config.batch_size"),
    ("total_steps", -1, "config.total_steps"),
    ("model.vision.kind", "mlp", "config.model.vision.kind"),
    ("model.vision.patch_size", 7, "config.model.vision.patch_size"),
    ("model.dtype", "float16", "config.model.dtype"),
    ("kernels.cpu_ops_off", "im2col,fast_pools", r"config.kernels.cpu_ops_off: unknown CPU kernel piece\(s\) \['fast_pools'\]"),
    ("kernels.gpu_ops_off", "flash", r"config.kernels.gpu_ops_off: unknown GPU kernel piece\(s\) \['flash'\]"),
    ("kernels.ops", "fast", "config.kernels.ops: must be one of"),
    ("optim.lr", 0.0, "config.optim.lr"),
    ("loss.name", "nope", "config.loss.name"),
    ("data.source", "laion", "config.data.source"),
    ("data.tokenizer_vocab_size", 100000, "config.data.tokenizer_vocab_size"),
    ("checkpoint_every", -1, "config.checkpoint_every"),
    ("max_to_keep", 0, "config.max_to_keep"),
    ("max_bad_steps", 0, "config.max_bad_steps"),
    ("init_from", "/no/such/run", "config.init_from"),
])
def test_validate_names_the_bad_key(key, value, match):
    c = load(os.path.join(REPO, "configs", "smoke.py"))
    parent = c
    *path, leaf = key.split(".")
    for p in path:
        parent = parent[p]
    parent[leaf] = value
    with pytest.raises(config_lib.ConfigError, match=match):
        validation.validate(c, num_devices=1)


def test_batch_must_divide_over_batch_shards():
    c = load(os.path.join(REPO, "configs", "smoke.py"))
    c.batch_size = 100
    with pytest.raises(config_lib.ConfigError, match="config.batch_size"):
        validation.validate(c, num_devices=8)
    c.mesh.data = 3
    with pytest.raises(config_lib.ConfigError, match="config.mesh"):
        validation.validate(c, num_devices=8)


def test_the_kernel_keys_that_left_the_model_block_say_where_they_went():
    """`model.ops` / `model.cpu_ops_off` are `kernels.ops` / `kernels.cpu_ops_off` now: an
    override or a config file that sets the old key is told so; a saved config that has it
    (every checkpoint's before) reads without it, and resuming from one reports no change."""
    import json
    c = load(os.path.join(REPO, "configs", "smoke.py"))
    with pytest.raises(config_lib.ConfigError, match=r"config key 'model.ops' in '--config.model.ops=xla' "
                                                     r"moved to 'kernels.ops': use --config.kernels.ops=xla"):
        cli.check_override_keys(c, ["--config.model.ops=xla"])
    with pytest.raises(config_lib.ConfigError, match="'model.cpu_ops_off'.*moved to 'kernels.cpu_ops_off'"):
        cli.check_override_keys(c, ["--config.model.cpu_ops_off=im2col"])
    old = json.loads(c.to_json_best_effort())
    old["model"].update(ops="cpu", cpu_ops_off="im2col")
    del old["kernels"]
    read = config_lib.from_json(old)
    assert "ops" not in read.model and "cpu_ops_off" not in read.model
    assert read.kernels.to_dict() == {"ops": "auto", "cpu_ops_off": "", "gpu_ops_off": ""}
    validation.validate(read, num_devices=1)
    assert config_lib.describe_changes(old, c) == []
    c.model.ops = "xla"                              # a config file written for the old layout
    with pytest.raises(config_lib.ConfigError, match=r"config.model.ops: moved to config.kernels.ops"):
        validation.validate(c, num_devices=1)


@pytest.mark.parametrize("arg,match", [
    ("--config.batchsize=64", "unknown config key 'batchsize'"),
    ("--config.batch_size=abc", "config.batch_size"),
    ("--config.batch_size=0", "config.batch_size"),
    ("--config.data.source=laion", "config.data.source"),
])
def test_cli_stops_before_any_work_on_a_bad_config(tmp_path, arg, match):
    proc = run_cli(["clip_jax.train", "--config=configs/smoke.py", f"--workdir={tmp_path}", arg],
                   check=False, timeout=120)
    assert proc.returncode != 0
    assert match in proc.stderr + proc.stdout
    assert not os.path.exists(tmp_path / "metrics.jsonl")


def test_describe_changes_lists_only_keys_that_change_the_computation():
    import json
    saved = load(os.path.join(REPO, "configs", "smoke.py"))
    now = load(os.path.join(REPO, "configs", "smoke.py"))
    now.total_steps, now.optim.lr = 5, 0.5                  # change the run
    now.log_every, now.mesh.data, now.data.workers = 7, 2, 3  # do not
    changes = config_lib.describe_changes(json.loads(saved.to_json_best_effort()), now)
    assert changes == ["optim.lr: 0.001 -> 0.5", "total_steps: 1000 -> 5"]
    assert config_lib.describe_changes(None, now) == []


def test_a_workdir_with_checkpoints_resumes_only_with_its_own_tokenizer(tmp_path):
    """The paper configs read CLIP's BPE now; a run started with SentencePiece keeps it: its
    checkpoints refuse another tokenizer, naming the flag that resumes them."""
    import json
    c = load(os.path.join(REPO, "configs", "vit_b32.py"))
    assert c.data.tokenizer == "clip_bpe"
    (tmp_path / "config.json").write_text(json.dumps({"data": {"tokenizer": "sentencepiece"}}))
    validation.check_workdir_tokenizer(c, str(tmp_path))          # no checkpoints: a new run
    (tmp_path / "checkpoints" / "1000").mkdir(parents=True)
    with pytest.raises(config_lib.ConfigError, match=r"config.data.tokenizer: 'clip_bpe', but the checkpoints "
                                                     r".* were trained with 'sentencepiece': resume with "
                                                     r"--config.data.tokenizer=sentencepiece"):
        validation.check_workdir_tokenizer(c, str(tmp_path))
    c.data.tokenizer = "sentencepiece"
    validation.check_workdir_tokenizer(c, str(tmp_path))
