"""Step time against device count, and the input pipeline against the step's appetite.

    python benchmarks/scaling.py [--configs smoke,vit_b32:32] [--devices 1,2,4,8] [--steps N]

For each config (NAME or NAME:GLOBAL_BATCH) and device count D, runs
`python -m clip_jax.benchmark` in a fresh process with D simulated CPU devices
(XLA_FLAGS=--xla_force_host_platform_device_count=D; the global batch is split over them,
mesh data=D) and reports the median step time. On one CPU all D devices share the same cores,
so this measures what sharding costs (partitioned programs, collectives, per-device
overheads), not a speed-up. Then, per config, `python -m clip_jax.benchmark data` times the
host input pipeline (read, decode, crop, tokenise) with each of --workers, and prints its
images/s beside the 1-device step's samples/s: the pipeline keeps up when its figure is the
larger one. Extra `--flag=--config.key=value` entries go to every benchmark run.
"""
import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def bench(args, env_devices=None, mode=None):
    env = dict(os.environ)
    if env_devices:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                            f" --xla_force_host_platform_device_count={env_devices}").strip()
    cmd = [sys.executable, "-m", "clip_jax.benchmark", *([mode] if mode else []), *args, "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    if out.returncode != 0:     # e.g. killed for memory: 8 replicas of a large state
        print(f"  failed ({'killed' if out.returncode < 0 else 'exit'} {abs(out.returncode)}): "
              f"{' '.join(cmd[2:])}\n  {out.stderr.strip()[-300:]}", flush=True)
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default="smoke,vit_b32:32",
                        help="comma-separated NAME[:GLOBAL_BATCH] of configs/NAME.py")
    parser.add_argument("--devices", default="1,2,4,8", help="simulated device counts")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per repeat")
    parser.add_argument("--repeats", type=int, default=3, help="timing windows (median reported)")
    parser.add_argument("--workers", default="0,2", help="data: Grain worker counts")
    parser.add_argument("--flag", action="append", default=[],
                        help="extra flag for every benchmark run, e.g. --flag=--config.model.remat=False")
    args = parser.parse_args()
    rows, data_rows = [], []
    for entry in args.configs.split(","):
        name, _, batch = entry.partition(":")
        common = [f"--config=configs/{name}.py", *([f"--config.batch_size={batch}"] if batch else []),
                  *args.flag]
        base, consumption = None, float("nan")
        for d in [int(x) for x in args.devices.split(",")]:
            r = bench([*common, "--steps", str(args.steps), "--repeats", str(args.repeats),
                       "--warmup", "1", "--peak_tflops", "1"], env_devices=d)
            if r is None:
                continue
            base = base or r["step_seconds_median"]
            rows.append((name, r["batch_size"], d, r["step_seconds_median"], r["samples_per_sec"],
                         r["step_seconds_median"] / base))
            print(f"{name} batch {r['batch_size']} on {d} devices: step {r['step_seconds_median'] * 1e3:.1f} ms, "
                  f"{r['samples_per_sec']:.1f} samples/s", flush=True)
            if d == 1:
                consumption = r["samples_per_sec"]
        data = bench([*common, "--batches", "10", "--repeats", str(args.repeats), "--workers", args.workers],
                     mode="data")
        if data is None:
            continue
        for w, figures in data["workers"].items():
            data_rows.append((name, data["batch_size"], data["image_size"], w, figures["images_per_sec"],
                              consumption))
    print("\n| config | global batch | devices | step median (ms) | samples/s | step time vs 1 device |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, b, d, step, sps, rel in rows:
        print(f"| {name} | {b} | {d} | {step * 1e3:.1f} | {sps:.1f} | {rel:.2f}x |")
    print("\n| config | batch | image size | workers | pipeline images/s | 1-device step samples/s |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, b, size, w, ips, sps in data_rows:
        print(f"| {name} | {b} | {size} | {w} | {ips:.0f} | {sps:.1f} |")


if __name__ == "__main__":
    main()
