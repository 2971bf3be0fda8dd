"""Residual blocks alone, forward + backward: `python benchmarks/blocks.py [--dtype bfloat16]
[--width 768 --heads 12 --tokens 50 --batch 32 --layers 2 --runs 7] [--ops cpu|xla]`.

Times the jitted gradient of `layers.Transformer` (ViT-B/32's image blocks by default) and
prints the median time and GFLOP/s (XLA's cost analysis). It isolates the dense layers from
the rest of the step (embeddings, loss, optimiser): layer-level changes are compared with
it before whole steps are timed.
"""
import argparse

import jax
import jax.numpy as jnp
import numpy as np

from clip_jax import cost
from clip_jax.benchmark import timing
from clip_jax.models import layers
from clip_jax.ops import PLAIN, cpu


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                        help="compute dtype (parameters stay float32)")
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--tokens", type=int, default=50, help="sequence length")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--causal", action="store_true", help="causal attention (text tower)")
    parser.add_argument("--runs", type=int, default=7, help="timed runs after one warm-up")
    parser.add_argument("--ops", default="cpu", choices=("cpu", "xla"),
                        help="the XLA:CPU kernels (clip_jax.ops.cpu) or the plain model code")
    args = parser.parse_args()

    model = layers.Transformer(width=args.width, layers=args.layers, heads=args.heads,
                               causal=args.causal, dtype=jnp.dtype(args.dtype),
                               ops=cpu.CpuOps() if args.ops == "cpu" else PLAIN)
    x = jax.random.normal(jax.random.key(0), (args.batch, args.tokens, args.width))
    params = jax.jit(model.init)(jax.random.key(1), x)
    loss = lambda p, x: jnp.sum(model.apply(p, x).astype(jnp.float32) ** 2)
    compiled = jax.jit(jax.grad(loss)).lower(params, x).compile()
    flops = float(cost.xla_cost(compiled).get("flops", 0.0))
    times = timing.timings(lambda: jax.block_until_ready(compiled(params, x)), args.runs)
    median = float(np.median(times))
    print(f"{args.layers} blocks, width {args.width}, {args.batch}x{args.tokens} tokens, {args.dtype}, "
          f"ops {args.ops}: "
          f"median {median * 1e3:.1f} ms (min {min(times) * 1e3:.1f}), "
          f"{flops / median / 1e9:.0f} GFLOP/s ({flops / 1e9:.1f} GFLOP per step)")


if __name__ == "__main__":
    main()
