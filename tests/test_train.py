"""The `clip_jax.train` command end to end, on 1 and 8 fake devices."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.helpers import REPO, device_env, export_synthetic_csv, read_jsonl, run_cli

SHORT = ["--config.total_steps=3", "--config.log_every=1", "--config.progress=false",
         "--config.data.synthetic.num_eval=64"]


def train(workdir, n_devices, *extra, config="configs/smoke.py"):
    proc = run_cli(["clip_jax.train", f"--config={config}", f"--workdir={workdir}", *extra],
                   n_devices=n_devices)
    return proc, read_jsonl(os.path.join(workdir, "metrics.jsonl"))


@pytest.fixture(scope="module")
def one_device_run(tmp_path_factory):
    wd = tmp_path_factory.mktemp("run1")
    proc, rec = train(wd, 1, *SHORT)
    return wd, proc, rec


@pytest.mark.xdist_group("smoke_one_device")   # shares the module-scoped run
def test_cli_writes_metrics_tensorboard_and_plot(one_device_run):
    wd, proc, rec = one_device_run
    assert [r["step"] for r in rec] == [1, 2, 3]
    for key in ("loss", "lr", "temperature", "logit_scale", "samples_per_sec"):
        assert all(np.isfinite(r[key]) for r in rec if key in r), key
    assert all("samples_per_sec" in r for r in rec[1:])
    assert "zeroshot/top1" in rec[-1] and "zeroshot/shape/top1" in rec[-1]
    np.testing.assert_allclose(rec[0]["temperature"], 0.07, rtol=1e-4)   # paper init
    assert rec[0]["lr"] == 0.0 and rec[1]["lr"] > 0                         # warm-up from 0
    assert os.listdir(wd / "tensorboard")
    assert (wd / "metrics.png").stat().st_size > 1000
    assert json.loads((wd / "config.json").read_text())["batch_size"] == 128


@pytest.mark.xdist_group("smoke_one_device")   # shares the module-scoped run
@pytest.mark.slow
@pytest.mark.parametrize("mesh_args", [["--config.mesh.data=4", "--config.mesh.fsdp=2"]],
                         ids=["data4_fsdp2"])   # (plain data parallelism: the 4-device runs below)
def test_losses_on_8_devices_equal_1_device(one_device_run, tmp_path, mesh_args):
    _, _, rec1 = one_device_run
    _, rec8 = train(tmp_path, 8, *SHORT, *mesh_args)
    np.testing.assert_allclose([r["loss"] for r in rec8], [r["loss"] for r in rec1], rtol=1e-4)


RESNET_ARGS = ["--config.batch_size=32", *SHORT]


@pytest.fixture(scope="module")
def resnet_one_device(tmp_path_factory):
    _, rec = train(tmp_path_factory.mktemp("rn1"), 1, *RESNET_ARGS, config="configs/smoke.py:resnet")
    return rec


@pytest.mark.xdist_group("resnet_one_device")   # shares the module-scoped run
@pytest.mark.slow
def test_resnet_losses_on_4_devices_equal_1_device(resnet_one_device, tmp_path):
    """BatchNorm statistics are global-batch statistics, so a ResNet is device-count independent too."""
    _, rec4 = train(tmp_path, 4, *RESNET_ARGS, config="configs/smoke.py:resnet")
    assert len(rec4) == 3
    np.testing.assert_allclose([r["loss"] for r in rec4], [r["loss"] for r in resnet_one_device], rtol=1e-4)


@pytest.mark.xdist_group("smoke_one_device")   # shares the module-scoped run
def test_same_seed_same_losses_other_seed_differs(one_device_run, tmp_path):
    _, _, rec1 = one_device_run
    _, rec_again = train(tmp_path / "a", 1, *SHORT)
    assert [r["loss"] for r in rec_again] == [r["loss"] for r in rec1]
    _, rec_seed = train(tmp_path / "b", 1, *SHORT, "--config.seed=1")
    assert [r["loss"] for r in rec_seed] != [r["loss"] for r in rec1]


@pytest.mark.slow
def test_smoke_config_learns(tmp_path):
    """The acceptance run: smoke with no overrides; loss at least halves, held-out zero-shot >= 0.9."""
    proc, rec = train(tmp_path, 1, "--config.progress=false")
    losses = [r["loss"] for r in rec]
    assert losses[-1] <= 0.5 * losses[0], losses
    assert rec[-1]["zeroshot/top1"] >= 0.9, rec[-1]
    assert rec[-1]["step"] == 1000
    # The evaluation command line on the saved model gives the accuracy logged in training.
    for attr in ("shape", "color"):
        out = run_cli(["clip_jax.evaluate", "zeroshot", f"--workdir={tmp_path}",
                       f"--data=synthetic:{attr}", "--json", "--no-progress"])
        assert json.loads(out.stdout.strip().splitlines()[-1])["top1"] == rec[-1][f"zeroshot/{attr}/top1"]


@pytest.mark.xdist_group("resnet_one_device")   # shares the module-scoped run
@pytest.mark.slow
def test_paper_code_path_bf16_remat_resnet_trains(resnet_one_device, tmp_path):
    """The paper configs' settings (bfloat16 compute, remat, ResNet + BatchNorm) through the real step."""
    _, bf16 = train(tmp_path, 1, *RESNET_ARGS, "--config.model.dtype=bfloat16",
                    "--config.model.remat=true", config="configs/smoke.py:resnet")
    assert all(np.isfinite(r["loss"]) and np.isfinite(r["grad_norm"]) for r in bf16)
    # bf16 compute changes rounding, not the function: same losses to bf16 precision.
    np.testing.assert_allclose([r["loss"] for r in bf16], [r["loss"] for r in resnet_one_device], rtol=3e-2)


@pytest.mark.slow
def test_trains_from_an_ingested_csv_corpus(tmp_path):
    """The data issue's acceptance run, shortened: CSV of image files -> ingest -> smoke training."""
    csv_path = export_synthetic_csv(tmp_path / "corpus", 2000, image_size=48)
    run_cli(["clip_jax.ingest", "csv", csv_path, "--out", str(tmp_path / "ingested"),
             "--workers", "2", "--no-progress"])
    wd = tmp_path / "run"
    proc, rec = train(wd, 1, f"--config.data.source={tmp_path / 'ingested'}",
                      "--config.total_steps=200", "--config.log_every=25", "--config.progress=false")
    losses = [r["loss"] for r in rec]
    assert [r["step"] for r in rec][-1] == 200
    assert losses[-1] < 0.6 * losses[0], losses                   # it learns from the ingested data
    assert all(r["data/replaced_records"] == 0 for r in rec)
    assert "zeroshot/top1" not in rec[-1]                         # the synthetic eval needs synthetic data
    assert (wd / "tokenizer" / "spm.model").exists()              # trained on the ingested captions


@pytest.mark.xdist_group("smoke_one_device")   # shares the module-scoped run
@pytest.mark.slow
def test_blockwise_loss_and_micro_batches_log_the_plain_losses_on_4_devices(one_device_run, tmp_path):
    """The losses issue's acceptance run: the same 3 smoke steps with `clip_blockwise` (4
    column blocks) and with 4 micro-batches (gradient cache) on 4 fake devices log the plain
    `clip` losses (the 1-device run; plain `clip` on 8 devices equals it, tested above)."""
    _, _, plain = one_device_run
    _, blockwise = train(tmp_path / "blockwise", 4, *SHORT, "--config.loss.name=clip_blockwise",
                         "--config.loss.block_size=32")
    _, micro = train(tmp_path / "micro", 4, *SHORT, "--config.micro_batches=4")
    for rec in (blockwise, micro):
        np.testing.assert_allclose([r["loss"] for r in rec], [r["loss"] for r in plain], rtol=1e-4)


@pytest.mark.slow
def test_smoke_with_siglip_learns(tmp_path):
    _, rec = train(tmp_path, 1, "--config.loss.name=siglip", "--config.total_steps=80",
                   "--config.log_every=1", "--config.progress=false", "--config.data.synthetic.num_eval=64")
    assert rec[0]["loss"] > 9     # SigLIP's initial bias -10: every positive pair costs ~10
    assert rec[-1]["loss"] <= 0.5 * rec[0]["loss"], [r["loss"] for r in rec[::10]]


def env_without_compile_cache():
    """One fake device, without the suite's compile cache directory (conftest), which a run
    keeps instead of its own."""
    return {k: v for k, v in device_env(1).items() if not k.startswith("JAX_COMPILATION_CACHE")}


CACHE_COUNTS = """
import json, sys
import jax
from clip_jax import train
from tests.helpers import tiny_config
events = []
jax.monitoring.register_event_listener(lambda name, **kw: events.append(name))
config = tiny_config(total_steps=int(sys.argv[2]), checkpoint_every=1)
train.train(config, sys.argv[1])
print(json.dumps({"dir": jax.config.jax_compilation_cache_dir,
                  "hits": events.count("/jax/compilation_cache/cache_hits")}))
"""


def test_a_restarted_run_reads_its_compiled_step_from_the_workdirs_cache(tmp_path):
    """JAX's persistent compilation cache, on by default in WORKDIR/compile_cache: the first
    invocation writes the compiled programs there; the second (resuming) reads them back. Run
    without the suite's own cache directory (JAX_COMPILATION_CACHE_DIR, which a run keeps)."""
    env = env_without_compile_cache()
    wd = tmp_path / "run"

    def invocation(steps):
        proc = subprocess.run([sys.executable, "-c", CACHE_COUNTS, str(wd), str(steps)], cwd=REPO,
                              env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert f"compile cache: {wd}/compile_cache" in proc.stdout
        return json.loads(proc.stdout.strip().splitlines()[-1])

    first = invocation(2)
    assert first == {"dir": str(wd / "compile_cache"), "hits": 0}
    assert len(os.listdir(wd / "compile_cache")) >= 1
    second = invocation(4)                     # resumes at step 2
    assert second["hits"] >= 1


def test_the_compile_cache_setting_is_applied_once_per_process(tmp_path):
    """'' is off; 'workdir' is WORKDIR/compile_cache (evaluate: the --workdir's; none for a
    --checkpoint alone); a directory JAX has already is kept (JAX opens its cache once)."""
    code = f"""
import json
from clip_jax import compile_cache
out = [compile_cache.use("", "{tmp_path}/a"), compile_cache.use("workdir", None),
       compile_cache.use("workdir", "{tmp_path}/a"), compile_cache.use("{tmp_path}/b", "{tmp_path}/a")]
print(json.dumps(out))
"""
    env = env_without_compile_cache()
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    kept = f"{tmp_path}/a/compile_cache"
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == [None, None, kept, kept]
