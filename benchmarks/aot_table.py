"""The paper's configs compiled ahead of time for one topology, as a RESULTS.md table.

    python benchmarks/aot_table.py --topology=h100:32x8 [--configs rn50,vit_b16] \\
        [--flag=--config.batch_size=32768 ...] [--per-config rn50x64=--config.micro_batches=8]

Runs `python -m clip_jax.aot --json` once per config (nine paper configs by default), each in
its own process (one after the other: a compile takes the host's cores), with the --flag
entries and the config's --per-config entries, and prints one markdown row per config: the
mesh and micro-batches, memory per chip and whether it fits, the model's PFLOP per step, the
bytes of each collective kind against the minimum the sharding implies, and the command's
CPU seconds and peak resident memory. `--raw FILE` keeps every report as JSON lines.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER = ["rn50", "rn101", "rn50x4", "rn50x16", "rn50x64", "vit_b32", "vit_b16", "vit_l14",
         "vit_l14_336"]
MIB = 2 ** 20


def _mib(x):
    return f"{x / MIB:,.0f}"


def row(name, r, cpu_s, host_gb, extra):
    if r.get("memory_per_chip_bytes") is None:
        return (f"| {name} | {extra} | - | no ({r.get('error', '')[:60]}) | | | | | | "
                f"{cpu_s:.0f} | {host_gb:.1f} |")
    mesh = r["mesh"]
    got, low = r["collective_bytes"], r["minimum_collective_bytes"]
    others = " ".join(f"+{short} {_mib(got[k])}" for k, short in (("collective-permute", "perm"),
                                                                  ("all-to-all", "a2a")) if got[k])
    return (f"| {name} | {mesh['data']} x {mesh['fsdp']}, {r['micro_batches']}{extra} | "
            f"{r['memory_per_chip_bytes'] / 2**30:.2f} | {'yes' if r['fits'] else 'NO'} | "
            f"{r['model_flops'] / 1e15:.2f} | "
            + " | ".join(f"{_mib(got[k])} ({_mib(low[k])})" for k in ("all-gather", "reduce-scatter"))
            + f" | {_mib(got['all-reduce'])} ({_mib(low['all-reduce'])}){(' ' + others) if others else ''} | "
            f"{_mib(sum(got.values()))} ({_mib(sum(low.values()))}) | {cpu_s:.0f} | {host_gb:.1f} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--topology", required=True)
    parser.add_argument("--configs", default=",".join(PAPER))
    parser.add_argument("--flag", action="append", default=[], help="extra clip_jax.aot flag")
    parser.add_argument("--per-config", action="append", default=[],
                        help="NAME=--config.key=value: a flag for one config only")
    parser.add_argument("--raw", help="append each report to this file as a JSON line")
    args = parser.parse_args()
    per = {}
    for item in args.per_config:
        name, flag = item.split("=", 1)
        per.setdefault(name, []).append(flag)
    print("| config | mesh (data x fsdp), micro-batches | GiB per chip | fits | model PFLOP/step | "
          "all-gather MiB (min) | reduce-scatter MiB (min) | all-reduce MiB (min) | total MiB (min) "
          "| command CPU s | host GB |")
    print("|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|", flush=True)
    for name in args.configs.split(","):
        flags = [*args.flag, *per.get(name, [])]
        cmd = [sys.executable, "-m", "clip_jax.aot", f"--config=configs/{name}.py",
               f"--topology={args.topology}", "--json", *flags]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.time()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu_s = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
        if proc.returncode != 0:
            print(f"| {name} | failed: {proc.stderr.strip().splitlines()[-1][:120]} |", flush=True)
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        r.update(command=" ".join(cmd[1:]), wall_seconds=time.time() - t0, cpu_seconds=cpu_s)
        if args.raw:
            with open(args.raw, "a") as f:
                f.write(json.dumps(r) + "\n")
        # ru_maxrss of children is the largest child so far (KiB): each row's is at most that.
        extra = (" (" + " ".join(f.replace("--config.", "") for f in per.get(name, [])) + ")"
                 if per.get(name) else "")
        print(row(name, r, cpu_s, after.ru_maxrss / 2**20, extra), flush=True)


if __name__ == "__main__":
    main()
