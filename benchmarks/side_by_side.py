"""clip_jax against OpenCLIP, side by side: `python benchmarks/side_by_side.py [options]`.

For each `--models` entry (clip_jax config name : global batch), the same architecture, batch,
precision and CPU set are trained by OpenCLIP (random init, AdamW with OpenCLIP's training
script's parameter groups, its ClipLoss, the logit-scale clamp) and by clip_jax's real
train step (`python -m clip_jax.benchmark`). Each run is a fresh process pinned to the same
`--threads` CPUs; the two frameworks alternate, `--rounds` times, the order swapped every round so a
drift in machine speed falls on both. Each run times `--steps` steps after `--warmup` on
one fixed batch already in memory (no data loading on either side), blocking on each step.
Printed: per-round samples/s, the medians, and the ratio clip_jax / OpenCLIP of the medians.

Each framework runs as its users run it on a CPU host: clip_jax through `launch/cpu_env.sh`
(XLA:CPU's convolution option and glibc's huge pages; `--plain_env` runs it without), the
OpenCLIP child as it is (huge pages do not change its speed; BUILD_NOTES "Platform ops on CPU").

`--variant NAME=FLAG[,FLAG...]` adds a clip_jax run with those extra flags to every round,
in the same alternation: e.g. `--variant plain=--config.kernels.ops=xla` times the plain model
code beside the CPU kernels (`clip_jax.ops`), and `--variant bare=env` clip_jax without the
CPU launcher. Its ratio to the default clip_jax run is printed beside OpenCLIP's.

Precision: `fp32` runs both in float32; `bf16` runs clip_jax with bfloat16 compute
(float32 parameters) and OpenCLIP under `torch.autocast('cpu', torch.bfloat16)`, which is
what each framework's mixed precision does.

Needs the `parity` extra (`pip install -e '.[test,parity]'`: torch, open_clip_torch).
"""
import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys

from clip_jax.benchmark.timing import timings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# clip_jax config name -> OpenCLIP model name (the OpenAI architectures use QuickGELU).
OPEN_CLIP_NAMES = {
    "rn50": "RN50-quickgelu", "rn101": "RN101-quickgelu", "rn50x4": "RN50x4-quickgelu",
    "rn50x16": "RN50x16-quickgelu", "rn50x64": "RN50x64-quickgelu",
    "vit_b32": "ViT-B-32-quickgelu", "vit_b16": "ViT-B-16-quickgelu",
    "vit_l14": "ViT-L-14-quickgelu", "vit_l14_336": "ViT-L-14-336-quickgelu",
}


def openclip_run(name, batch, steps, warmup, threads, precision):
    """Samples/s of OpenCLIP's training step (as open_clip_train's train_one_epoch runs it)."""
    import torch
    import open_clip
    from open_clip.loss import ClipLoss
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = open_clip.create_model(OPEN_CLIP_NAMES[name], pretrained=None, output_dict=True)
    model.train()
    # open_clip_train/main.py: no weight decay on gains, biases and the logit scale.
    exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [{"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
         {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": 0.2}],
        lr=5e-4, betas=(0.9, 0.98), eps=1e-6)
    loss_fn = ClipLoss()
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    images = torch.randn(batch, 3, size, size)
    texts = torch.randint(1, model.vocab_size, (batch, model.context_length))
    autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16"
                else torch.autocast("cpu", enabled=False))

    def step():
        optimizer.zero_grad()
        with autocast:
            out = model(images, texts)
            loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        return float(loss)        # a host sync, like clip_jax's block_until_ready

    times = timings(step, steps, warmup=warmup)
    return {"samples_per_sec": batch * steps / sum(times),
            "step_seconds_median": statistics.median(times),
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "open_clip": open_clip.__version__}


def _pinned(threads):
    cpus = sorted(os.sched_getaffinity(0))[:threads]
    return lambda: os.sched_setaffinity(0, cpus)


def _last_json(out):
    return json.loads(out.strip().splitlines()[-1])


def run_openclip(name, batch, args):
    cmd = [sys.executable, __file__, "--child", "--models", f"{name}:{batch}", "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--threads", str(args.threads), "--precision", args.precision]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, preexec_fn=_pinned(args.threads))
    return _last_json(out.stdout)


def run_clip_jax(name, batch, args, extra=()):
    """`extra`: further benchmark flags; the word 'env' among them drops launch/cpu_env.sh."""
    dtype = "bfloat16" if args.precision == "bf16" else "float32"
    launcher = [] if args.plain_env or "env" in extra else [os.path.join(ROOT, "launch", "cpu_env.sh")]
    cmd = [*launcher, sys.executable, "-m", "clip_jax.benchmark", f"--config=configs/{name}.py",
           f"--config.batch_size={batch}", f"--config.model.dtype={dtype}",
           f"--config.model.remat={args.remat}",
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--repeats", "1", "--json",
           *args.clip_jax_flags, *(f for f in extra if f != "env")]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT,
                         preexec_fn=_pinned(args.threads))
    return _last_json(out.stdout)


def compare(name, batch, args):
    sides = [("openclip", run_openclip), ("clip_jax", run_clip_jax)] + [
        (label, lambda n, b, a, flags=flags: run_clip_jax(n, b, a, flags))
        for label, flags in args.variants]
    runs = {side: [] for side, _ in sides}
    for r in range(args.rounds):
        for side, fn in (sides if r % 2 == 0 else sides[::-1]):
            result = fn(name, batch, args)
            runs[side].append(result)
            print(f"  {name} batch {batch} round {r + 1}: {side:8s} "
                  f"{result['samples_per_sec']:.2f} samples/s", flush=True)
    med = {side: statistics.median(r["samples_per_sec"] for r in rs) for side, rs in runs.items()}
    return {"model": name, "batch": batch, "precision": args.precision, "threads": args.threads,
            "openclip_samples_per_sec": med["openclip"], "clip_jax_samples_per_sec": med["clip_jax"],
            "ratio": med["clip_jax"] / med["openclip"],
            "clip_jax_mfu": statistics.median(r["mfu"] for r in runs["clip_jax"]),
            "variants": {label: {"samples_per_sec": med[label],
                                 "clip_jax_over_variant": med["clip_jax"] / med[label]}
                         for label, _ in args.variants},
            "rounds": {side: [r["samples_per_sec"] for r in rs] for side, rs in runs.items()}}


def _variant(text):
    """'LABEL=FLAG[,FLAG...]' -> (LABEL, flags); flags start with -- (or are 'env'), so
    `--config.kernels.cpu_ops_off=a,b` keeps its comma."""
    label, flags = text.split("=", 1)
    return label, tuple(re.split(r",(?=--|env(?:,|$))", flags))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="vit_b32:32,rn50:16",
                        help="comma-separated CONFIG:BATCH (configs/CONFIG.py, global batch)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating runs per framework")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per run (after compiling)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="CPUs each run is pinned to (and torch's thread count)")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--remat", action="store_true",
                        help="clip_jax rematerialises its residual blocks (default: off, as OpenCLIP "
                             "runs without gradient checkpointing)")
    parser.add_argument("--clip_jax_flag", action="append", default=[], dest="clip_jax_flags",
                        help="an extra flag for python -m clip_jax.benchmark, written with '=': "
                             "--clip_jax_flag=--config.data.workers=0 (repeatable)")
    parser.add_argument("--plain_env", action="store_true",
                        help="run clip_jax without launch/cpu_env.sh")
    parser.add_argument("--variant", action="append", default=[], dest="variants",
                        type=_variant,
                        help="LABEL=FLAG[,FLAG...]: another clip_jax run per round with these extra "
                             "flags ('env': without launch/cpu_env.sh), e.g. plain=--config.kernels.ops=xla; "
                             "a comma not followed by -- or env stays inside its flag's value")
    parser.add_argument("--json", action="store_true", help="print all results as JSON on the last line")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    models = [(m.split(":")[0], int(m.split(":")[1])) for m in args.models.split(",")]
    if args.child:
        (name, batch), = models
        print(json.dumps(openclip_run(name, batch, args.steps, args.warmup, args.threads, args.precision)))
        return
    results = []
    for name, batch in models:
        results.append(compare(name, batch, args))
    print(f"\n{args.precision}, {args.threads} threads, medians over {args.rounds} alternating runs "
          f"of {args.steps} steps")
    print("| model | batch | OpenCLIP samples/s | clip_jax samples/s | ratio | clip_jax MFU |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['model']} | {r['batch']} | {r['openclip_samples_per_sec']:.2f} | "
              f"{r['clip_jax_samples_per_sec']:.2f} | {r['ratio']:.2f}x | {100 * r['clip_jax_mfu']:.0f}% |")
        for label, v in r["variants"].items():
            print(f"  clip_jax [{label}]: {v['samples_per_sec']:.2f} samples/s; clip_jax / "
                  f"[{label}] = {v['clip_jax_over_variant']:.2f}x")
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
