"""Ahead-of-time compilation of the real train step for a TPU pod or a GPU cluster, on any host.

    python -m clip_jax.aot --config=configs/rn50.py --topology=v4:4x4x8 \\
        [--config.key=value ...] [--json] [--find-max-batch] [--hlo_dir=DIR]
    python -m clip_jax.aot --config=configs/vit_b16.py --topology=v5e:16x16 --slices=2 ...
    python -m clip_jax.aot --config=configs/vit_l14.py --topology=h100:32x8 ...

The step is the trainer's own, compiled for `--topology`: a TPU slice by libtpu (what
`jax.experimental.topologies.get_topology_desc` takes: `v4:4x4x8` is a v4-256 slice, 128
chips; `v5e:16x16` a v5e-256; `v5p:4x4x8`, `v6e:16x16`, ...; `pip install -e '.[tpu]'`),
or NVIDIA GPU hosts by XLA's GPU compiler (`h100:32x8`: 32 hosts of 8 H100s; `h200`,
`a100`, `b200`; `pip install -e '.[gpu]'`), with no TPU or GPU present. Nothing is
allocated or run. Reported per chip: memory against what XLA may use of the chip's HBM and
whether it fits, FLOPs, the bytes each kind of collective carries against the minimum the
sharding implies, and the time and MFU they imply (clip_jax/pod.py describes each figure).

`--slices=N` compiles for N such TPU slices joined by the data-centre network (DCN; libtpu's
multi-slice topology, `get_topology_desc(..., num_slices=N)`): the mesh's data axis spans the
slices (`config.mesh.slices`, clip_jax/sharding.py), and the report separates the bytes each
chip sends between slices (DCN) from those within its slice (ICI), the DCN ones against what
the gradients' reduction and the loss's exchange need (`cost.minimum_dcn_bytes`).

For GPU topologies, run it the way the job will run, with the XLA flags of
launch/gpu_env.sh (`launch/gpu_env.sh python -m clip_jax.aot ...`): they change the
compiled step (BUILD_NOTES "GPU clusters").

`--find-max-batch` searches the largest global batch that fits (a multiple of the batch
shards x micro-batches, to within 1/16), each compile's memory pointing to the next size
to try (a 256-chip compile takes minutes). A batch that does not fit is one XLA refuses to
compile (out of HBM) or whose memory exceeds the HBM. With `--json` the last line printed
is one JSON object.

The libtpu warnings about worker hostnames on a host without TPUs are quieted by setting
TPU_ACCELERATOR_TYPE and TPU_WORKER_HOSTNAMES, in this command's process only, unless they
are set. Likewise JAX_PLATFORMS=cpu, unless set: nothing runs, and on a host with the CUDA
plugin but no GPU, starting JAX's CUDA backend fails and leaves no CUDA compiler. And
ALLOW_MULTIPLE_LIBTPU_LOAD=1, unless set: libtpu takes a host-wide lock (/tmp/libtpu_lockfile)
meant for processes that drive TPU chips, and refuses a second process ("Internal error when
accessing libtpu multi-process lockfile") even when both only compile; this command opens no
chip, so two compiles on one host (a sweep, two CI workers, an aot beside a training on a
TPU VM) run side by side.
"""
import dataclasses
import json
import os
import sys

import jax

from clip_jax import cli, cost, pod, sharding, train, validation
from clip_jax.pod import GIB


def _memory_line(r):
    if r["memory_per_chip_bytes"] is None:
        return f"does not fit ({r.get('error', '')[:160]})"
    usable = "" if r["budget_bytes"] == r["hbm_bytes"] else \
        f" ({r['budget_bytes'] / r['hbm_bytes']:.0%} usable: {r['budget_bytes'] / GIB:.1f})"
    return (f"{r['memory_per_chip_bytes'] / GIB:.2f} GiB of {r['hbm_bytes'] / GIB:.1f} GiB{usable} "
            f"per chip: {'fits' if r['fits'] else 'does NOT fit'}")


def format_report(name, topology, r):
    lines = [f"{name} on {topology} ({r['topology_chips']} x {r['device_kind']}), global batch "
             f"{r['batch_size']:,} (local {r['local_batch']:,}), mesh "
             + " x ".join(f"{a}={n}" for a, n in r["mesh"].items())
             + (f" ({r['slices']} slices)" if r.get("slices", 1) > 1 else "")
             + f", loss {r['loss']}, micro-batches {r['micro_batches']}, remat {r['remat']}",
             "  memory      " + _memory_line(r)]
    if r["memory_per_chip_bytes"] is None:
        return "\n".join(lines)
    m = r["memory_bytes"]
    lines.append(f"              arguments {m['argument'] / GIB:.2f}, outputs {m['output'] / GIB:.2f} "
                 f"(donated {m['alias'] / GIB:.2f}), temporaries {m['temp'] / GIB:.2f}, code "
                 f"{m['generated_code'] / GIB:.2f} GiB")
    executed = r["flops"] * r["topology_chips"] / r["model_flops"] if r["model_flops"] else 0
    lines.append(f"  FLOPs       {r['flops'] / 1e12:.1f} TFLOP executed per chip; model "
                 f"{r['model_flops'] / 1e15:.2f} PFLOP per step (executed / model = HFU / MFU: "
                 f"{executed:.2f}, remat and the gradient cache's recomputation)")
    if r["xla_seconds_estimate"]:
        lines.append(f"  time        XLA's estimate {r['xla_seconds_estimate']:.3f} s/step, "
                     f"MFU {r['mfu_at_xla_estimate']:.0%}")
    else:
        lines.append("  time        XLA's cost analysis gives no usable estimate")
    lines.append(f"              compute bound {r['compute_bound_seconds']:.3f} s/step "
                 f"(MFU {r['mfu_at_compute_bound']:.0%} at it)")
    slices = r.get("slices", 1)
    lines.append(f"  collectives per chip and step{' within a slice (ICI)' if slices > 1 else ''} "
                 "(MiB; minimum the sharding implies):")
    for kind in cost.COLLECTIVES:
        c = r["collectives"][kind]
        lines.append(f"              {kind:<19} {c['count']:>5} ops {c['bytes'] / 2**20:>10,.1f} "
                     f"({r['minimum_collective_bytes'][kind] / 2**20:,.1f})")
    if slices > 1:
        lines.append("  between the slices (DCN) per chip and step (MiB; the gradients' reduction "
                     "and the loss's exchange):")
        for kind, c in r["collectives"].items():
            if c["dcn_count"] or r["minimum_dcn_bytes"].get(kind):
                lines.append(f"              {kind:<19} {c['dcn_count']:>5} ops "
                             f"{c['dcn_bytes'] / 2**20:>10,.2f} "
                             f"({r['minimum_dcn_bytes'].get(kind, 0) / 2**20:,.2f})")
    if r.get("global_embedding_arrays"):
        lines.append(f"  gathered B x d embeddings per chip: {r['global_embedding_arrays']}")
    if r["global_square_blocks"]:
        lines.append(f"  WARNING: global B x B blocks in the program: {r['global_square_blocks']}")
    return "\n".join(lines)


def main():
    from absl import flags
    from ml_collections import config_flags

    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-16")   # see the docstring
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    if "JAX_PLATFORMS" not in os.environ:                               # see the docstring
        jax.config.update("jax_platforms", "cpu")
    # Compile-only TPU programs cannot be stored in (or read back from) JAX's persistent
    # compilation cache.
    jax.config.update("jax_enable_compilation_cache", False)
    sys.argv = [a.replace("--find-max-batch", "--find_max_batch", 1) for a in sys.argv]
    config_flag = cli.config_flag()
    flags.DEFINE_string("topology", None, "TPU topology, e.g. v4:4x4x8 (v4-256), v5e:16x16 "
                        "(v5e-256), v5p:4x4x8, v6e:16x16; or GPU hosts, GPU:HOSTSxGPUS, e.g. "
                        "h100:32x8 (256 H100s), h100:1x8, h200:.., a100:.., b200:..")
    flags.DEFINE_integer("slices", 1, "compile for this many TPU slices of --topology, joined "
                         "by the data-centre network (DCN), the mesh's data axis across them")
    flags.DEFINE_bool("find_max_batch", False, "search the largest global batch that fits "
                      "(also spelled --find-max-batch); with --plan, micro-batches too")
    flags.DEFINE_bool("plan", False, "find the mesh, exact loss, remat and micro-batches that "
                      "fit --config.batch_size with the least recomputation, and print the "
                      "overrides")
    flags.DEFINE_float("hbm_gib", None, "HBM per chip, in GiB (default: the chip's; less "
                       "leaves headroom; on GPUs XLA may use 90 percent of it, launch/gpu_env.sh)")
    flags.DEFINE_string("hlo_dir", None, "write the compiled HLO text here")
    flags.DEFINE_bool("json", False, "print the figures as one JSON object on the last line")
    flags.mark_flags_as_required(["config", "topology"])

    def run(argv):
        del argv
        F = flags.FLAGS
        config, name = config_flag.value, config_flags.get_config_filename(F["config"])
        with cli.stop_on(ValueError):     # config_lib.ConfigError is one
            devices, chip = pod.topology_devices(F.topology, F.slices)
            topology = F.topology + (f" x {F.slices} slices" if F.slices > 1 else "")
            if F.hbm_gib:
                chip = dataclasses.replace(chip, hbm_gib=F.hbm_gib)
            validation.validate(config, len(devices))
            sharding.num_slices(config.mesh, devices)     # config.mesh.slices against --slices
        progress = lambda r: print(  # noqa: E731
            f"  batch {r['batch_size']:>9,}, mesh " + "x".join(str(n) for n in r["mesh"].values())
            + f", loss {r['loss']}, remat {r['remat']}, micro-batches {r['micro_batches']}: "
            + _memory_line(r), flush=True)
        if F.find_max_batch:
            largest, reports = pod.find_max_batch(config, devices, chip, on_report=progress,
                                                  micro_rows=pod.FRONTIER_MICRO_ROWS if F.plan
                                                  else None)
            if F.plan and largest:
                with config.unlocked():
                    config.batch_size = largest
            result = {"config": name, "topology": topology, "largest_global_batch": largest,
                      "tried": reports}
            best = [r for r in reports if r["batch_size"] == largest]
            print(f"largest global batch that fits: {largest:,}")
            if best:
                print(format_report(name, topology, best[0]))
                result.update(best[0])
        if F.plan and (largest if F.find_max_batch else True):
            chosen, tried = pod.plan(config, devices, chip, on_report=progress)
            result = {"config": name, "topology": topology, "plan": chosen, "tried": tried,
                      **({"largest_global_batch": largest} if F.find_max_batch else {})}
            if chosen is None:
                resident = pod.resident_bytes_per_chip(train.build(config, devices))
                print(f"no plan fits global batch {config.batch_size:,} on {topology} (the "
                      "leanest exact loss, remat, micro-batches down to one row per shard, "
                      "the FSDP meshes); on the config's mesh the state and the batch each "
                      "chip holds for the whole step are "
                      f"{resident / pod.GIB:,.2f} GiB of a {chip.hbm_gib * chip.memory_fraction:,.1f} "
                      "GiB budget")
                result["resident_bytes_per_chip"] = resident
            else:
                print(format_report(name, topology, chosen))
                print(f"plan: {pod.plan_overrides(chosen, config)}  (recomputation: "
                      f"{chosen['recomputation']} extra forward pass(es) per step)")
                result.update(chosen, overrides=pod.plan_overrides(chosen, config))
        elif not F.find_max_batch:
            result = pod.analyse(config, devices, chip, F.hlo_dir)
            print(format_report(name, topology, result))
            result.update(config=name, topology=topology)
        if F.json:
            print(json.dumps(result))

    cli.run(run)


if __name__ == "__main__":
    main()
