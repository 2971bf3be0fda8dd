"""`python -m clip_jax.summary --config=configs/X.py [--json] [--devices N] [--nomemory]`.

Reports, without allocating any parameter (everything is traced abstractly):
- parameters per tower and in total (image = the whole image tower incl. its projection,
  text = the rest, total adds the temperature), as the paper's table counts them;
- GFLOPs per image and per text (forward, one example) from XLA's cost analysis;
- the tokenizer (`data.tokenizer`) and its number of ids (the paper configs: CLIP's BPE,
  49,408; a SentencePiece model still to be trained on the run's captions: its limit);
- a per-device memory estimate for the configured mesh and batch: training state
  (float32 params + grads + two AdamW moments = 16 bytes/param, split over the
  fsdp x model shards) plus activations per example from XLA's memory analysis of the
  compiled forward+backward at two small batches, scaled to the local (micro-)batch.
  XLA:CPU assigns buffers less tightly than the TPU compiler, so this is an upper bound
  (several times what `clip_jax.aot` finds for a TPU slice: BUILD_NOTES); use `aot` to
  size a pod run.
With --json the last line printed is one JSON object.
"""
import json
import math

import jax

from clip_jax import cli, config_lib, cost, losses, models, sharding, validation
from clip_jax.data import tokenizer
from clip_jax.models import abstract_variables, count_params, encoder_fns, input_specs


def gflops(model, model_cfg, variables):
    """Forward GFLOPs of one image and of one text (XLA's cost analysis; `model` unrolled)."""
    img, txt = input_specs(model_cfg)
    enc_i, enc_t = encoder_fns(model)
    flops = lambda lowered: cost.xla_cost(lowered)["flops"] / 1e9
    return {"image": flops(enc_i.lower(variables, img)), "text": flops(enc_t.lower(variables, txt))}


def activation_bytes(model, model_cfg, variables, batch):
    """XLA's temp-buffer size for forward+backward of the loss at `batch` examples."""
    img, txt = input_specs(model_cfg, batch)

    def loss(params, other, images, tokens):   # `other`: BatchNorm statistics (ResNets)
        out, _ = model.apply({**other, "params": params}, images, tokens, train=True,
                             mutable=list(other))
        return losses.clip_loss_naive(out["image_embeds"], out["text_embeds"], out["logit_scale"])

    other = {k: v for k, v in variables.items() if k != "params"}
    compiled = jax.jit(jax.grad(loss)).lower(variables["params"], other, img, txt).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def memory_estimate(config, model, variables, n_params, num_devices):
    shape = dict(zip(sharding.MESH_AXES, sharding.mesh_shape(config.mesh, num_devices)))
    batch_shards = math.prod(shape[a] for a in sharding.batch_axes(config.sharding_rules))
    local_batch = config.batch_size // batch_shards
    state_bytes = 16 * n_params / (shape["fsdp"] * shape["model"])
    # With micro-batches (the gradient cache) the towers hold one micro-batch's activations.
    micro_batch = max(local_batch // int(config.get("micro_batches", 1)), 1)
    a1, a2 = (activation_bytes(model, config.model, variables, b) for b in (1, 2))
    per_example = max(a2 - a1, 0)
    act = a1 + per_example * (micro_batch - 1)
    # The sharded loss holds two B_local x B float32 logit blocks (and their grads).
    logits = 4 * 4 * local_batch * config.batch_size
    return {"devices": num_devices, "mesh": shape, "local_batch": local_batch,
            "micro_batch": micro_batch,
            "state_gib": state_bytes / 2**30, "activations_gib": act / 2**30,
            "logits_gib": logits / 2**30,
            "total_gib": (state_bytes + act + logits) / 2**30,
            "activation_mib_per_example": per_example / 2**20}


def summarize(config, memory=True, num_devices=None):
    config = config.copy_and_resolve_references()
    with config.unlocked():
        config.model = cost.unrolled(config.model)
    model_cfg = config.model
    model = models.from_config(config)
    variables = abstract_variables(model, model_cfg)
    counts = count_params(variables["params"])
    out = {"params": counts, "gflops": gflops(model, model_cfg, variables),
           "tokenizer": tokenizer.describe(config)}
    if memory:
        out["memory"] = memory_estimate(config, model, variables, counts["total"],
                                        num_devices or jax.device_count())
    return out


def format_summary(name, s):
    p, g = s["params"], s["gflops"]
    lines = [f"{name}",
             f"  parameters  image {p['image']:>13,}  text {p['text']:>13,}  total {p['total']:>13,}",
             f"  GFLOPs      per image {g['image']:.2f}  per text {g['text']:.3f}"]
    t = s["tokenizer"]
    ids = f"{t['vocab_size']:,} ids" if t["vocab_size"] else "ids set when trained"
    lines.append(f"  tokenizer   {t['name']}, {ids}: {t['note']}")
    if "memory" in s:
        m = s["memory"]
        mesh = " x ".join(f"{k}={v}" for k, v in m["mesh"].items())
        micro = f" (micro-batch {m['micro_batch']})" if m["micro_batch"] != m["local_batch"] else ""
        lines.append(f"  memory      {m['devices']} devices ({mesh}), local batch {m['local_batch']}"
                     f"{micro}: ~{m['total_gib']:.2f} GiB/device (state {m['state_gib']:.2f}, "
                     f"activations {m['activations_gib']:.2f}, logits {m['logits_gib']:.2f})")
        lines.append("              an upper bound from XLA:CPU's buffers (several times a TPU's); "
                     "`python -m clip_jax.aot` compiles the step for a TPU slice")
    return "\n".join(lines)


def main():
    from absl import flags
    config_flag = cli.config_flag()
    flags.DEFINE_bool("json", False, "Also print the figures as one JSON object (last line).")
    flags.DEFINE_bool("memory", True, "Estimate per-device memory (compiles fwd+bwd; slower).")
    flags.DEFINE_integer("devices", None, "Device count to size the mesh for (default: the "
                         "devices visible here). E.g. 256 for a v4-512 pod slice.")
    flags.mark_flags_as_required(["config"])

    def run(argv):
        del argv
        F = flags.FLAGS
        config = config_flag.value
        with cli.stop_on(config_lib.ConfigError):
            validation.validate(config, F.devices or jax.device_count())
        s = summarize(config, memory=F.memory, num_devices=F.devices)
        print(format_summary(F.config, s))
        if F.json:
            print(json.dumps(s))

    cli.run(run)


if __name__ == "__main__":
    main()
