"""What each XLA GPU flag of launch/gpu_env.sh changes in the compiled train step, on a CPU host.

    python benchmarks/gpu_flags.py --config=configs/vit_b16.py --topology=h100:4x8 \\
        [--batch 8192] [--set key=value ...]

Compiles the trainer's own step for GPU hosts (`clip_jax.pod`, no GPU needed) once with
XLA's defaults and once per variant (`VARIANTS`: a flag, or several, as per-compile XLA
options; the same DebugOptions that XLA_FLAGS sets) and prints, side by side: memory per
GPU, each collective kind's op count and bytes, and how the collectives are scheduled
against compute: of the asynchronous collectives (a `-start` ... `-done` pair), how many
have compute (fusions, cuBLAS/cuDNN calls) scheduled between their start and done, i.e.
overlap it, and how many wait with nothing to hide behind. Nothing here times a kernel:
without a GPU XLA cannot autotune, so speeds are not what a GPU runs.
"""
import argparse
import json
import os
import re
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# name -> XLA options added to clip_jax.pod.GPU_COMPILER_OPTIONS.
VARIANTS = {
    "defaults": {},
    "latency_hiding_scheduler": {"xla_gpu_enable_latency_hiding_scheduler": True},
    "no_latency_hiding_scheduler": {"xla_gpu_enable_latency_hiding_scheduler": False},
    "combine_all_reduce_1GiB": {"xla_gpu_all_reduce_combine_threshold_bytes": 2 ** 30},
    "pipelined_collectives": {"xla_gpu_enable_pipelined_all_gather": True,
                              "xla_gpu_enable_pipelined_reduce_scatter": True,
                              "xla_gpu_enable_pipelined_all_reduce": True},
    "highest_priority_async_stream": {"xla_gpu_enable_highest_priority_async_stream": True},
}

_COMPUTE = re.compile(r"\b(fusion|custom-call|convolution|dot)\(")
_START = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=.*?\s([a-z\-]+)-start\(")
_DONE = re.compile(r"\s([a-z\-]+)-done\(\s*(?:[^%]*\s)?%?([\w.\-]+)")


def schedule_overlap(hlo):
    """{'async': pairs, 'overlapped': pairs with compute between start and done} over every
    computation of the scheduled module (instruction order is the schedule)."""
    pairs = overlapped = 0
    open_starts = {}
    for line in hlo.splitlines():
        if line.rstrip().endswith("{") and not line.startswith(" "):
            open_starts = {}
            continue
        m = _START.match(line)
        if m:
            open_starts[m.group(1)] = 0
            continue
        d = _DONE.search(line)
        if d and d.group(2) in open_starts:
            pairs += 1
            overlapped += open_starts.pop(d.group(2)) > 0
            continue
        if _COMPUTE.search(line):
            for name in open_starts:
                open_starts[name] += 1
    return {"async": pairs, "overlapped": overlapped}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/vit_b16.py")
    parser.add_argument("--topology", default="h100:4x8")
    parser.add_argument("--batch", type=int, default=8192)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--set", action="append", default=[], help="config override key=value")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from clip_jax import cli, cost, pod
    config = cli.load_config_file([f"--config={args.config}"])
    for item in [f"batch_size={args.batch}", *args.set]:
        key, value = item.split("=", 1)
        *parents, leaf = key.split(".")
        node = config
        for parent in parents:
            node = node[parent]
        current = node[leaf]
        node[leaf] = value.lower() in ("1", "true") if isinstance(current, bool) else type(current)(value)
    devices, chip = pod.topology_devices(args.topology)
    rows = []
    for name in args.variants.split(","):
        options = {**pod.GPU_COMPILER_OPTIONS, **VARIANTS[name]}
        t0 = time.perf_counter()
        _, compiled = pod.compile_step(config, devices, options)
        hlo = compiled.as_text()
        mem = compiled.memory_analysis()
        used = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
                + mem.temp_size_in_bytes + mem.generated_code_size_in_bytes)
        row = {"variant": name, "options": VARIANTS[name], "gib_per_gpu": used / pod.GIB,
               "collectives": cost.collective_bytes(hlo), **schedule_overlap(hlo),
               "compile_seconds": time.perf_counter() - t0}
        rows.append(row)
        coll = " ".join(f"{k}={v['count']}/{v['bytes'] / 2**20:.0f}MiB"
                        for k, v in row["collectives"].items() if v["count"])
        print(f"{name:<32} {row['gib_per_gpu']:6.2f} GiB  async {row['async']:>3}, overlapped "
              f"{row['overlapped']:>3}  {coll}  ({row['compile_seconds']:.0f} s)", flush=True)
    if args.json:
        print(json.dumps(rows))


if __name__ == "__main__":
    main()
