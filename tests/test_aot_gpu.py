"""clip_jax.aot and clip_jax.pod for NVIDIA GPU hosts: the real train step compiled for a
2-GPU H100 host on this CPU machine, with no GPU (XLA's deviceless compilation).

The compile tests need jax's CUDA plugin (`pip install -e '.[gpu]'`; `.ci/run` installs it
when the disk allows) and are skipped without it. They run on one xdist worker: each
compile takes both cores.
"""
import importlib.util
import json
import os
import re

import pytest

from clip_jax import cost, pod
from tests.helpers import run_cli, tiny_flags

needs_cuda = pytest.mark.skipif(not pod.cuda_plugin_installed(),
                                reason="jax's CUDA plugin not installed (pip install -e '.[gpu]')")
gpu_worker = pytest.mark.xdist_group("gpu_aot")
CUDNN_FORWARD, CUDNN_BACKWARD = "__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward"


@pytest.mark.parametrize("topology, message", [
    ("h100:8", "GPU:HOSTSxGPUS_PER_HOST"), ("h100:0x8", "GPU:HOSTSxGPUS_PER_HOST"),
    ("h100:2x2x8", "GPU:HOSTSxGPUS_PER_HOST"), ("v100:1x8", r"\['a100', 'b200', 'h100', 'h200'\]"),
    ("h100", "GENERATION:SHAPE")])
def test_bad_gpu_topology_is_refused_with_its_name(topology, message):
    with pytest.raises(ValueError, match=message):
        pod.topology_devices(topology)


@pytest.mark.parametrize("absent", ["plugin", "jax_plugins"])
def test_without_the_cuda_plugin_the_error_names_the_extra(monkeypatch, absent):
    """Without the plugin, or (a venv with no JAX plugin at all, README's `.[test]` install)
    without its parent package, whose absence makes `find_spec` raise."""
    real = importlib.util.find_spec

    def find_spec(name, *a):
        if not name.startswith("jax_plugins.xla_cuda"):
            return real(name, *a)
        if absent == "plugin":
            return None
        raise ModuleNotFoundError("No module named 'jax_plugins'", name="jax_plugins")
    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(ValueError, match=r"h100:1x8: compiling for NVIDIA GPUs needs jax's CUDA "
                                         r"plugin, which is not installed: pip install -e '\.\[gpu\]'"):
        pod.topology_devices("h100:1x8")


def test_shipped_gpu_descriptions_give_each_gpu_its_memory():
    """The HBM of each GPU comes from its target description (XLA's device_memory_size)."""
    gib = {name: pod.gpu_chip(name).hbm_gib for name in pod.GPUS}
    assert 79 < gib["h100"] < 80 and 140 < gib["h200"] < 142 and 79 < gib["a100"] < 80
    assert 178 < gib["b200"] < 179
    assert all(pod.gpu_chip(name).memory_fraction == pod.GPU_MEMORY_FRACTION for name in pod.GPUS)


def _aot(tmp_path, config, *flags, topology="h100:1x2"):
    proc = run_cli(["clip_jax.aot", f"--config={config}", f"--topology={topology}", "--json",
                    f"--hlo_dir={tmp_path}", *flags], timeout=900)
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    (hlo,) = [os.path.join(tmp_path, f) for f in os.listdir(tmp_path)]
    with open(hlo) as f:
        return report, f.read(), proc.stdout


@needs_cuda
@gpu_worker
@pytest.mark.parametrize("variant", ["vit", "resnet"])
def test_aot_compiles_the_train_step_for_a_2_gpu_h100_host(tmp_path, variant):
    """The CLI compiles the trainer's own bfloat16 step for one host of 2 H100s from this CPU
    host: it fits, the loss gathers the B x D embeddings (never a B x B block), the gradients
    are summed across the data axis in float32, and the attention is cuDNN's (both towers'
    blocks, ViT or ResNet attention pool, forward and backward)."""
    config = "configs/smoke.py" + (":resnet" if variant == "resnet" else "")
    flags = tiny_flags(batch_size=64) + ["--config.model.dtype=bfloat16"]
    if variant == "resnet":         # the smoke ResNet itself (tiny already), the tiny text tower
        flags = [f for f in flags if not f.startswith("--config.model.vision.")]
    r, hlo, stdout = _aot(tmp_path, config, *flags)
    assert r["topology_chips"] == 2 and r["device_kind"] == "NVIDIA H100 80GB HBM3"
    assert r["mesh"] == {"data": 2, "fsdp": 1, "model": 1} and r["local_batch"] == 32
    assert r["hbm_bytes"] == 84942979072 and r["budget_bytes"] == int(0.9 * r["hbm_bytes"])
    assert r["fits"] and 0 < r["memory_per_chip_bytes"] < r["budget_bytes"]
    assert r["flops"] > 0 and r["model_flops"] > 0
    coll = r["collective_bytes"]
    assert set(coll) == set(cost.COLLECTIVES)
    assert coll["all-gather"] >= 2 * 64 * 32 * 2 and coll["all-reduce"] > 0
    assert r["global_square_blocks"] == []
    reduced = re.findall(r"= (\w+)\[[^\n]*? (?:all-reduce|reduce-scatter)(?:-start)?\(", hlo)
    assert reduced and "bf16" not in reduced
    assert CUDNN_FORWARD in hlo and CUDNN_BACKWARD in hlo
    assert "fits" in stdout and "90% usable" in stdout


@needs_cuda
@gpu_worker
def test_the_real_vit_b16_and_text_tower_compile_with_cudnn_attention_and_xla_when_asked(tmp_path):
    """ViT-B/16 as the paper (bfloat16, 197 image tokens, 77 text tokens, head dimension 64)
    on one H100 (the attention does not depend on the mesh): each tower's blocks run cuDNN's flash attention forward and backward; with
    `kernels.ops=xla` none does (what each needs in memory: benchmarks/RESULTS.md)."""
    small = ["--config.batch_size=16"]
    ours, hlo, _ = _aot(tmp_path / "gpu", "configs/vit_b16.py", *small, topology="h100:1x1")
    calls = re.findall(r'custom_call_target="(__cudnn\$fmha\w+)".*?op_name="([^"]*)"', hlo)
    towers = {tower for target, name in calls for tower in ("visual", "text")
              if target == CUDNN_BACKWARD and f"/{tower}/" in name}
    assert towers == {"visual", "text"}, sorted(set(calls))[:6]
    plain, plain_hlo, _ = _aot(tmp_path / "xla", "configs/vit_b16.py", *small, "--config.kernels.ops=xla",
                               topology="h100:1x1")
    assert "__cudnn$fmha" not in plain_hlo and ours["fits"] and plain["fits"]
