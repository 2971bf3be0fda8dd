"""Training: `python -m clip_jax.train --config=configs/X.py --workdir=DIR [--config.key=value ...]`.

Library functions (`create_train_state`, `make_train_step`, `train`) over pytrees;
`main` is a thin command line. Parameters are created directly sharded
(`jit(init, out_shardings=...)`), so the full model never sits on one device.
"""
import contextlib
import dataclasses
import json
import os
import sys
import time

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from clip_jax import config_lib, evaluate, losses, metrics, optim, sharding
from clip_jax.models import build_model, input_specs


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: dict
    batch_stats: dict     # BatchNorm running statistics (ResNets); {} for ViTs
    opt_state: optax.OptState


def _variables(params, batch_stats):
    return {"params": params, "batch_stats": batch_stats} if batch_stats else {"params": params}


def create_train_state(config, model, tx, mesh, rules, rng):
    """Initialises the state sharded on `mesh`. Returns (state, state_shardings)."""
    images, tokens = (jnp.zeros(x.shape, x.dtype) for x in input_specs(config.model))

    def init_boxed(rng):
        return model.init(rng, images, tokens, train=False)

    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        abstract = jax.eval_shape(init_boxed, rng)
        var_shardings = sharding.logical_to_sharding(abstract, mesh, rules)
        param_shardings = var_shardings["params"]
        abstract_params = sharding.unbox_abstract(abstract)["params"]
        abstract_opt = jax.eval_shape(tx.init, abstract_params)
        opt_shardings = optax.tree_map_params(
            tx, lambda _, s: s, abstract_opt, param_shardings,
            transform_non_params=lambda _: sharding.replicated(mesh))
        shardings = TrainState(
            step=sharding.replicated(mesh), params=param_shardings,
            batch_stats=var_shardings.get("batch_stats", {}), opt_state=opt_shardings)

        def init_state(rng):
            variables = nn.unbox(init_boxed(rng))
            return TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                              batch_stats=variables.get("batch_stats", {}),
                              opt_state=tx.init(variables["params"]))

        state = jax.jit(init_state, out_shardings=shardings,
                        compiler_options=_cheap_compile_options())(rng)
    return state, shardings


def _cheap_compile_options():
    """XLA options for one-off programs (parameter init): optimising them costs more than it saves.

    On CPU, the random-init program of a small ResNet took ~25 s to compile at the default
    optimisation level, and ~1 s with these options. Other backends keep their defaults.
    """
    if jax.default_backend() != "cpu":
        return None
    return {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def make_train_step(config, model, tx, schedule, mesh, rules, state_shardings):
    """One jitted step: forward, sharded contrastive loss, AdamW update. State is donated."""
    loss_fn = losses.get_loss(config.loss.name)
    batch_axes = sharding.batch_axes(rules)
    has_bn = config.model.vision.kind == "resnet"

    def step_fn(state, batch):
        def objective(params):
            out, updates = model.apply(
                _variables(params, state.batch_stats), batch["images"], batch["tokens"],
                train=True, mutable=["batch_stats"] if has_bn else [])
            loss = loss_fn(out["image_embeds"], out["text_embeds"], out["logit_scale"],
                           mesh, batch_axes)
            return loss, (updates.get("batch_stats", {}), out["logit_scale"])

        (loss, (batch_stats, scale)), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optim.clip_logit_scale(optax.apply_updates(state.params, updates))
        new_state = TrainState(step=state.step + 1, params=params, batch_stats=batch_stats,
                               opt_state=opt_state)
        step_metrics = {"loss": loss, "logit_scale": scale, "temperature": 1.0 / scale,
                        "lr": schedule(state.step), "grad_norm": optax.global_norm(grads)}
        return new_state, step_metrics

    data_sharding = sharding.batch_sharding(mesh, rules)
    return jax.jit(step_fn,
                   in_shardings=(state_shardings, {"images": data_sharding, "tokens": data_sharding}),
                   out_shardings=(state_shardings, sharding.replicated(mesh)),
                   donate_argnums=0)


class ZeroShotEvaluator:
    """Held-out synthetic zero-shot, run every `eval_every` steps and at the end."""

    def __init__(self, config, model, tokenizer, mesh, rules):
        from clip_jax.data import pipeline, synthetic
        self.images, self.labels = pipeline.heldout_batches(config, tokenizer, config.data.synthetic.num_eval)
        self.tasks = synthetic.zeroshot_tasks()
        self.tokenizer = tokenizer
        self.batch = max(sharding.num_batch_shards(mesh, rules),
                         min(256, config.batch_size) // sharding.num_batch_shards(mesh, rules)
                         * sharding.num_batch_shards(mesh, rules))
        self.data_sharding = sharding.batch_sharding(mesh, rules)
        self._state = None
        self.encode_image, self.encode_text = evaluate.make_encoders(
            model, lambda: _variables(self._state.params, self._state.batch_stats))

    def __call__(self, state):
        self._state = state
        try:
            return evaluate.synthetic_zeroshot(
                self.encode_image, self.encode_text, self.tokenizer, self.images, self.labels,
                self.tasks, batch_size=self.batch, sharding=self.data_sharding)
        finally:
            self._state = None


@dataclasses.dataclass
class Run:
    """What a training step needs; run it under `context()` (mesh + logical-axis rules)."""
    mesh: jax.sharding.Mesh
    rules: tuple
    model: nn.Module
    state: TrainState
    state_shardings: TrainState
    train_step: callable

    def context(self):
        return mesh_context(self.mesh, self.rules)


def mesh_context(mesh, rules):
    """`with` this: the mesh and the logical-axis rules that tracing the model needs."""
    stack = contextlib.ExitStack()
    stack.enter_context(jax.set_mesh(mesh))
    stack.enter_context(nn.logical_axis_rules(rules))
    return stack


def build(config):
    """Mesh, model, optimiser, the sharded initial state and the jitted step of `config`."""
    mesh = sharding.make_mesh(config.mesh)
    rules = tuple(tuple(r) for r in config.sharding_rules)
    model = build_model(config.model)
    tx, schedule = optim.make_optimizer(config.optim, config.total_steps)
    with mesh_context(mesh, rules):
        state, state_shardings = create_train_state(
            config, model, tx, mesh, rules, jax.random.key(config.seed))
        train_step = make_train_step(config, model, tx, schedule, mesh, rules, state_shardings)
    return Run(mesh, rules, model, state, state_shardings, train_step)


def train(config, workdir):
    """Trains per `config`, writing metrics to `workdir`. Returns the last logged metrics."""
    from tqdm import tqdm
    from clip_jax.data import pipeline, tokenizer as tokenizer_lib

    config_lib.validate(config, jax.device_count())
    os.makedirs(workdir, exist_ok=True)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))

    try:   # opens the data source too (a workdir tokenizer is trained on its captions)
        tokenizer = tokenizer_lib.get_tokenizer(config, workdir)
    except (ValueError, OSError) as e:
        raise config_lib.ConfigError(str(e)) from None

    run = build(config)
    mesh, rules, model = run.mesh, run.rules, run.model
    state, run.state = run.state, None    # the loop owns the state (each step donates it)
    with run.context():
        train_step = run.train_step
        data = pipeline.make_train_iterator(config, tokenizer, sharding.batch_sharding(mesh, rules))
        # The held-out zero-shot evaluation belongs to the synthetic data; the evaluation
        # issue adds evaluators for other data.
        evaluator = (ZeroShotEvaluator(config, model, tokenizer, mesh, rules)
                     if config.data.source == "synthetic" else None)
        writer = metrics.MetricWriter(workdir)
        n_params = sum(x.size for x in jax.tree.leaves(state.params))
        print(f"clip_jax: mesh {sharding.describe(mesh)}; {n_params:,} parameters; "
              f"global batch {config.batch_size}; workdir {workdir}", flush=True)

        bar = tqdm(total=config.total_steps, disable=not config.progress or jax.process_index() != 0,
                   desc="train", dynamic_ncols=True, file=sys.stdout)
        last = {}
        t_last, step_last = time.perf_counter(), 0
        data_wait = 0.0       # seconds spent waiting for batches since the last log
        in_flight = None      # the previous step's loss
        for step in range(1, config.total_steps + 1):
            t_data = time.perf_counter()
            batch = next(data)
            data_wait += time.perf_counter() - t_data
            state, step_metrics = train_step(state, batch)
            # At most two steps in flight: the device always has the next step queued, the
            # host never runs further ahead (each queued step holds its batch in device
            # memory), and the time spent in next(data) is time the device may idle.
            jax.block_until_ready(in_flight)
            in_flight = step_metrics["loss"]
            if step == 1:
                jax.block_until_ready(step_metrics)   # one-time: keep compilation out of samples/s
                last["compile_s"] = time.perf_counter() - t_last
                t_last, step_last, data_wait = time.perf_counter(), 1, 0.0
            bar.update(1)
            is_eval = step == config.total_steps or (config.eval_every and step % config.eval_every == 0)
            if step % config.log_every == 0 or is_eval:
                record = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
                now = time.perf_counter()
                if step > step_last:
                    record["samples_per_sec"] = (step - step_last) * config.batch_size / (now - t_last)
                    record["data_wait_fraction"] = data_wait / (now - t_last)
                    t_last, step_last, data_wait = now, step, 0.0
                elif "samples_per_sec" in last:
                    record["samples_per_sec"] = last["samples_per_sec"]
                record["data/replaced_records"] = data.replaced_records
                if is_eval and evaluator is not None:
                    t0 = time.perf_counter()
                    record.update(evaluator(state))
                    t_last += time.perf_counter() - t0    # evaluation time is not training time
                writer.write(step, record)
                last.update(record)
                bar.set_postfix(loss=f"{record['loss']:.3f}",
                                samples_s=f"{record['samples_per_sec']:.0f}" if "samples_per_sec" in record else "-")
        bar.close()
        data.close()
        writer.close()
        if jax.process_index() == 0:
            metrics.plot_metrics(workdir)
    summary = {k: v for k, v in last.items() if k in ("loss", "zeroshot/top1", "samples_per_sec")}
    print("clip_jax: done " + json.dumps({"step": config.total_steps, **summary}), flush=True)
    return last


def main():
    from absl import app, flags
    from ml_collections import config_flags

    # Before the config flag is defined: with a default file, config_flags applies the
    # --config.* overrides at definition time and would fail there with a bare AttributeError.
    config_lib.check_cli_overrides_or_exit(sys.argv)

    config_flag = config_flags.DEFINE_config_file(
        "config", None, "Path to a config file, e.g. configs/smoke.py. Override keys with "
        "--config.key=value (see README.md, 'Config keys').", lock_config=True)
    flags.DEFINE_string("workdir", None, "Directory for metrics, TensorBoard events, plots "
                        "and the cached tokenizer.")
    flags.mark_flags_as_required(["config", "workdir"])

    def run(argv):
        del argv
        config_lib.quiet_absl_logging()
        try:
            train(config_flag.value, flags.FLAGS.workdir)
        except config_lib.ConfigError as e:
            sys.exit(f"error: {e}")

    app.run(run)


if __name__ == "__main__":
    main()
