"""clip_jax.aot and clip_jax.pod: the real train step compiled for a TPU topology on this CPU host.

The compile tests need libtpu (`pip install -e '.[tpu]'`, which CI installs) and are skipped
without it. They run on one xdist worker (long compiles; and libtpu's host-wide lock, which
clip_jax.aot steps around, is tested once, held by another process on purpose).
"""
import contextlib
import importlib.util
import json
import subprocess
import sys

import pytest

from clip_jax import cost, pod
from tests.helpers import REPO, device_env, run_cli, run_python, tiny_config, tiny_flags

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu not installed (pip install -e '.[tpu]')")
libtpu_worker = pytest.mark.xdist_group("libtpu")

@pytest.mark.parametrize("topology, message", [("v9:2x2", "GENERATION"), ("v5e", "GENERATION")])
def test_bad_topology_is_refused_with_its_name(topology, message):
    with pytest.raises(ValueError, match=message):
        pod.topology_devices(topology)


def test_step_flops_count_every_micro_batch():
    """XLA counts a loop's body once: the step's FLOPs are counted in one batch, so the model's
    FLOPs (MFU's numerator) do not depend on the micro-batches, and the executed ones add the
    gradient cache's pass without gradients (a forward, a third of the model's step)."""
    one, four = tiny_config(batch_size=32), tiny_config(batch_size=32, micro_batches=4)
    model = cost.step_flops(one, model_flops=True)
    assert model > 0 and cost.step_flops(four, model_flops=True) == model
    assert cost.step_flops(four) == pytest.approx(cost.step_flops(one) + model / 3, rel=1e-9)


@contextlib.contextmanager
def libtpu_lock_held():
    """Another process holding libtpu's host-wide lock (/tmp/libtpu_lockfile) while the block
    runs, as a second compile, a CI worker or a training on a TPU VM would."""
    code = ("import os, sys; os.environ.update(TPU_ACCELERATOR_TYPE='v5litepod-16', "
            "TPU_WORKER_HOSTNAMES='localhost'); from clip_jax import pod; "
            "pod.topology_devices('v5e:2x2'); print('held', flush=True); sys.stdin.read()")
    env = {k: v for k, v in device_env(1).items() if k != "ALLOW_MULTIPLE_LIBTPU_LOAD"}
    holder = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == "held"
        yield
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)


@needs_libtpu
@libtpu_worker
@pytest.mark.parametrize("variant", ["vit", "resnet"])
def test_aot_compiles_the_train_step_for_a_tpu_topology(variant):
    """The CLI compiles the trainer's own step for 4 v5e chips from this CPU host: it fits,
    the loss gathers the B x D embeddings (never a B x B block), and the gradients are
    summed across the data axis. It does so while another process holds libtpu's lock (a
    CI run once failed on "Internal error when accessing libtpu multi-process lockfile")."""
    config = "configs/smoke.py" + (":resnet" if variant == "resnet" else "")
    flags = tiny_flags(batch_size=64)
    if variant == "resnet":         # the smoke ResNet itself (tiny already), the tiny text tower
        flags = [f for f in flags if not f.startswith("--config.model.vision.")]
    with libtpu_lock_held():
        proc = run_cli(["clip_jax.aot", f"--config={config}", "--topology=v5e:2x2", "--json",
                        *flags], timeout=600)
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["topology_chips"] == 4 and r["device_kind"] == "TPU v5 lite"
    assert r["mesh"] == {"data": 4, "fsdp": 1, "model": 1} and r["local_batch"] == 16
    assert r["fits"] and 0 < r["memory_per_chip_bytes"] < r["hbm_bytes"] == 16 * 2 ** 30
    assert r["flops"] > 0 and r["model_flops"] > 0
    coll = r["collective_bytes"]
    assert set(coll) == set(cost.COLLECTIVES)
    # The two towers' embeddings gathered (in bf16 or float32): at least B x D x 2 bytes each.
    assert coll["all-gather"] >= 2 * 64 * 32 * 2
    assert coll["all-reduce"] > 0 and r["global_square_blocks"] == []
    assert "fits" in proc.stdout and "collectives per chip" in proc.stdout


SLICE_MESH = """
import json, os
os.environ.update(TPU_ACCELERATOR_TYPE="v5litepod-16", TPU_WORKER_HOSTNAMES="localhost",
                  ALLOW_MULTIPLE_LIBTPU_LOAD="1")
from clip_jax import pod, sharding
devices, _ = pod.topology_devices("v5e:2x2", slices=2)
mesh = sharding.make_mesh({"data": -1, "fsdp": 2, "model": 1, "slices": -1}, devices)
print(json.dumps(dict(mesh.shape) | {"slices": [[d.slice_index for d in row]
                                              for row in mesh.devices[:, :, 0]]}))
"""


@needs_libtpu
@libtpu_worker
def test_aot_compiles_two_slices_and_only_the_gradients_and_the_loss_cross_between_them():
    """--slices=2: two v5e-4 slices joined by DCN, the data axis across them (slice-major),
    FSDP within each. Between the slices travel the loss's rows (gathered, their gradients
    reduce-scattered), exactly what the local batch implies, and the gradients' reduction,
    whose bytes do not change with the batch; no parameter is gathered across them (the FSDP
    gathers stay within a slice)."""
    mesh = run_python(SLICE_MESH)
    assert mesh == {"data": 4, "fsdp": 2, "model": 1, "slices": [[0, 0], [0, 0], [1, 1], [1, 1]]}
    reports = {}
    for batch in (64, 128):
        proc = run_cli(["clip_jax.aot", "--config=configs/smoke.py", "--topology=v5e:2x2",
                        "--slices=2", "--json", *tiny_flags(batch_size=batch),
                        "--config.mesh.fsdp=2"], timeout=600)
        reports[batch] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "between the slices (DCN)" in proc.stdout and "x 2 slices" in proc.stdout
    for batch, r in reports.items():
        assert r["topology_chips"] == 8 and r["slices"] == 2 and r["fits"]
        assert r["mesh"] == {"data": 4, "fsdp": 2, "model": 1}
        dcn, least = r["dcn_collective_bytes"], r["minimum_dcn_bytes"]
        rows = 2 * 2 * (batch // 8) * 32 * 4     # two towers, two slices' local rows, float32
        assert dcn["all-gather"] == least["all-gather"] == rows
        assert dcn["reduce-scatter"] >= least["reduce-scatter"] == rows   # (lanes padded)
        assert dcn["all-reduce"] >= least["all-reduce"] > 0
        assert dcn["collective-permute"] == dcn["all-to-all"] == 0
        assert r["collective_bytes"]["all-gather"] > rows      # the parameters', within a slice
    small, large = (reports[b]["dcn_collective_bytes"] for b in (64, 128))
    assert small["all-reduce"] == large["all-reduce"]
    assert large["reduce-scatter"] == 2 * small["reduce-scatter"]


@needs_libtpu
@libtpu_worker
def test_aot_finds_the_largest_batch_that_fits_a_given_hbm():
    # The tiny step's limit under 0.02 GiB lies near 2,000: starting from 1,024 the search
    # doubles once, then the memory guess closes the bracket (4 compiles; 10 from 64).
    proc = run_cli(["clip_jax.aot", "--config=configs/smoke.py", "--topology=v5e:2x2",
                    "--find-max-batch", "--hbm_gib=0.02", "--json",
                    *tiny_flags(batch_size=1024)], timeout=900)
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    largest = r["largest_global_batch"]
    tried = {t["batch_size"]: t["fits"] for t in r["tried"]}
    assert largest > 0 and tried[largest] and largest % 4 == 0
    assert any(b > largest and not ok for b, ok in tried.items())     # bracketed from above
    assert min(tried) == 1024 and len(tried) < 8
    assert r["fits"] and r["memory_per_chip_bytes"] <= 0.02 * 2 ** 30


@needs_libtpu
@libtpu_worker
def test_aot_plans_a_batch_that_does_not_fit_as_configured():
    """--plan on a batch too large for 0.02 GiB as configured (clip, no remat, one batch): the
    plan fits with the least recomputation among those tried (nothing with less fits, nor
    the same settings with half the micro-batches), and the printed overrides compile to
    `fits` without --plan."""
    flags = [f for f in tiny_flags(batch_size=4096) if not f.startswith("--config.batch_size")]
    args = ["clip_jax.aot", "--config=configs/smoke.py", "--topology=v5e:2x2", "--hbm_gib=0.02",
            "--config.batch_size=4096", "--json", *flags]
    proc = run_cli([*args, "--plan"], timeout=900)
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["fits"] and r["loss"] in ("clip", "clip_blockwise", "clip_ring")
    tried = r["tried"]
    assert not any(t["fits"] for t in tried if t["recomputation"] < r["recomputation"])
    as_configured = json.loads(run_cli(args, timeout=600).stdout.strip().splitlines()[-1])
    assert not as_configured["fits"]
    half = [t for t in tried if (t["loss"], t["remat"], t["micro_batches"]) ==
            (r["loss"], r["remat"], r["micro_batches"] // 2)]
    assert all(not t["fits"] for t in half)
    assert "plan: " + r["overrides"] in proc.stdout
    again = run_cli([*args, *r["overrides"].split()], timeout=600)
    assert json.loads(again.stdout.strip().splitlines()[-1])["fits"]


def test_the_planner_may_choose_the_micro_batches_the_frontier_search_compiled():
    """`--find-max-batch --plan` finds sizes in steps of 32 rows per shard and then plans
    there: the K it compiled at (local / 32) must be one the planner may choose, even when it
    is no power of 2 (it had only powers of 2, and found no plan at ViT-L/14's frontier)."""
    for local in (480, 386_880, 1024):
        ks = pod.micro_batch_candidates(local)
        assert local // pod.FRONTIER_MICRO_ROWS in ks and ks == sorted(ks)
        assert all(local % k == 0 and 1 < k <= local for k in ks)
    assert pod.micro_batch_candidates(1024) == [2 ** i for i in range(1, 11)]


def test_fsdp_meshes_move_the_data_axis_to_fsdp_keeping_the_batch_shards():
    assert pod.fsdp_meshes({"data": -1, "fsdp": 1, "model": 2}, 16) == [
        {"data": 8, "fsdp": 1, "model": 2}, {"data": 4, "fsdp": 2, "model": 2},
        {"data": 2, "fsdp": 4, "model": 2}, {"data": 1, "fsdp": 8, "model": 2}]
    assert pod.fsdp_meshes({"data": 3, "fsdp": -1, "model": 1}, 12) == [
        {"data": 3, "fsdp": 4, "model": 1}]
    # On 2 slices of 8: the config's (one slice's) meshes, FSDP within a slice; the overrides
    # for a planned mesh name one slice's data axis.
    assert pod.fsdp_meshes({"data": -1, "fsdp": 1, "model": 1}, 16, slices=2) == [
        {"data": 8, "fsdp": 1, "model": 1}, {"data": 4, "fsdp": 2, "model": 1},
        {"data": 2, "fsdp": 4, "model": 1}, {"data": 1, "fsdp": 8, "model": 1}]
    report = dict(loss="clip", remat="none", micro_batches=1, topology_chips=16, slices=2,
                  mesh={"data": 4, "fsdp": 4, "model": 1})
    assert pod.plan_overrides(report, tiny_config()).endswith(
        " --config.mesh.data=2 --config.mesh.fsdp=4 --config.mesh.model=1")
    assert "--config.mesh" not in pod.plan_overrides(
        {**report, "mesh": {"data": 16, "fsdp": 1, "model": 1}}, tiny_config())


PLANNER_SEARCH = """
import json, math, jax
from clip_jax import pod, train
from tests.helpers import tiny_config

# Each chip's memory, in MB: its share of a state of STATE MB, and temporaries of TEMP MB
# (half with remat) that shrink with the micro-batches K. Budget 120 MB. With 100 and 100: on
# the data-parallel mesh nothing fits without recomputation (K=1: 200; remat: 150) and 8
# micro-batches fit (112.5); with all 8 devices on fsdp, one batch without remat fits
# (12.5 + 100).
MB, STATE, TEMP = 2 ** 20, {STATE}, {TEMP}
fsdp = lambda config: config.mesh.fsdp if config.mesh.fsdp > 0 else 8
train.build = lambda config, devices: config
pod.state_bytes_per_chip = lambda config: STATE * MB / fsdp(config)
pod.resident_bytes_per_chip = pod.state_bytes_per_chip
pod.add_flops = lambda report, config, chip: None

def analyse(config, devices, chip, count_flops=True):
    k = config.micro_batches
    temp = (TEMP / 2 if config.model.remat == "full" else TEMP) / k * MB
    memory = STATE * MB / fsdp(config) + temp
    return dict(mesh=dict(data=8 // fsdp(config), fsdp=fsdp(config), model=1), loss=config.loss.name,
                remat=config.model.remat, micro_batches=k, memory_per_chip_bytes=memory,
                memory_bytes=dict(temp=temp), fits=memory <= 120 * MB, topology_chips=8)
pod.analyse = analyse
chosen, tried = pod.plan(tiny_config(batch_size=256, loss__name="clip"), jax.devices(),
                         pod.Chip(hbm_gib=120 / 1024, peak_tflops=1))
print(json.dumps(dict(chosen=chosen, tried=tried,
                      overrides=pod.plan_overrides(chosen, tiny_config()) if chosen else None)))
"""


def test_the_planner_walks_to_fsdp_meshes_only_for_less_recomputation():
    """The search on a model of memory (state / fsdp + temporaries / K; no compiles): the
    data-parallel mesh needs 8 micro-batches; each FSDP mesh is tried only without
    recomputation, and all-FSDP is chosen, its mesh among the overrides. With a state of
    10 MB (temporaries 118 MB: remat fits), 2-way FSDP holds 5 MB, under 1/16 of the budget:
    the walk stops there, the data-parallel plan with remat kept. With temporaries no FSDP
    mesh can hold, no FSDP mesh is compiled."""
    r = run_python(PLANNER_SEARCH.replace("{STATE}", "100").replace("{TEMP}", "100"), n_devices=8)
    chosen, tried = r["chosen"], r["tried"]
    assert chosen["mesh"] == {"data": 1, "fsdp": 8, "model": 1}
    assert (chosen["remat"], chosen["micro_batches"], chosen["recomputation"]) == ("none", 1, 0)
    first = [t for t in tried if t["mesh"]["fsdp"] == 1]
    assert any(t["fits"] and t["micro_batches"] == 8 and t["remat"] == "none" for t in first)
    assert all(t["recomputation"] == 0 for t in tried if t["mesh"]["fsdp"] > 1)
    assert list(dict.fromkeys(t["mesh"]["fsdp"] for t in tried)) == [1, 2, 4, 8]
    assert chosen["loss"] == "clip"             # the config's own, fitting where the leanest does
    assert r["overrides"].endswith(" --config.mesh.data=1 --config.mesh.fsdp=8 --config.mesh.model=1")
    small = run_python(PLANNER_SEARCH.replace("{STATE}", "10").replace("{TEMP}", "118"), n_devices=8)
    assert small["chosen"]["mesh"]["fsdp"] == 1 and small["chosen"]["remat"] == "full"
    assert {t["mesh"]["fsdp"] for t in small["tried"]} == {1, 2}
    assert "--config.mesh" not in small["overrides"]
    # Temporaries of 300 MB: 16 micro-batches on the data-parallel mesh; one batch there is
    # 400 MB, and 400 less twice the state any FSDP mesh frees is over 120.
    big = run_python(PLANNER_SEARCH.replace("{STATE}", "100").replace("{TEMP}", "300"), n_devices=8)
    assert big["chosen"]["micro_batches"] == 16 and big["chosen"]["remat"] == "none"
    assert {t["mesh"]["fsdp"] for t in big["tried"]} == {1}


@needs_libtpu
@libtpu_worker
def test_aot_plan_shards_a_state_too_large_to_replicate():
    """On 4 v5e chips with 0.125 GiB each, a model whose state (~147 MB) does not fit
    replicated: the data-parallel mesh is refused without a compile and the plan trains on
    2-way FSDP (~116 MB), with no recomputation; its overrides compile to
    `fits` without --plan."""
    wide = {"model.vision.width": 512, "model.text.width": 512, "model.vision.heads": 8,
            "model.text.heads": 8, "model.vision.layers": 2, "model.text.layers": 2}
    args = ["clip_jax.aot", "--config=configs/smoke.py", "--topology=v5e:2x2", "--hbm_gib=0.125",
            "--json", *tiny_flags(batch_size=16, **wide)]
    proc = run_cli([*args, "--plan"], timeout=600)
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["fits"] and r["mesh"] == {"data": 2, "fsdp": 2, "model": 1}
    assert r["recomputation"] == 0 and all(t["mesh"] == r["mesh"] for t in r["tried"])
    assert "--config.mesh.data=2 --config.mesh.fsdp=2" in r["overrides"]
    again = json.loads(run_cli([*args, *r["overrides"].split()], timeout=600).stdout.strip()
                       .splitlines()[-1])
    assert again["fits"] and again["mesh"] == r["mesh"]


@needs_libtpu
@libtpu_worker
def test_aot_plan_compiles_nothing_when_the_resident_batch_and_state_exceed_the_chip():
    """What a chip holds for the whole step (its state and its share of the batch) does not
    shrink with micro-batches: over the budget on every mesh (a chip's 2,048 pixel rows alone
    are 1.5 MiB of the 1 MiB), --plan says so without compiling."""
    proc = run_cli(["clip_jax.aot", "--config=configs/smoke.py", "--topology=v5e:2x2",
                    "--hbm_gib=0.001", "--plan", "--json", *tiny_flags(batch_size=8192)], timeout=600)
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["plan"] is None and r["tried"] == []
    assert r["resident_bytes_per_chip"] > 0.001 * 2 ** 30
    assert "no plan fits global batch 8,192" in proc.stdout and "GiB budget" in proc.stdout


@needs_libtpu
@libtpu_worker
@pytest.mark.parametrize("variant", ["vit", "resnet"])
def test_on_a_tpu_mesh_the_model_is_the_plain_code_and_sums_gradients_in_float32(variant):
    """Built for a TPU topology from this CPU process, the model takes no CPU kernel, and
    its bfloat16 train step sums every parameter's gradient across the data axis in
    float32: no all-reduce or reduce-scatter in the compiled program has a bfloat16
    operand (JAX's own gradients of the bfloat16 copies of the dense kernels, convolution
    kernels, projections and positional embeddings made libtpu sum those in bfloat16).
    One bfloat16 dense layer with JAX's gradient shows what the check would catch."""
    out = run_python(f"""
        import json, os, re
        os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-16")
        os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")   # as clip_jax.aot does
        import jax, jax.numpy as jnp
        from jax.sharding import NamedSharding, PartitionSpec as P
        from clip_jax import cost, pod
        from tests.helpers import tiny_config

        def summed_types(hlo):
            ops = (" all-reduce(", " all-reduce-start(", " reduce-scatter(")
            return sorted(set(t for line in hlo.splitlines() for op in ops if op in line
                              for t in re.findall(r"\\b(bf16|f32)\\[", line.split(op)[0])))

        config = tiny_config(resnet={variant == "resnet"}, batch_size=64, model__dtype="bfloat16")
        devices, _ = pod.topology_devices("v5e:2x2")
        run, compiled = pod.compile_step(config, devices)
        mesh = run.mesh
        x = jax.ShapeDtypeStruct((64, 32), jnp.bfloat16, sharding=NamedSharding(mesh, P("data")))
        k = jax.ShapeDtypeStruct((32, 48), jnp.float32, sharding=NamedSharding(mesh, P()))
        autodiff = lambda k, x: jnp.sum(jnp.dot(x, k.astype(jnp.bfloat16)).astype(jnp.float32) ** 2)
        with jax.set_mesh(mesh):
            autodiff_hlo = jax.jit(jax.grad(autodiff)).lower(k, x).compile().as_text()
        print(json.dumps({{"platform": mesh.devices.flat[0].platform, "ops": repr(run.model.ops),
                           "step": summed_types(compiled.as_text()),
                           "autodiff": summed_types(autodiff_hlo)}}))
    """)
    assert out["platform"] == "tpu" and out["ops"] == "Ops()"
    assert out["step"] == ["f32"] and "bf16" in out["autodiff"], out
