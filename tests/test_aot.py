"""clip_jax.aot: the real train step compiled for a TPU topology on this CPU host.

The compile tests need libtpu (`pip install -e '.[tpu]'`, which CI installs) and are skipped
without it. They run on one xdist worker: libtpu takes a lock per process.
"""
import importlib.util
import json
import textwrap

import pytest

from clip_jax import aot
from tests.helpers import run_cli, run_python, tiny_flags

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu not installed (pip install -e '.[tpu]')")
libtpu_worker = pytest.mark.xdist_group("libtpu")

# A compiled module in the TPU compiler's notation: an async all-gather, a tuple all-reduce
# with /*index=N*/ markers, a loop of 3 known trips holding a reduce-scatter and a permute,
# a loop bounded by its condition holding an all-gather, a conditional whose branches
# hold an all-reduce each, the continuation of an all-gather (not counted again), and a
# reduce-scatter as v5e's libtpu emits one: an all-reduce + slice fused as `all-reduce-scatter`.
HLO = textwrap.dedent("""\
    HloModule m, entry_computation_layout={()->()}

    %add (a: f32[], b: f32[]) -> f32[] {
      %a = f32[] parameter(0)
      %b = f32[] parameter(1)
      ROOT %s = f32[] add(%a, %b)
    }

    %body (p: (s32[], f32[64,8])) -> (s32[], f32[64,8]) {
      %p = (s32[], f32[64,8]{1,0}) parameter(0)
      %x = f32[64,8]{1,0:T(8,128)} get-tuple-element(%p), index=1
      %rs = f32[16,8]{1,0} reduce-scatter(%x), channel_id=3, dimensions={0}, to_apply=%add
      %y = bf16[16,8]{1,0} convert(%rs)
      %cp = bf16[16,8]{1,0} collective-permute(%y), channel_id=4, source_target_pairs={{0,1}}
      ROOT %t = (s32[], f32[64,8]{1,0}) tuple(%i, %x)
    }

    %cond (p: (s32[], f32[64,8])) -> pred[] {
      %p = (s32[], f32[64,8]{1,0}) parameter(0)
      ROOT %lt = pred[] compare(%i, %n), direction=LT
    }

    %body2 (p2: (s32[], f32[64,8])) -> (s32[], f32[64,8]) {
      %p2 = (s32[], f32[64,8]{1,0}) parameter(0)
      %x2 = f32[64,8]{1,0} get-tuple-element(%p2), index=1
      %ag2 = f32[256,8]{1,0} all-gather(%x2), channel_id=7, dimensions={0}
      ROOT %t2 = (s32[], f32[64,8]{1,0}) tuple(%i2, %x2)
    }

    %cond2 (p2: (s32[], f32[64,8])) -> pred[] {
      %c5 = s32[]{:T(128)} constant(5)
      %p2 = (s32[], f32[64,8]{1,0}) parameter(0)
      %i2 = s32[]{:T(128)} get-tuple-element(%p2), index=0
      ROOT %lt2 = pred[]{:T(512)} compare(%i2, %c5), direction=LT
    }

    %branch (q: f32[32]) -> f32[32] {
      %q = f32[32]{0} parameter(0)
      ROOT %ar2 = f32[32]{0} all-reduce(%q), channel_id=5, to_apply=%add
    }

    %async_collective_fusion.1 (s: bf16[4,16]) -> bf16[16,16] {
      %s = bf16[4,16]{1,0} parameter(0)
      ROOT %ag_piece = bf16[16,16]{1,0} all-gather(%s), channel_id=1, dimensions={0}, frontend_attributes={chain_id="0"}
    }

    %all-reduce-scatter.8 (input_0: f32[32,8]) -> f32[8,8] {
      %input_0 = f32[32,8]{1,0:T(8,128)S(1)} parameter(0)
      %all-reduce.96 = f32[32,8]{1,0:T(8,128)} all-reduce(%input_0), channel_id=8, to_apply=%add
      ROOT %slice = f32[8,8]{1,0} dynamic-slice(%all-reduce.96, %offset, %zero), dynamic_slice_sizes={8,8}
    }

    %other_branch (q: f32[32]) -> f32[32] {
      %q2 = f32[32]{0} parameter(0)
      ROOT %ar3 = f32[32]{0} all-reduce(%q2), channel_id=6, to_apply=%add
    }

    ENTRY %main (a: bf16[4,16], b: f32[10], c: f32[6]) -> f32[] {
      %a = bf16[4,16]{1,0:T(8,128)(2,1)} parameter(0)
      %b = f32[10]{0} parameter(1)
      %c = f32[6]{0} parameter(2)
      %ag = (bf16[4,16]{1,0}, bf16[16,16]{1,0}) all-gather-start(%a), channel_id=1, dimensions={0}
      %agd = bf16[16,16]{1,0} all-gather-done(%ag)
      %piece = bf16[16,16]{1,0} fusion(%a), kind=kOutput, calls=%async_collective_fusion.1, backend_config={"continuation_config":{"operand_original_start":"0"}}
      %ar = (f32[10]{0}, f32[6]{0}) all-reduce(%b, /*index=1*/%c), channel_id=2, to_apply=%add
      %w = (s32[], f32[64,8]{1,0}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
      %w2 = (s32[], f32[64,8]{1,0}) while(%init), condition=%cond2, body=%body2
      %g = f32[32,8]{1,0} parameter(3)
      %fused_rs = f32[8,8]{1,0} fusion(%g), kind=kCustom, calls=%all-reduce-scatter.8
      %k = f32[32]{0} conditional(%pred, %v, %v), branch_computations={%branch, %other_branch}
      ROOT %r = f32[] constant(0)
    }
    """)


def test_collective_bytes_weighs_loops_and_counts_each_kind_once():
    got = aot.collective_bytes(HLO)
    # The gathered results: the async one, and 5 trips of a loop whose bound is only in its
    # condition (`counter < 5`, as the TPU compiler leaves a scan).
    assert got["all-gather"] == {"count": 1 + 5, "bytes": 16 * 16 * 2 + 5 * 256 * 8 * 4}
    # Its input, 3 trips; and the fused all-reduce-scatter's input, once.
    assert got["reduce-scatter"] == {"count": 3 + 1, "bytes": 3 * 64 * 8 * 4 + 32 * 8 * 4}
    assert got["collective-permute"] == {"count": 3, "bytes": 3 * 16 * 8 * 2}
    # The tuple all-reduce (both operands), and each of the conditional's two branches once.
    assert got["all-reduce"] == {"count": 3, "bytes": (10 + 6) * 4 + 2 * 32 * 4}
    assert got["all-to-all"] == {"count": 0, "bytes": 0}


def test_search_largest_brackets_the_limit_to_its_resolution():
    for limit in (0, 7, 8, 1000, 123_456):
        calls = []

        def fits(n):
            calls.append(n)
            return n <= limit

        largest, tried = aot.search_largest(fits, unit=8, start=64)
        assert largest % 8 == 0 and largest <= limit
        assert limit - largest < max(8, largest // 16) + 8, (limit, largest)
        assert all(tried[n] == (n <= limit) for n in tried) and len(calls) == len(tried)
    assert aot.search_largest(lambda n: True, unit=8, start=64, limit=200)[0] == 200 // 8 * 8


def test_memory_guided_search_finds_the_same_limit_in_fewer_compiles():
    """Memory growing linearly plus a B_local x B term (the clip loss's logits): the guided
    search lands within the resolution of the true limit in fewer tries than bisection, and
    a misleading guess costs extra tries, never a wrong answer."""
    unit, budget = 256, 16.0
    memory = lambda n: 2.0 + 1.1e-4 * n + 2e-11 * n * n         # GiB at global batch n
    truth = max(n for n in range(unit, 400_000, unit) if memory(n) <= budget)

    def search(guess_kind):
        points = []

        def fits(n):
            points.append((n, memory(n)))
            return memory(n) <= budget

        guess = {"memory": lambda lo, hi: aot.memory_guess(points, budget),
                 "too_high": lambda lo, hi: 10 ** 9, "too_low": lambda lo, hi: 1,
                 "none": None}[guess_kind]
        largest, tried = aot.search_largest(fits, unit, 32_768, resolution=16, guess=guess)
        assert memory(largest) <= budget and truth - largest <= max(unit, largest // 16), guess_kind
        assert all(ok == (memory(n) <= budget) for n, ok in tried.items())
        return len(tried)

    bisection = search("none")
    assert search("memory") < bisection, (search("memory"), bisection)
    for kind in ("too_high", "too_low"):
        assert search(kind) <= bisection + 3
    assert aot.memory_guess([(1, 1.0)], budget) is None
    assert aot.memory_guess([(1, 1.0), (2, 2.0)], 4.0) == pytest.approx(4.0)
    # the last fit and the first over budget, not the two fits: 2 + (4 - 2) / ((20 - 2) / 6)
    assert aot.memory_guess([(1, 1.0), (2, 2.0), (8, 20.0)], 4.0) == pytest.approx(2 + 2 / 3)


@pytest.mark.parametrize("topology, message", [("v9:2x2", "GENERATION"), ("v5e", "GENERATION")])
def test_bad_topology_is_refused_with_its_name(topology, message):
    with pytest.raises(ValueError, match=message):
        aot.topology_devices(topology)


@needs_libtpu
@libtpu_worker
@pytest.mark.parametrize("variant", ["vit", "resnet"])
def test_aot_compiles_the_train_step_for_a_tpu_topology(variant):
    """The CLI compiles the trainer's own step for 4 v5e chips from this CPU host: it fits,
    the loss gathers the B x D embeddings (never a B x B block), and the gradients are
    summed across the data axis."""
    config = "configs/smoke.py" + (":resnet" if variant == "resnet" else "")
    flags = tiny_flags(batch_size=64)
    if variant == "resnet":         # the smoke ResNet itself (tiny already), the tiny text tower
        flags = [f for f in flags if not f.startswith("--config.model.vision.")]
    proc = run_cli(["clip_jax.aot", f"--config={config}", "--topology=v5e:2x2", "--json", *flags],
                   timeout=600)
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["topology_chips"] == 4 and r["device_kind"] == "TPU v5 lite"
    assert r["mesh"] == {"data": 4, "fsdp": 1, "model": 1} and r["local_batch"] == 16
    assert r["fits"] and 0 < r["memory_per_chip_bytes"] < r["hbm_bytes"] == 16 * 2 ** 30
    assert r["flops"] > 0 and r["model_flops"] > 0
    coll = r["collective_bytes"]
    assert set(coll) == set(aot.COLLECTIVES)
    # The two towers' embeddings gathered (in bf16 or float32): at least B x D x 2 bytes each.
    assert coll["all-gather"] >= 2 * 64 * 32 * 2
    assert coll["all-reduce"] > 0 and r["global_square_blocks"] == []
    assert "fits" in proc.stdout and "collectives per chip" in proc.stdout


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
        import jax, jax.numpy as jnp
        from jax.sharding import NamedSharding, PartitionSpec as P
        from clip_jax import aot
        from tests.helpers import tiny_config

        def summed_types(hlo):
            ops = (" all-reduce(", " all-reduce-start(", " reduce-scatter(")
            return sorted(set(t for line in hlo.splitlines() for op in ops if op in line
                              for t in re.findall(r"\\b(bf16|f32)\\[", line.split(op)[0])))

        config = tiny_config(resnet={variant == "resnet"}, batch_size=64, model__dtype="bfloat16")
        devices, _ = aot.topology_devices("v5e:2x2")
        run, compiled = aot.compile_step(config, devices)
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
