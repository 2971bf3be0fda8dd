"""Where a train step's time goes: `python benchmarks/profile_step.py --config=configs/X.py [--top N] [--config.key=value ...]`.

Compiles the config's train step, runs it twice, then traces one step with
`jax.profiler.trace` (XLA:CPU thunks are traced because this script sets
`--xla_cpu_enable_xprof_traceme=true` before JAX starts). Prints the op time summed by
HLO op kind and by model layer (the compiled HLO's `op_name` metadata; a tower's stacked
blocks share one name, `resblocks`, `layer3_rest`; per-block indices are folded, `resblocks_*`),
with XLA's FLOPs per step. Op times are per thread: on CPU
several run at once, so their sum exceeds the step's wall time. XLA:CPU's `convolution`
thunks show as sub-millisecond events (their work is booked to what runs beside them), so
the tables understate convolutions. The raw trace stays in
--trace_dir for Perfetto (ui.perfetto.dev) or TensorBoard.
"""
import os

if __name__ == "__main__":     # before JAX starts; not when the helpers are imported
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true").strip()

import collections  # noqa: E402
import glob  # noqa: E402
import gzip  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import tempfile  # noqa: E402

import jax  # noqa: E402

from clip_jax import cli, cost, train  # noqa: E402
from clip_jax.benchmark.timing import timed  # noqa: E402
from clip_jax.benchmark.train import synthetic_batch  # noqa: E402

_SKIP = ("ThunkExecutor", "$", "SlinkyThreadPool", "end:", "PjitFunction", "CommonPjRt",
         "ParseArguments", "Handle inputs")


def op_names(hlo_text):
    """{instruction name: op_name metadata} of a compiled module's text."""
    return dict(re.findall(r"%([\w.\-]+) = \S+ .*?op_name=\"([^\"]*)\"", hlo_text))


def summarize(trace_file, names):
    """(op time by HLO op kind, op time by layer) in microseconds, from a perfetto trace."""
    events = json.load(gzip.open(trace_file))
    events = events["traceEvents"] if isinstance(events, dict) else events
    by_kind, by_layer = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("ph") != "X" or e["name"].startswith(_SKIP):
            continue
        by_kind[re.sub(r"\.\d+$", "", e["name"])] += e.get("dur", 0)
        op = names.get(e["name"], "?")
        op = re.sub(r"resblocks_\d+", "resblocks_*", re.sub(r"layer(\d)_\d+", r"layer\1_*", op))
        direction = "backward" if "transpose(" in op else "forward"
        parts = [p for p in op.split("/") if not p.startswith(("jit(", "jvp(", "transpose(", "vmap("))]
        by_layer[f"{direction:8s} {'/'.join(parts[-3:])}"] += e.get("dur", 0)
    return by_kind, by_layer


def main():
    from absl import flags
    config_flag = cli.config_flag()
    flags.DEFINE_integer("top", 25, "rows per table")
    flags.DEFINE_string("trace_dir", None, "where the trace goes (default: a new temporary directory)")
    flags.mark_flags_as_required(["config"])

    def run(argv):
        del argv
        config, top = config_flag.value, flags.FLAGS.top
        trace_dir = flags.FLAGS.trace_dir or tempfile.mkdtemp(prefix="clip_jax_profile_")
        built = train.build(config)
        batch = synthetic_batch(built)
        state = built.init_state()
        with built.context():
            compiled = built.train_step.lower(state, batch).compile()
            for _ in range(2):
                state, m = compiled(state, batch)
            jax.block_until_ready(m)
            with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
                _, wall = timed(lambda: jax.block_until_ready(compiled(state, batch)))
        trace_file = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)[0]
        by_kind, by_layer = summarize(trace_file, op_names(compiled.as_text()))
        total = sum(by_kind.values())
        print(f"step {wall * 1e3:.0f} ms wall (traced), {total / 1e3:.0f} ms op time; "
              f"{cost.step_flops(config) / built.mesh.size / 1e9:.0f} GFLOP per step per device "
              f"(XLA cost analysis); trace: {trace_file}")
        for title, table in (("HLO op kind", by_kind), ("layer", by_layer)):
            print(f"\nop time by {title}:")
            for key, us in table.most_common(top):
                print(f"  {us / 1e3:9.1f} ms {100 * us / total:5.1f}%  {key[:110]}")

    cli.run(run)


if __name__ == "__main__":
    main()
