"""Training: `python -m clip_jax.train --config=configs/X.py --workdir=DIR [--config.key=value ...]`.

Library functions (`build`, `create_train_state`, `make_train_step`, `train`) over pytrees;
`main` is a thin command line. Parameters are created directly sharded
(`jit(init, out_shardings=...)`), so the full model never sits on one device.
Rerunning with the same workdir resumes from the newest checkpoint (checkpoint.py); a
SIGTERM saves one at the current step and stops.
"""
import contextlib
import dataclasses
import functools
import json
import math
import sys
import time

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from clip_jax import (checkpoint, cli, compile_cache, config_lib, distributed, goodput, losses,
                      metrics, models, optim, paths, sharding, validation, workdir as workdir_lib)
from clip_jax.data import pipeline, sources, tokenizer as tokenizer_lib
from clip_jax.distributed import log
from clip_jax.evals import training as training_evals
from clip_jax.models import abstract_variables, input_specs, variables_init_fn


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: dict
    batch_stats: dict     # BatchNorm running statistics (ResNets); {} for ViTs
    opt_state: optax.OptState
    # The run's base PRNG key (raw key data). A step's randomness is fold_in(rng, step), so
    # a resumed run draws the same numbers; the paper's model uses none (no dropout), and
    # crop randomness belongs to the data pipeline, seeded by (seed, step, row).
    rng: jax.Array
    nonfinite_streak: jax.Array   # consecutive steps skipped for a non-finite loss/gradient
    nonfinite_total: jax.Array    # all such steps in the run


def state_to_dict(state):
    """The checkpointed form of a TrainState (a plain dict: readable without this class)."""
    return {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}


def _variables(params, batch_stats):
    return {"params": params, "batch_stats": batch_stats} if batch_stats else {"params": params}


def _init_fn(config, model, tx):
    """rng -> a fresh TrainState (unsharded; traced under the mesh and the rules)."""
    init_variables = variables_init_fn(model, config.model)

    def init_state(rng):
        variables = init_variables(rng)
        zero = jnp.zeros((), jnp.int32)
        return TrainState(step=zero, params=variables["params"],
                          batch_stats=variables.get("batch_stats", {}),
                          opt_state=tx.init(variables["params"]),
                          rng=jax.random.key_data(jax.random.fold_in(rng, 1)),
                          nonfinite_streak=zero, nonfinite_total=zero)
    return init_state


def _opt_state_shardings(opt_shapes, param_shardings, default):
    """Each optimiser-state leaf laid out as the parameter it tracks (the parameter whose key
    path ends its own, e.g. `…mu['visual']['proj']`), scalars and the rest by `default`.
    (optax.tree_map_params cannot map states that `multi_transform` masks.)"""
    by_path = {tuple(p): s for p, s in jax.tree_util.tree_leaves_with_path(param_shardings)}
    longest = max((len(p) for p in by_path), default=0)

    def find(path, leaf):
        for n in range(min(len(path), longest), 0, -1):
            sharding_ = by_path.get(tuple(path[-n:]))
            if sharding_ is not None and len(sharding_.spec) <= len(leaf.shape):
                return sharding_
        return default
    return jax.tree_util.tree_map_with_path(find, opt_shapes)


def train_state_shardings(config, model, tx, mesh, rules):
    """(abstract TrainState of ShapeDtypeStructs carrying their shardings, TrainState of shardings)."""
    var_shardings = jax.tree.map(lambda x: x.sharding,
                                 abstract_variables(model, config.model, mesh, rules))
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        init = _init_fn(config, model, tx)
        shapes = jax.eval_shape(lambda: init(jax.random.key(0)))
        replicated = sharding.replicated(mesh)
        opt_shardings = _opt_state_shardings(shapes.opt_state, var_shardings["params"], replicated)
    shardings = TrainState(
        step=replicated, params=var_shardings["params"],
        batch_stats=var_shardings.get("batch_stats", {}), opt_state=opt_shardings,
        rng=replicated, nonfinite_streak=replicated, nonfinite_total=replicated)
    abstract_state = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)
    return abstract_state, shardings


def create_train_state(config, model, tx, mesh, rules, shardings, rng):
    """Initialises the state directly sharded on `mesh` (`jit(init, out_shardings=...)`)."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        return jax.jit(_init_fn(config, model, tx), out_shardings=shardings,
                       compiler_options=_cheap_compile_options(mesh))(rng)


def _cheap_compile_options(mesh):
    """XLA options for one-off programs (parameter init): optimising them costs more than it saves.

    On CPU, the random-init program of a small ResNet took ~25 s to compile at the default
    optimisation level, and ~1 s with these options. Other platforms keep their defaults.
    """
    if mesh.devices.flat[0].platform != "cpu":
        return None
    return {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _trainable(config, params):
    """`optim.trainable_rows` of `config.lock_image` (None when nothing is locked)."""
    if not config.lock_image.enabled:
        return None
    return optim.trainable_rows(params, config.lock_image)


def _micro_batch(x, m, k, shards):
    """Micro-batch m of x [B, ...], [B/k, ...]: rows m*b/k..(m+1)*b/k of every batch shard's b
    local rows, so each micro-batch stays spread over all devices (no exchange), read by a
    dynamic slice of each shard's own rows (no reordered copy of the whole batch)."""
    x = x.reshape((shards, k, -1) + x.shape[1:])
    return jax.lax.dynamic_index_in_dim(x, m, axis=1, keepdims=False).reshape((-1,) + x.shape[3:])


def _micro_merge(x, k, shards):
    """[k, B/k, ...] of the k micro-batches (`_micro_batch`) -> [B, ...] in the original row order."""
    x = x.reshape((k, shards, -1) + x.shape[2:])
    return jnp.swapaxes(x, 0, 1).reshape((-1,) + x.shape[3:])


def make_gradient_fn(config, model, mesh, rules):
    """(params, batch_stats, batch) -> ((loss, (new batch_stats, logit_scale)), grads).

    With `config.micro_batches = K > 1` the gradient is the full-batch one, computed as the
    gradient cache does: (1) the embeddings of the K micro-batches, keeping no activations;
    (2) the loss of the whole batch and its gradient with respect to the embeddings (and the
    temperature / bias); (3) each micro-batch again, its embedding gradient pulled back to
    the parameters and accumulated. With a data axis, each data shard accumulates its own
    micro-batches' parameter gradients (a `shard_map` manual over that axis only; the fsdp
    and model axes stay GSPMD's) and the step reduces them once, not once per micro-batch:
    data-parallel traffic no longer grows with K. The logged loss is the full-batch loss. BatchNorm
    (ResNets) normalises each micro-batch by its own statistics, so for ResNets the update
    is that of K BatchNorm groups, not of one batch.
    """
    batch_axes = sharding.batch_axes(rules)
    loss_fn = losses.make_loss(config.loss, mesh, batch_axes)
    has_bn = config.model.vision.kind == "resnet"
    # A fully locked image tower runs in inference mode: BatchNorm uses (and keeps) its
    # running statistics, and no gradient is taken through it.
    lock = config.lock_image
    bn_train = has_bn and not (lock.enabled and lock.unlocked_blocks == 0)
    k, shards = int(config.micro_batches), sharding.num_batch_shards(mesh, rules)
    batch_spec = NamedSharding(mesh, P(batch_axes or None))
    # The data axis, when parameters are replicated over it (always) and BatchNorm does not
    # normalise over the micro-batch (it would see one shard's rows): each data shard
    # accumulates its own micro-batches' parameter gradients, summed once after the last.
    # Nor with kernels a shard_map cannot hold (`Ops.in_shard_map`: cuDNN attention).
    local_axes = ("data",) if (k > 1 and mesh.shape["data"] > 1 and not bn_train
                               and model.ops.in_shard_map and "data" in batch_axes) else ()
    n_local = mesh.shape["data"] if local_axes else 1

    def local_grads(grads_fn, params, x):
        """grads_fn(params, x) per data shard, manual over the data axis only: [n_data, ...]."""
        def per_shard(params, x):
            # varying copies: the gradient of a replicated (invariant) input would be psummed
            params = jax.tree.map(lambda p: jax.lax.pcast(p, local_axes, to="varying"), params)
            with nn.logical_axis_rules(sharding.without_axes(rules, local_axes)):
                return jax.tree.map(lambda g: g[None], grads_fn(params, x))
        rows = P(local_axes)
        return jax.shard_map(per_shard, mesh=mesh, in_specs=(P(), (rows, rows, rows, rows)),
                             out_specs=P(local_axes), axis_names=set(local_axes))(params, x)

    def forward(params, batch_stats, images, tokens):
        if images.ndim == 2:              # the pipeline's pixel rows (`pipeline.pixel_rows`)
            size = int(config.model.vision.image_size)
            images = images.reshape((images.shape[0], size, size, 3))
        if images.dtype == jnp.uint8:     # the pipeline's pixels, normalised here: per micro-batch
            images = pipeline.normalize_images(images)
        out, updates = model.apply(_variables(params, batch_stats), images, tokens,
                                   train=bn_train, mutable=["batch_stats"] if bn_train else [])
        return out, updates.get("batch_stats", batch_stats)

    def logit_params(params):
        return model.apply({"params": params}, method=model.logit_params)

    def full_batch(params, batch_stats, batch):
        def objective(params):
            out, new_stats = forward(params, batch_stats, batch["images"], batch["tokens"])
            loss = loss_fn(out["image_embeds"], out["text_embeds"], out["logit_scale"], out["logit_bias"])
            return loss, (new_stats, out["logit_scale"])
        return jax.value_and_grad(objective, has_aux=True)(params)

    def gradient_cache(params, batch_stats, batch):
        def micro(m):      # micro-batch m of the batch, read in place (no split copy of the batch)
            return tuple(jax.lax.with_sharding_constraint(_micro_batch(batch[key], m, k, shards), batch_spec)
                         for key in pipeline.BATCH_KEYS)

        def embed(params, stats, x):
            out, new_stats = forward(params, stats, *x)
            return (out["image_embeds"], out["text_embeds"]), new_stats

        def no_grad_pass(stats, m):        # (1): embeddings only, no activations kept
            embeds, new_stats = embed(jax.lax.stop_gradient(params), stats, micro(m))
            return new_stats, embeds
        new_stats, (image_mb, text_mb) = jax.lax.scan(no_grad_pass, batch_stats, jnp.arange(k))

        def batch_loss(image_embeds, text_embeds, params):   # (2): the full-batch loss
            scale, bias = logit_params(params)
            return loss_fn(_micro_merge(image_embeds, k, shards), _micro_merge(text_embeds, k, shards),
                           scale, bias), scale
        (loss, scale), (g_image, g_text, grads) = jax.value_and_grad(
            batch_loss, argnums=(0, 1, 2), has_aux=True)(image_mb, text_mb, params)

        def micro_grads(params, x):       # one micro-batch's parameter gradient
            *inputs, g_i, g_t = x
            _, vjp = jax.vjp(lambda p: embed(p, batch_stats, inputs)[0], params)
            return vjp((g_i, g_t))[0]

        def inputs_and_cotangents(x):
            m, g_i, g_t = x
            return (*micro(m), g_i, g_t)

        cached = (jnp.arange(k), g_image, g_text)
        if local_axes:                    # (3), each data shard's sum kept apart, reduced once
            def own(tree):                # [n_data, ...]: row i on data shard i, the rest as GSPMD likes
                return jax.tree.map(lambda g: jax.lax.with_sharding_constraint(g, NamedSharding(
                    mesh, P(local_axes, *[P.UNCONSTRAINED] * (g.ndim - 1)))), tree)

            def accumulate(acc, x):
                return own(jax.tree.map(jnp.add, acc, local_grads(micro_grads, params,
                                                                  inputs_and_cotangents(x)))), None
            partial = jax.lax.scan(accumulate, own(jax.tree.map(
                lambda g: jnp.zeros((n_local,) + g.shape, g.dtype), grads)), cached)[0]
            grads = jax.tree.map(lambda g, p: g + p.sum(axis=0), grads, partial)
        else:                             # (3): each micro-batch's gradient reduced as it comes
            grads, _ = jax.lax.scan(lambda acc, x: (jax.tree.map(
                jnp.add, acc, micro_grads(params, inputs_and_cotangents(x))), None), grads, cached)
        return (loss, (new_stats, scale)), grads

    def loss_and_grads(params, batch_stats, batch):
        trainable = _trainable(config, params)
        if trainable is not None:    # no gradient is computed for locked parameters
            params = optim.stop_frozen_gradients(params, trainable)
        return (gradient_cache if k > 1 else full_batch)(params, batch_stats, batch)
    return loss_and_grads


def make_train_step(config, model, tx, schedule, mesh, rules, state_shardings):
    """One jitted step: `make_gradient_fn`'s loss and gradient, AdamW update. State is donated.

    A step whose loss or gradient is not finite changes nothing but the step counter and
    the non-finite counters: parameters, optimiser state and BatchNorm statistics keep their
    values. The guard is a `lax.cond` around the update, not a `where` per leaf: XLA fuses a
    `where` into the update's loops, which then read the old moments after the in-place
    write of the new ones, so it copied every moment first (BUILD_NOTES "Train step and
    state", non-finite guard).
    """
    loss_and_grads = make_gradient_fn(config, model, mesh, rules)

    def step_fn(state, batch):
        (loss, (batch_stats, scale)), grads = loss_and_grads(state.params, state.batch_stats, batch)
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        def update(params, opt_state, _old_stats):
            updates, opt_state = tx.update(grads, opt_state, params)
            params = optim.clip_logit_scale(optax.apply_updates(params, updates))
            return params, opt_state, batch_stats

        params, opt_state, batch_stats = jax.lax.cond(
            finite, update, lambda *unchanged: unchanged,
            state.params, state.opt_state, state.batch_stats)
        streak = jnp.where(finite, 0, state.nonfinite_streak + 1)
        new_state = TrainState(
            step=state.step + 1, params=params, batch_stats=batch_stats,
            opt_state=opt_state, rng=state.rng,
            nonfinite_streak=streak,
            nonfinite_total=state.nonfinite_total + (~finite).astype(jnp.int32))
        step_metrics = {"loss": loss, "logit_scale": scale, "temperature": 1.0 / scale,
                        # The optimiser's schedule counts applied updates; skipped steps
                        # do not advance it.
                        "lr": schedule(state.step - state.nonfinite_total), "grad_norm": grad_norm,
                        "nonfinite_streak": streak, "nonfinite_steps": new_state.nonfinite_total}
        return new_state, step_metrics

    data_sharding = sharding.batch_sharding(mesh, rules)
    return jax.jit(step_fn,
                   in_shardings=(state_shardings, pipeline.training_batch(data_sharding, data_sharding)),
                   out_shardings=(state_shardings, sharding.replicated(mesh)),
                   donate_argnums=0)


@dataclasses.dataclass
class TrainSetup:
    """What `build` makes once for a config: the mesh and rules, the model, the optimiser,
    the state's shapes and shardings, and the jitted step. Use it under `context()` (mesh +
    logical-axis rules)."""
    config: object
    mesh: jax.sharding.Mesh
    rules: tuple
    model: nn.Module
    tx: optax.GradientTransformation
    abstract_state: TrainState     # ShapeDtypeStructs with shardings: the restore target
    state_shardings: TrainState
    train_step: callable

    def context(self):
        return sharding.mesh_context(self.mesh, self.rules)

    def init_state(self):
        """A fresh state from `config.seed`, created sharded."""
        return create_train_state(self.config, self.model, self.tx, self.mesh, self.rules,
                                  self.state_shardings, jax.random.key(self.config.seed))

    def abstract_batch(self, batch_size=None):
        """A global batch of `batch_size` (default: the config's) as ShapeDtypeStructs with
        the step's input sharding, e.g. to compile the step ahead of time."""
        data = sharding.batch_sharding(self.mesh, self.rules)
        images, tokens = input_specs(self.config.model, batch_size or self.config.batch_size)
        images = jax.ShapeDtypeStruct((images.shape[0], math.prod(images.shape[1:])),
                                      jnp.uint8)     # the pipeline's pixel rows
        return pipeline.training_batch(*(jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=data)
                                         for x in (images, tokens)))


def build(config, devices=None):
    """Mesh, model, optimiser, the state's shapes and shardings, and the jitted step.

    `devices` (default: all of them, across processes) may be another platform's, such as
    a TPU topology's compile-only devices (clip_jax.aot): nothing here runs on them."""
    mesh = sharding.make_mesh(config.mesh, devices)
    rules = tuple(tuple(r) for r in config.sharding_rules)
    model = models.from_config(config, mesh)
    trainable = None
    if config.lock_image.enabled:
        trainable = optim.trainable_rows(abstract_variables(model, config.model, mesh, rules)["params"],
                                         config.lock_image)
    tx, schedule = optim.make_optimizer(config.optim, config.total_steps, trainable)
    abstract_state, state_shardings = train_state_shardings(config, model, tx, mesh, rules)
    with sharding.mesh_context(mesh, rules):
        train_step = make_train_step(config, model, tx, schedule, mesh, rules, state_shardings)
    return TrainSetup(config, mesh, rules, model, tx, abstract_state, state_shardings, train_step)


class TrainingStopped(Exception):
    """Training cannot go on (e.g. too many non-finite steps); checkpoints are intact."""


def initial_state(run, ckpt, data):
    """(state, step): resumed from the newest usable checkpoint, else fresh (or `init_from`)."""
    config = run.config
    restored = ckpt.restore_latest(state_to_dict(run.abstract_state), data.check_state)
    if restored is not None:
        state, data_state, meta = restored
        data.set_state(data_state)
        step = int(meta["step"])
        log(f"resumed from {ckpt.directory}/{step} (saved by {meta['process_count']} "
            f"process(es), {meta['device_count']} devices, mesh {meta['mesh']})")
        for line in config_lib.describe_changes(meta.get("config"), config):
            log(f"WARNING: resuming with a changed config: {line}")
        return TrainState(**state), step
    state = run.init_state()
    if config.init_from:
        variables, report = checkpoint.load_model_variables(
            config.init_from, {"params": state.params, "batch_stats": state.batch_stats})
        state = state.replace(params=variables["params"], batch_stats=variables["batch_stats"])
        log(checkpoint.format_report(report))
    return state, 0


def train(config, workdir):
    """Trains per `config` in `workdir`, resuming from its newest checkpoint if it has one.

    Returns the last logged metrics. Stops early, after saving a checkpoint, when
    preempted (SIGTERM); `last['preempted']` is then True. Raises TrainingStopped after
    `config.max_bad_steps` non-finite steps in a row, WorkdirError if the workdir is in use
    by another run or cannot be written, CheckpointError if a checkpoint cannot be
    restored or saved; the checkpoints committed before are intact in every case.
    """
    validation.validate(config, jax.device_count())
    workdir_lib.check_name(workdir)
    workdir = paths.resolve(workdir)
    ckpt_dir = paths.join(workdir, "checkpoints")
    owner = workdir_lib.Ownership(workdir)
    # Before anything is written: a second run in this workdir stops here, and a read-only
    # or full workdir stops before the first step, not at the first checkpoint.
    owner.acquire(writable=((workdir, "the workdir"), (ckpt_dir, "its checkpoints directory")))
    try:
        return _train_owned(config, workdir, ckpt_dir, owner)
    finally:
        owner.release()


def _train_owned(config, workdir, ckpt_dir, owner):
    ledger = goodput.Ledger(workdir, enabled=jax.process_index() == 0)   # its clock: startup
    try:
        return _train_counted(config, workdir, ckpt_dir, owner, ledger)
    finally:
        ledger.record(ledger.step)


def _train_counted(config, workdir, ckpt_dir, owner, ledger):
    validation.check_workdir_tokenizer(config, workdir)    # before config.json is rewritten
    if jax.process_index() == 0:
        try:
            paths.write_text(paths.join(workdir, "config.json"), config.to_json_best_effort(indent=2))
        except OSError as e:
            raise workdir_lib.WorkdirError(workdir_lib.os_error_message(e, workdir, "writing config.json")) from None

    preemption = distributed.Preemption()   # before anything slow: a SIGTERM now is not lost
    # The training source is opened once (every shard of an ingested dataset is opened, which
    # on a bucket is a request each), for the workdir tokenizer's captions if one must be
    # trained, and for the pipeline.
    open_source = functools.cache(lambda: sources.make_source(config, "train"))
    try:
        tokenizer = tokenizer_lib.get_tokenizer(config, workdir, open_source)
    except (ValueError, OSError) as e:
        preemption.close()
        raise config_lib.ConfigError(str(e)) from None
    log(f"tokenizer {config.data.tokenizer}: {tokenizer.vocab_size:,} ids ({tokenizer.source or 'in memory'})")
    compile_cache.use(config.compile_cache, workdir)      # before the first compile

    run = build(config)
    try:   # opens every evaluation dataset: a bad config.evals entry stops the run here
        evaluator = training_evals.TrainingEvaluators(config, tokenizer, run.mesh, run.rules) or None
    except (ValueError, OSError) as e:
        preemption.close()
        raise config_lib.ConfigError(str(e)) from None
    ckpt = checkpoint.Checkpointer(ckpt_dir, config.max_to_keep, run.mesh,
                                   tokenizer=tokenizer.fingerprint())
    data = None
    with _closing(preemption.close, lambda: data is not None and data.close(),
                  ckpt.close):   # ckpt.close waits for a save in flight: the newest is complete
        with run.context():
            try:   # opens the training source, unless the tokenizer has (e.g. a damaged shard, named)
                data = pipeline.make_train_iterator(config, tokenizer,
                                                    sharding.batch_sharding(run.mesh, run.rules),
                                                    open_source())
            except (ValueError, OSError) as e:
                raise config_lib.ConfigError(str(e)) from None
            ledger.switch("restore")
            state, start = initial_state(run, ckpt, data)
            if start == 0:                   # a fresh run's initialisation is start-up
                ledger.move("restore", "startup")
            ledger.switch("startup")         # then the writers, up to the first step
            ledger.step = ledger.resumed_from = start
            return _train_from(config, workdir, run, state, start, data, ckpt, preemption, evaluator,
                               owner, ledger)


@contextlib.contextmanager
def _closing(*closers):
    """Calls every closer when the block ends. While an error propagates, the closers' own
    errors are dropped (a full disk fails the cleanup's writes too, and the first failure
    is the one to report); otherwise the first of them is raised after all have run."""
    try:
        yield
    except BaseException:
        for close in closers:
            try:
                close()
            except Exception:  # noqa: BLE001
                pass
        raise
    first = None
    for close in closers:
        try:
            close()
        except Exception as e:  # noqa: BLE001
            first = first or e
    if first is not None:
        raise first


def _train_from(config, workdir, run, state, start, data, ckpt, preemption, evaluator, owner,
                ledger):
    """Trains from step `start` to the end (or a preemption) with the metrics writer and the
    progress bar open, and reports how it ended: the final line, or the newest complete
    checkpoint when a write failed. Returns the last logged metrics."""
    from tqdm import tqdm

    writer = metrics.MetricWriter(workdir, start_step=start, config=config)
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    slices = sharding.num_slices(config.mesh, list(run.mesh.devices.flat))
    log(f"mesh {sharding.describe(run.mesh, slices)}; {n_params:,} parameters; "
        f"global batch {config.batch_size}; workdir {workdir}")
    if start >= config.total_steps:
        log(f"already trained to step {start} (total_steps={config.total_steps}); nothing to do")
        writer.close()
        done = metrics.read_metrics(workdir) if jax.process_index() == 0 else []
        return done[-1] if done else {}

    bar = tqdm(total=config.total_steps, initial=start, desc="train", dynamic_ncols=True,
               disable=not config.progress or jax.process_index() != 0, file=sys.stdout)
    try:
        with _closing(bar.close, writer.close):
            last = _step_loop(config, run, state, start, data, ckpt, preemption, evaluator, writer,
                              bar, owner, ledger)
    except (workdir_lib.WorkdirError, checkpoint.CheckpointError) as e:
        newest = ckpt.newest_committed()
        raise type(e)(f"{e}. " + (f"The newest complete checkpoint, {ckpt.directory}/{newest}, is intact: "
                                  "fix this and rerun the same command to resume from it"
                                  if newest is not None else "No checkpoint was completed yet")) from None
    if last.get("preempted"):
        log(f"preempted (SIGTERM): saved a checkpoint at step {last['step']} and stopped; run "
            "the same command to continue")
        return last
    if jax.process_index() == 0:
        metrics.plot_metrics(workdir)
    summary = {k: v for k, v in last.items() if k in ("loss", "zeroshot/top1", "samples_per_sec")}
    log("done " + json.dumps({"step": config.total_steps, **summary}))
    return last


def _step_loop(config, run, state, start, data, ckpt, preemption, evaluator, writer, bar, owner,
               ledger):
    """The step loop: steps start+1 .. total_steps (or to a preemption), each one's batch,
    update, logging, evaluation and checkpoint; returns the last logged metrics. `ledger`
    (clip_jax.goodput) follows where the time goes."""
    last = {}
    saved_step = start
    t_last, step_last = time.perf_counter(), start
    data_wait = 0.0       # seconds spent waiting for batches since the last log
    in_flight = None      # the previous step's metrics
    for step in range(start + 1, config.total_steps + 1):
        t_data = time.perf_counter()
        ledger.switch("data_wait")
        batch = next(data)
        data_wait += time.perf_counter() - t_data
        ledger.switch("compile" if step == start + 1 else ledger.training(step))
        ledger.step = step
        state, step_metrics = run.train_step(state, batch)
        # At most two steps in flight: the device always has the next step queued, the
        # host never runs further ahead (each queued step holds its batch in device
        # memory), and the time spent in next(data) is time the device may idle.
        streak = int(in_flight["nonfinite_streak"]) if in_flight is not None else 0
        if streak >= config.max_bad_steps:
            raise TrainingStopped(
                f"{streak} steps in a row (steps {step - streak} to {step - 1}) had a non-finite "
                f"loss or gradient (config.max_bad_steps={config.max_bad_steps}); their updates "
                f"were skipped. The newest checkpoint ({ckpt.directory}/{saved_step}) is intact; "
                "lower the learning rate or inspect the data before resuming")
        ckpt.poll()            # a background save that failed stops the run now
        in_flight = step_metrics
        if step == start + 1:
            jax.block_until_ready(step_metrics)   # one-time: keep compilation out of samples/s
            ledger.switch(ledger.training(step))
            last["compile_s"] = time.perf_counter() - t_last
            t_last, step_last, data_wait = time.perf_counter(), step, 0.0
        bar.update(1)
        is_eval = step == config.total_steps or (config.eval_every and step % config.eval_every == 0)
        if step % config.log_every == 0 or is_eval:
            record = {k: float(v) for k, v in jax.device_get(step_metrics).items()
                      if k != "nonfinite_streak"}
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
                ledger.switch("evaluation")
                record.update(evaluator(state))
                ledger.switch(ledger.training(step))
                t_last += time.perf_counter() - t0    # evaluation time is not training time
            record.update(ledger.record(step))
            writer.write(step, record)
            last.update(record)
            bar.set_postfix(loss=f"{record['loss']:.3f}",
                            samples_s=f"{record['samples_per_sec']:.0f}" if "samples_per_sec" in record else "-")
        preempted = preemption.reached(step)
        if preempted or step == config.total_steps or (
                config.checkpoint_every and step % config.checkpoint_every == 0):
            t0 = time.perf_counter()
            ledger.switch("checkpoint")
            owner.check()      # a run whose workdir lease was taken over writes nothing more
            saved_step = ckpt.save(state_to_dict(state), data.get_state(), config)
            writer.flush()     # a remote metrics.jsonl holds every line up to the checkpoint
            ledger.record(step)
            ledger.switch(ledger.training(step))
            t_last += time.perf_counter() - t0        # checkpointing is not training time
        if preempted:
            ledger.switch("shutdown")
            ckpt.wait()
            return {**last, "step": step, "preempted": True}
    ledger.switch("shutdown")
    return last


def main():
    from absl import flags
    config_flag = cli.config_flag()
    flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, TensorBoard "
                        "events, plots and the cached tokenizer. Must be shared by all "
                        "processes of a multi-host run. Rerunning with the same workdir resumes.")
    flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                      "Join other processes with jax.distributed: 'auto' does when the three "
                      "flags below are given or JAX detects a cluster (Cloud TPU pod slice, "
                      "SLURM, Open MPI); 'on' always; 'off' never.")
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0's coordinator "
                        "(explicit multi-process start, e.g. launch/local.sh)")
    flags.DEFINE_integer("num_processes", None, "number of processes in the run")
    flags.DEFINE_integer("process_id", None, "this process's index, 0..num_processes-1")
    flags.mark_flags_as_required(["config", "workdir"])

    def run(argv):
        del argv
        FLAGS = flags.FLAGS
        with cli.stop_on(ValueError):
            distributed.initialize(FLAGS.distributed, FLAGS.coordinator_address,
                                   FLAGS.num_processes, FLAGS.process_id)
        # At once: the threads of a failed background save may still be running, and at
        # interpreter shutdown they print pages of "Event loop is closed". Everything that
        # matters is closed by now (train's cleanup), and the lock is released.
        with cli.stop_on(config_lib.ConfigError), cli.stop_on(
                checkpoint.CheckpointError, workdir_lib.WorkdirError, TrainingStopped,
                pipeline.BrokenDataset, at_once=True):
            train(config_flag.value, FLAGS.workdir)

    cli.run(run)


if __name__ == "__main__":
    main()
