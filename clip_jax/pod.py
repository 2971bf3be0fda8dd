"""The real train step compiled ahead of time for a TPU pod slice or a GPU cluster, on any
host, and what `python -m clip_jax.aot` reports of it.

The step is the trainer's own (`train.build` with the topology's compile-only devices, then
`run.train_step.lower(...).compile()`). Nothing is allocated or run.
- TPUs: compiled by libtpu for a topology (what `jax.experimental.topologies.get_topology_desc`
  takes: `v4:4x4x8` is a v4-256 slice, 128 chips; `v5e:16x16` a v5e-256; `v5p:4x4x8`,
  `v6e:16x16`, ...). It needs libtpu (`pip install -e '.[tpu]'`), not a TPU.
- NVIDIA GPUs: `h100:32x8` is 32 hosts of 8 H100s (also `h200`, `a100`, `b200`), compiled
  by XLA's GPU compiler from jax's CUDA plugin (`pip install -e '.[gpu]'`), not a GPU
  ("deviceless" compilation: `get_topology_desc(platform="cuda", topology="1x32x8",
  target_config=TEXT)`, the devices carrying process indices 0..31 as on a cluster). TEXT
  is XLA's description of the GPU (`GpuTargetConfigProto`), shipped in
  clip_jax/data/gpu_targets (copies of XLA's own, README there). With no GPU to autotune
  on, XLA's Triton GEMM tiling can fail outright ("Couldn't find output tile sizes"), so
  these compiles send the products to cuBLAS (`GPU_COMPILER_OPTIONS`): memory and
  collectives are those of the program a GPU runs, kernel choices and speeds are not.
  JAX must not start the CUDA backend in the compiling process (on a host without a
  driver it fails, and the plugin is then not registered): `python -m clip_jax.aot` sets
  JAX_PLATFORMS=cpu for itself unless it is set.

Reported per chip (v4 and v5p chips are one JAX device each, both TensorCores, as JAX runs
them; a GPU is one device):
- memory: XLA's memory analysis, arguments + outputs - aliased (donated) + temporaries +
  generated code, against the memory XLA may use (`budget_bytes`: the chip's HBM; on a GPU
  the share `GPU_MEMORY_FRACTION` of it that launch/gpu_env.sh gives XLA's allocator), and
  whether it `fits`;
- FLOPs: what one chip executes per step (rematerialised forward passes included) and the
  model's FLOPs per step (no recomputation: what MFU counts), both XLA's counts of the step
  with the towers unrolled (`cost.step_flops`);
- collectives: for each kind (all-gather, reduce-scatter, all-reduce, collective-permute,
  all-to-all), how many run per step and the bytes they carry per chip, summed from the
  compiled HLO (an op in a loop counted once per iteration). The bytes are each op's data:
  an all-gather's gathered result, the input of a reduce-scatter, all-reduce, all-to-all or
  collective-permute. `minimum_collective_bytes` is what the mesh and sharding rules imply:
  the loss's gathered embeddings (2 x B x D, forward) and their reduce-scatter (backward),
  or for a ring loss (`clip_ring`, `siglip`) as many bytes of collective-permutes (one
  tower's blocks round the ring and their gradients back), and the gradients' all-reduce
  over the data axis (FSDP: the parameters' all-gathers and the gradients' reduce-scatter,
  per micro-batch with `micro_batches`);
- time: XLA's estimate when its cost analysis gives a usable one (libtpu 0.0.42's is
  negative for these steps, and the GPU compiler gives none without a device, so none),
  and the compute bound (the chip's FLOPs at its
  peak), with the MFU each implies.

`find_max_batch` searches the largest global batch that fits (a multiple of the batch
shards x micro-batches, to within 1/16), each compile's memory pointing to the next size
to try (`cost.search_largest`, `cost.memory_guess`). A batch that does not fit is one XLA
refuses to compile (out of HBM) or whose memory exceeds the HBM.
"""
import dataclasses
import importlib.resources
import importlib.util
import math
import os
import re
import time

import jax

from clip_jax import config_lib, cost, sharding, train, validation
from clip_jax.models.layers import remat_policy

GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Chip:
    hbm_gib: float          # HBM per chip
    peak_tflops: float      # dense bfloat16 peak per chip
    megacore: bool = False  # two TensorCores compiled as one device
    target: str = ""        # a GPU's target description (clip_jax/data/gpu_targets)
    memory_fraction: float = 1.0   # the share of the HBM XLA may use

    @property
    def compiler_options(self):
        return GPU_COMPILER_OPTIONS if self.target else None


# Per-chip figures from Cloud TPU's system-architecture pages.
CHIPS = {"v4": Chip(32, 275, True), "v5e": Chip(16, 197), "v5p": Chip(95, 459, True),
         "v6e": Chip(32, 918)}

# The share of a GPU's memory that launch/gpu_env.sh lets XLA's allocator take
# (XLA_PYTHON_CLIENT_MEM_FRACTION; JAX's default is 0.75): the rest is the CUDA context,
# cuDNN/cuBLAS handles and NCCL's buffers, which live outside XLA's pool (BUILD_NOTES
# "GPU clusters").
GPU_MEMORY_FRACTION = 0.90
# Each GPU: its target description (XLA's, clip_jax/data/gpu_targets: the HBM is its
# device_memory_size), its dense bfloat16 peak in TFLOP/s (NVIDIA's data sheets: H100 and
# H200 SXM 989, A100 SXM 312, B200 2,250) and how its `device_kind` starts on a real GPU
# (the PCIe cards have other peaks).
GPUS = {"h100": ("h100_sxm.txtpb", 989, "NVIDIA H100 80GB HBM3"),
        "h200": ("h200.txtpb", 989, "NVIDIA H200"),
        "a100": ("a100_sxm_80.txtpb", 312, "NVIDIA A100-SXM4"),
        "b200": ("b200.txtpb", 2250, "NVIDIA B200")}
# What a compile with no GPU attached is given (the module docstring).
GPU_COMPILER_OPTIONS = {"xla_gpu_enable_triton_gemm": False}
# Fields of XLA's newer target descriptions that jaxlib 0.10.2's parser refuses ("GpuDeviceInfoProto
# has no field named ..."), left out when the descriptions are read (a hint for collective
# buffers' allocation, which the compiled program does not depend on in this jaxlib).
_NEWER_TARGET_FIELDS = ("collective_memory_granularity",)
_GPU_EXTRA = "pip install -e '.[gpu]'"


def target_description(name):
    """The text of a shipped GPU target description (clip_jax/data/gpu_targets/NAME)."""
    return importlib.resources.files("clip_jax").joinpath("data", "gpu_targets", name).read_text()


def gpu_peak_tflops(device_kind):
    """The dense bfloat16 peak of a GPU of `GPUS` from its `device_kind`; None for others."""
    for _, peak, kind in GPUS.values():
        if device_kind.startswith(kind):
            return peak
    return None


def gpu_chip(generation):
    """The `Chip` of a GPU of `GPUS`, its HBM read from its target description."""
    target, peak, _ = GPUS[generation]
    size = re.search(r"device_memory_size:\s*(\d+)", target_description(target))
    return Chip(int(size.group(1)) / GIB, peak, target=target, memory_fraction=GPU_MEMORY_FRACTION)


def cuda_plugin_installed():
    """Whether jax's CUDA plugin (the `gpu` extra) is installed. `find_spec` of a submodule
    imports its parent package and raises when that is missing: a venv with no JAX plugin
    at all has no `jax_plugins`."""
    try:
        return importlib.util.find_spec("jax_plugins.xla_cuda12") is not None
    except ModuleNotFoundError:
        return False


def _gpu_topology(topology, chip):
    """The compile-only devices of `topology` ('h100:32x8') for `chip` (`gpu_chip`)."""
    from jax.experimental import topologies
    shape = re.fullmatch(r"(\d+)x(\d+)", topology.split(":", 1)[1])
    if not shape or min(int(n) for n in shape.groups()) < 1:
        raise ValueError(f"--topology={topology}: a GPU topology is GPU:HOSTSxGPUS_PER_HOST, "
                         "e.g. h100:32x8 (32 hosts of 8 GPUs) or h100:1x8")
    if not cuda_plugin_installed():
        raise ValueError(f"--topology={topology}: compiling for NVIDIA GPUs needs jax's CUDA "
                         f"plugin, which is not installed: {_GPU_EXTRA}")
    text = "\n".join(line for line in target_description(chip.target).splitlines()
                     if line.split(":")[0].strip() not in _NEWER_TARGET_FIELDS)
    hosts, gpus = shape.groups()
    try:
        return list(topologies.get_topology_desc(
            platform="cuda", topology=f"1x{hosts}x{gpus}", target_config=text).devices)
    except NotImplementedError as e:
        raise ValueError(
            f"--topology={topology}: JAX has no CUDA topology ({e}); in a process with no GPU, "
            "JAX must not start its CUDA backend: set JAX_PLATFORMS=cpu (python -m clip_jax.aot "
            f"does), and check that the CUDA plugin imports ({_GPU_EXTRA})") from None
    except Exception as e:   # noqa: BLE001   (jax raises JaxRuntimeError)
        raise ValueError(f"--topology={topology}: the target description {chip.target} was "
                         f"refused: {type(e).__name__}: {e}") from None


def topology_devices(topology, slices=1):
    """The compile-only devices of a TPU topology such as 'v4:4x4x8' or a GPU one such as
    'h100:32x8', and its chip; with `slices`, that many TPU slices of the topology, joined by
    the data-centre network (DCN: libtpu's multi-slice topology)."""
    from jax.experimental import topologies
    generation = topology.split(":")[0]
    if ":" not in topology or generation not in {**CHIPS, **GPUS}:
        raise ValueError(f"--topology: expected GENERATION:SHAPE with GENERATION one of "
                         f"{sorted(CHIPS)} (TPUs) or {sorted(GPUS)} (NVIDIA GPUs, SHAPE "
                         f"HOSTSxGPUS_PER_HOST), e.g. v4:4x4x8, v5e:16x16 or h100:32x8; got "
                         f"{topology!r}")
    if slices < 1 or (slices > 1 and generation in GPUS):
        raise ValueError(f"--slices={slices}: a positive number of TPU slices (a GPU "
                         "topology's hosts are its DCN granules: set --config.mesh.slices)")
    if generation in GPUS:
        chip = gpu_chip(generation)
        return _gpu_topology(topology, chip), chip
    chip = CHIPS[generation]
    options = {"chip_config_name": "megacore"} if chip.megacore else {}
    try:
        desc = topologies.get_topology_desc(platform="tpu", topology_name=topology,
                                            num_slices=slices, **options)
    except Exception as e:   # noqa: BLE001  (libtpu missing, or a shape it does not know)
        hint = ("another process on this host holds libtpu's lock: for compiling only, set "
                "ALLOW_MULTIPLE_LIBTPU_LOAD=1 (python -m clip_jax.aot does)"
                if "libtpu_lockfile" in str(e) or "already in use" in str(e) else
                "the TPU compiler comes with pip install -e '.[tpu]'")
        raise ValueError(f"--topology={topology}: {type(e).__name__}: {e} ({hint})") from None
    return list(desc.devices), chip


# ------------------------------------------------------------------ compile and measure

def _out_of_memory(error):
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "Ran out of memory" in text or "out of memory" in text


def compile_step(config, devices, compiler_options=None):
    """(run, compiled step) for `config` on `devices`, or (run, the out-of-memory error).
    `compiler_options`: XLA options for this compile (`Chip.compiler_options`)."""
    run = train.build(config, devices)
    with run.context():
        lowered = run.train_step.lower(run.abstract_state, run.abstract_batch())
        try:
            return run, lowered.compile(compiler_options)
        except Exception as e:   # noqa: BLE001   (jax raises XlaRuntimeError)
            if _out_of_memory(e):
                return run, e
            raise


def add_flops(report, config, chip):
    """FLOPs and the times and MFU they imply, into `report`. XLA's cost analysis of the
    compiled program counts a loop's body once (a scanned tower's blocks once), so they are
    counted on the step lowered, not compiled, with the towers unrolled."""
    chips, peak = report["topology_chips"], chip.peak_tflops * 1e12
    flops = cost.step_flops(config, ops="xla") / chips
    model_flops = cost.step_flops(config, model_flops=True)
    estimate, compute_bound = report["xla_seconds_estimate"], flops / peak
    report.update(
        flops=flops, model_flops=model_flops,
        mfu_at_xla_estimate=model_flops / (chips * peak * estimate) if estimate else None,
        compute_bound_seconds=compute_bound,
        mfu_at_compute_bound=model_flops / (chips * peak * compute_bound) if flops else None)
    return report


def analyse(config, devices, chip, hlo_dir=None, count_flops=True):
    """The report for one compile of `config`'s train step on `devices` (the module docstring);
    `count_flops=False` leaves out the FLOPs (`add_flops`: two more lowerings)."""
    t0 = time.perf_counter()
    run, compiled = compile_step(config, devices, chip.compiler_options)
    report = {"topology_chips": len(devices), "device_kind": devices[0].device_kind,
              "batch_size": config.batch_size,
              "mesh": {a: int(run.mesh.shape[a]) for a in sharding.MESH_AXES},
              "slices": sharding.num_slices(config.mesh, devices),
              "local_batch": config.batch_size // sharding.num_batch_shards(run.mesh, run.rules),
              "loss": config.loss.name, "micro_batches": int(config.micro_batches),
              "remat": remat_policy(config.model.remat), "dtype": str(config.model.dtype),
              "hbm_bytes": int(chip.hbm_gib * GIB),
              "budget_bytes": int(chip.hbm_gib * chip.memory_fraction * GIB),
              "compile_seconds": time.perf_counter() - t0}
    if isinstance(compiled, Exception):
        report.update(fits=False, memory_per_chip_bytes=None,
                      error=str(compiled).strip().splitlines()[0][:500])
        return report
    mem = compiled.memory_analysis()
    used = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
            + mem.temp_size_in_bytes + mem.generated_code_size_in_bytes)
    report.update(memory_per_chip_bytes=int(used), fits=used <= report["budget_bytes"],
                  memory_bytes={k: int(getattr(mem, k + "_size_in_bytes"))
                                for k in ("argument", "output", "alias", "temp", "generated_code")})
    xla = cost.xla_cost(compiled)
    estimate = xla.get("optimal_seconds")
    report.update(bytes_accessed=float(xla.get("bytes accessed", 0.0)),
                  xla_seconds_estimate=float(estimate) if estimate and estimate > 0 else None)
    if count_flops:
        add_flops(report, config, chip)
    hlo = compiled.as_text()
    found = cost.collective_bytes(hlo)
    report["collectives"] = found
    report["collective_bytes"] = {k: v["bytes"] for k, v in found.items()}
    report["minimum_collective_bytes"] = cost.minimum_collective_bytes(config, run)
    if report["slices"] > 1:
        report["dcn_collective_bytes"] = {k: v["dcn_bytes"] for k, v in found.items()}
        report["minimum_dcn_bytes"] = cost.minimum_dcn_bytes(config, run, report["slices"])
    batch = config.batch_size
    # A global B x B block anywhere in the program (the loss must hold B_local x B at most),
    # unless a parameter has that shape too (tiny test models).
    param_shapes = {tuple(x.shape) for x in jax.tree.leaves(run.abstract_state.params)}
    report["global_square_blocks"] = [] if (batch, batch) in param_shapes else sorted(set(
        re.findall(rf"\b(?:f32|bf16)\[{batch},{batch}\]", hlo)))[:3]
    # Gathered B x d embeddings (what `clip` and `clip_blockwise` hold; never `clip_ring`/`siglip`).
    # By shape only: in a tiny test model another array may have that shape.
    embed = int(config.model.embed_dim)
    report["global_embedding_arrays"] = sorted(set(
        re.findall(rf"\b(?:f32|bf16)\[{batch},{embed}\]", hlo)))[:3] if batch != embed else []
    if hlo_dir:
        os.makedirs(hlo_dir, exist_ok=True)
        with open(os.path.join(hlo_dir, f"train_step_b{batch}.hlo.txt"), "w") as f:
            f.write(hlo)
    return report


def find_max_batch(config, devices, chip, on_report=None, micro_rows=None):
    """(largest fitting global batch, [report of each compile tried]). Each compile's memory
    guides the next size (`memory_guess`): a compile of a 256-chip step takes minutes.
    `on_report(report)` is called after each compile. With `micro_rows`, micro-batches are
    searched too: each size is tried with the leanest exact loss and micro-batches of
    `micro_rows` rows per batch shard (as many as that takes: the least activation memory),
    the frontier `plan` then chooses the cheapest settings below."""
    shards = sharding.num_batch_shards(
        sharding.make_mesh(config.mesh, devices), tuple(tuple(r) for r in config.sharding_rules))
    reports, budget = [], chip.hbm_gib * chip.memory_fraction * GIB

    def fits(batch):
        trial = config.copy_and_resolve_references()
        with trial.unlocked():
            trial.batch_size = batch
            if micro_rows:
                trial.loss.name = exact_losses(config.loss.name)[0]
                trial.micro_batches = batch // shards // micro_rows
        report = analyse(trial, devices, chip, count_flops=False)
        reports.append((trial, report))
        if on_report is not None:
            on_report(report)
        return report["fits"]

    def guess(lo, hi):
        return cost.memory_guess([(r["batch_size"], r["memory_per_chip_bytes"]) for _, r in reports
                                  if r["memory_per_chip_bytes"] is not None], budget)

    unit = shards * (micro_rows or int(config.micro_batches))
    largest, _ = cost.search_largest(fits, unit, config.batch_size, resolution=16, guess=guess)
    for trial, report in reports:
        if report["batch_size"] == largest:
            add_flops(report, trial, chip)
    return largest, [report for _, report in reports]


# ------------------------------------------------------------------ the planner

# Softmax (InfoNCE) losses are one objective computed three ways (tests: equal values and
# gradients), so the planner may swap one for another; SigLIP is another objective.
EXACT_FAMILIES = (("clip_ring", "clip_blockwise", "clip"), ("siglip",))

# Rows per batch shard in each micro-batch when `--find-max-batch --plan` searches the
# frontier. One row would be the least activation memory in principle, but TPU arrays are
# tiled (8 x 128 for float32, 32 x 128 for uint8): a one-row micro-batch pads to a tile, and
# ViT-B/16 at 4M on v5e-256 with 16,384 one-row micro-batches asked for 208 GB of
# temporaries, against 13.8 GiB in all with the 32-row micro-batches the planner picked.
FRONTIER_MICRO_ROWS = 32


def exact_losses(name):
    """The losses equal to `name`'s, leanest (least memory) first."""
    return next((f for f in EXACT_FAMILIES if name in f), (name,))


def _bytes_per_chip(tree):
    """Bytes of one chip's shards of a tree of sharded ShapeDtypeStructs."""
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
               for x in jax.tree.leaves(tree))


def state_bytes_per_chip(run):
    """Bytes of one chip's shard of the train state (what stays resident between steps)."""
    return _bytes_per_chip(run.abstract_state)


def resident_bytes_per_chip(run):
    """Bytes one chip holds for the whole step whatever the micro-batches: its shard of the
    train state and of the batch (uint8 pixel rows and token ids)."""
    return state_bytes_per_chip(run) + _bytes_per_chip(run.abstract_batch())


def _refused_temporaries(report):
    """The temporaries XLA said it needed when it refused to compile (TPU: "the total memory
    required for HLO temporaries (98.83G) exceeds available HBM"), in bytes; else None."""
    found = re.search(r"required for HLO temporaries \(([\d.]+)([KMGT])\)", report.get("error", ""))
    return float(found.group(1)) * 1024 ** ("KMGT".index(found.group(2)) + 1) if found else None


def micro_batch_candidates(local):
    """The micro-batch counts K > 1 the planner tries for `local` rows per batch shard, in
    order: the divisors of `local` that are a power of 2 or leave a power of 2 of rows per
    micro-batch (`find_max_batch --plan` sizes are multiples of FRONTIER_MICRO_ROWS rows per
    shard, e.g. 386,880 = 12,090 x 32, whose own K is not a power of 2)."""
    powers = [2 ** i for i in range(local.bit_length())]
    return sorted({k for k in powers[1:] if local % k == 0}
                  | {local // rows for rows in powers if local % rows == 0 and local > rows})


def recomputation(remat, micro_batches):
    """Extra forward passes per step (at most): remat recomputes the forward in the backward
    pass (a policy other than 'full' less of it; counted as one); the gradient cache
    (micro_batches > 1) runs a forward without gradients first."""
    return int(remat_policy(remat) != "none") + int(micro_batches > 1)


# The planner's ladder: (remat policy, micro-batched), least recomputation first
# (`recomputation`). The planner tries no policies between 'none' and 'full'.
RUNGS = (("none", False), ("full", False), ("none", True), ("full", True))


def one_slice(mesh, slices):
    """A report's mesh (its axis sizes) as `config.mesh` gives it: one slice's."""
    return {**mesh, "data": mesh["data"] // slices}


def fsdp_meshes(mesh_cfg, num_devices, slices=1):
    """The config's mesh (resolved, as `config.mesh` gives it: one slice's), then the same with
    the data axis's factors of 2 moved to the fsdp axis one at a time: the batch shards stay,
    the state is sharded twice as far (within each slice)."""
    data, fsdp, model = sharding.mesh_shape(mesh_cfg, num_devices, slices)
    data //= slices
    meshes = [dict(data=data, fsdp=fsdp, model=model)]
    while data % 2 == 0:
        data, fsdp = data // 2, fsdp * 2
        meshes.append(dict(data=data, fsdp=fsdp, model=model))
    return meshes


def plan(config, devices, chip, on_report=None):
    """The mesh, loss (among `exact_losses` of the config's), remat and micro-batches that
    fit `config.batch_size` on `devices` with the least recomputation (`recomputation`).
    Returns (the chosen report or None, [every report]).

    Meshes (`fsdp_meshes`): the config's first; then, while the best plan so far recomputes
    anything (or none fits), the mesh with twice the FSDP, where only plans that recompute
    less than the best are tried: sharding the state frees memory, but with micro-batches an
    FSDP mesh gathers the parameters once per micro-batch (the report's collectives), so at
    equal recomputation the config's mesh, then the least FSDP, is kept. The walk stops after
    a mesh whose state per chip is at most 1/16 of the budget (sharding it further frees
    less than 1/32), or at the last mesh. One batch is not compiled on a mesh where the
    config's mesh's compile says it cannot fit (`hopeless`), and a mesh on which the batch
    shards change (rules that split the batch over `data` only) is skipped. On one mesh see
    `_plan_on_mesh`."""
    budget = chip.hbm_gib * chip.memory_fraction * GIB
    rules = tuple(tuple(r) for r in config.sharding_rules)
    own_shards = sharding.num_batch_shards(sharding.make_mesh(config.mesh, devices), rules)
    lean = exact_losses(config.loss.name)[0]
    chosen, reports, first = None, [], None
    slices = sharding.num_slices(config.mesh, devices)
    for mesh in fsdp_meshes(config.mesh, len(devices), slices):
        t = config.copy_and_resolve_references()
        with t.unlocked():
            t.mesh.update(mesh)
        if sharding.num_batch_shards(sharding.make_mesh(t.mesh, devices), rules) != own_shards:
            continue
        run = train.build(t, devices)
        state = state_bytes_per_chip(run)
        first = first or (mesh, state)

        def hopeless(remat, state=state):
            """The config's mesh's one-batch compile with `remat`, less what this mesh frees
            (its state, and as much again of temporaries: gradients shard with the state), is
            still over the budget: a lower bound, so no compile is lost."""
            known = [r for r in reports if one_slice(r["mesh"], slices) == first[0]
                     and r["loss"] == lean
                     and (r["remat"], r["micro_batches"]) == (remat, 1)]
            if not known or state >= first[1]:
                return False
            memory = known[0]["memory_per_chip_bytes"] or (
                (_refused_temporaries(known[0]) or 0) + first[1])
            return memory - 2 * (first[1] - state) > budget

        below = chosen["recomputation"] if chosen is not None else math.inf
        found = _plan_on_mesh(t, devices, chip, run, reports, on_report, below, hopeless)
        if found is not None:
            chosen = found
        if (chosen is not None and chosen["recomputation"] == 0) or state <= budget / 16:
            break
    if chosen is not None:
        add_flops(chosen, _with_settings(config, chosen["loss"], chosen["remat"],
                                         chosen["micro_batches"],
                                         one_slice(chosen["mesh"], slices)), chip)
    return chosen, reports


def _with_settings(config, loss, remat, micro_batches, mesh=None):
    """A copy of `config` with the planner's settings (and `mesh`'s axis sizes)."""
    t = config.copy_and_resolve_references()
    with t.unlocked():
        t.loss.name, t.micro_batches = loss, micro_batches
        if mesh is not None:
            t.mesh.update(mesh)
    config_lib.set_remat(t.model, remat)
    return t


def _plan_on_mesh(config, devices, chip, run, reports, on_report, below, hopeless):
    """On the config's mesh (`run` built for it): the least recomputation below `below` that
    fits, the config's own loss preferred at equal recomputation, then fewer micro-batches;
    one batch with `remat` is not compiled where `hopeless(remat)`. Returns the chosen
    report or None; appends each compile's report to `reports`.

    Search: the leanest loss of the family (it gathers nothing) finds the least
    recomputation that fits -- K=1 without remat, K=1 with remat, the smallest K without
    remat, the smallest K with remat -- then the config's own loss is tried at that point.
    The smallest K is guessed from the K=1 compile (memory = the rest + temporaries / K)
    and corrected by doubling (given up when the memory stops shrinking: the rest does not
    depend on K) or halving: a handful of compiles, each minutes at pod scale. No compile
    when what each chip holds for the whole step (`resident_bytes_per_chip`: its state and
    its share of the batch) is over the budget, and no K search when the K=1 compile's
    memory besides its temporaries is."""
    mesh = sharding.make_mesh(config.mesh, devices)
    shards = sharding.num_batch_shards(mesh, tuple(tuple(r) for r in config.sharding_rules))
    local = config.batch_size // shards
    budget = chip.hbm_gib * chip.memory_fraction * GIB
    own, lean = config.loss.name, exact_losses(config.loss.name)[0]
    if resident_bytes_per_chip(run) > budget:          # no K fits: nothing to compile
        return None
    state = state_bytes_per_chip(run)
    mesh_shape = dict(mesh.shape)
    mine = [r for r in reports if r["mesh"] == mesh_shape]

    def trial(loss, remat, k):
        for r in mine:
            if (r["loss"], r["remat"], r["micro_batches"]) == (loss, remat, k):
                return r
        t = _with_settings(config, loss, remat, k)
        validation.validate(t, len(devices))
        report = analyse(t, devices, chip, count_flops=False)
        report["recomputation"] = recomputation(remat, k)
        reports.append(report)
        mine.append(report)
        if on_report is not None:
            on_report(report)
        return report

    def smallest_k(loss, remat):
        """The fitting report with the fewest micro-batches K > 1 (`micro_batch_candidates`),
        or None: from the guess up until one fits, then down while one does."""
        ks = micro_batch_candidates(local)
        if not ks:
            return None
        one = trial(loss, remat, 1)
        if one["memory_per_chip_bytes"] is not None:     # the temporaries shrink with K
            temp = one["memory_bytes"]["temp"]
            rest = one["memory_per_chip_bytes"] - temp
        else:                                            # what XLA said it needed
            temp, rest = _refused_temporaries(one), state
        if rest >= budget:                               # what does not shrink with K
            return None
        want = temp / (budget - rest) if temp is not None else 2
        i = next((j for j, k in enumerate(ks) if k >= want), len(ks) - 1)
        floor = []                 # memory that stops shrinking with K will not fit at any K
        while i < len(ks) and not trial(loss, remat, ks[i])["fits"]:
            last = trial(loss, remat, ks[i])
            floor.append(_refused_temporaries(last) or last["memory_per_chip_bytes"])
            if len(floor) >= 2 and None not in floor[-2:] and floor[-1] > 0.95 * floor[-2]:
                return None
            i += 1
        if i == len(ks):
            return None
        while i > 0 and trial(loss, remat, ks[i - 1])["fits"]:
            i -= 1
        return trial(loss, remat, ks[i])

    chosen = None
    for remat, search in RUNGS:
        if recomputation(remat, 2 if search else 1) >= below:
            break
        if not search and hopeless(remat):
            continue
        found = smallest_k(lean, remat) if search else trial(lean, remat, 1)
        if found is not None and found["fits"]:
            chosen = found
            break
    if chosen is not None and own != lean:          # the config's own loss, if it fits there too
        mine_loss = trial(own, chosen["remat"], chosen["micro_batches"])
        chosen = mine_loss if mine_loss["fits"] else chosen
    return chosen


def plan_overrides(report, config):
    """The command-line overrides that train with the planned settings (the mesh's when it
    is not the config's)."""
    overrides = (f"--config.loss.name={report['loss']} --config.model.remat={report['remat']} "
                 f"--config.micro_batches={report['micro_batches']}")
    slices = report.get("slices", 1)
    own = dict(zip(sharding.MESH_AXES,
                   sharding.mesh_shape(config.mesh, report["topology_chips"], slices)))
    if report["mesh"] != own:
        overrides += "".join(f" --config.mesh.{a}={n}"
                             for a, n in one_slice(report["mesh"], slices).items())
    return overrides
