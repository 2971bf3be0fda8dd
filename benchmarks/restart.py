"""What a restart costs with and without the persistent compilation cache (`config.compile_cache`).

    python benchmarks/restart.py [--config=configs/smoke.py] [--repeats 3] [--flag=--config.key=value ...]

For each setting (cache off: `--config.compile_cache=`; on: the default, WORKDIR/compile_cache),
`--repeats` times in a fresh workdir: a first invocation trains to step 2 (and fills the cache
when on), then a second invocation resumes and trains one step, to step 3; the second's wall
time, from process start to its exit (start-up, restore, compiles, one step, the final
evaluation, the checkpoint), is the restart's cost. Prints the medians side by side and their
ratio. JAX_COMPILATION_CACHE_DIR is removed from the environment (a run keeps a cache
directory set for JAX). On a pod the compile is minutes rather than seconds; the saving is the
compile time of the train step and of the evaluators.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def invocation(config, workdir, steps, cache, flags):
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    env.setdefault("JAX_PLATFORMS", "cpu")
    cmd = [sys.executable, "-m", "clip_jax.train", f"--config={config}", f"--workdir={workdir}",
           f"--config.total_steps={steps}", "--config.progress=false", *flags]
    if not cache:
        cmd.append("--config.compile_cache=")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(proc.stderr[-3000:])
    return time.perf_counter() - t0


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/smoke.py")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--flag", action="append", default=[], help="extra --config.key=value")
    args = parser.parse_args()
    seconds = {"off": [], "on": []}
    for _ in range(args.repeats):
        for name in ("off", "on"):
            workdir = tempfile.mkdtemp(prefix="clip_jax_restart_")
            try:
                invocation(args.config, workdir, 2, name == "on", args.flag)
                seconds[name].append(invocation(args.config, workdir, 3, name == "on", args.flag))
            finally:
                shutil.rmtree(workdir, ignore_errors=True)
    off, on = statistics.median(seconds["off"]), statistics.median(seconds["on"])
    print(f"restart (resume, one step, evaluation, checkpoint), median of {args.repeats}: "
          f"cache off {off:.1f} s, on {on:.1f} s ({on / off:.2f}x)")
    print(json.dumps({"config": args.config, "seconds": seconds, "median_off": off,
                      "median_on": on}))


if __name__ == "__main__":
    main()
