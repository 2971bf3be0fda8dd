"""Checkpoints: save, resume exactly, fall back past a corrupt one, start from another run.

Layout of one checkpoint, WORKDIR/checkpoints/<step>/ (an Orbax `CheckpointManager` step):

    state/      the train state as a dict {step, params, batch_stats, opt_state, rng,
                nonfinite_streak, nonfinite_total}: OCDBT/zarr3 arrays, each process writing
                the shards it holds (no array is ever gathered onto one host).
    data_iter/  JSON: the data position (`pipeline.GlobalBatchIterator.get_state()`).
    meta/       JSON: per-array checksums and shapes, the config, who saved it and when.

Decisions (see BUILD_NOTES.md, "Checkpoints"):
- The data state is saved with Orbax's `JsonSave`, not Grain's checkpoint handler: ours is
  one global position valid for any process count, while Grain's handler writes and reads
  `process_<i>-of-<n>.json`, which a run with another process count cannot restore.
- Orbax restores a checkpoint with flipped bits without complaint (measured: a flipped
  byte in a tensor file restored different values). So `meta` holds a checksum of every
  array -- the wrapping uint32 sum of its bit patterns, exact whatever the sharding or the
  order of summation -- and a restore that does not reproduce them is treated as corrupt.
- A corrupt or unreadable newest checkpoint is reported, moved to WORKDIR/checkpoints.corrupt/
  (kept, never deleted) and the next older one is used. A checkpoint that does not fit the
  run (another model's shapes, another data source) is a config error, not corruption:
  the run stops and nothing is moved.
"""
import contextlib
import datetime
import json

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec

from clip_jax import paths
from clip_jax.models import layout
from clip_jax.distributed import log
from clip_jax.workdir import os_error_message

ITEMS = ("state", "data_iter", "meta")
CORRUPT_DIR_SUFFIX = ".corrupt"


class CheckpointError(Exception):
    """No usable checkpoint, or one that does not fit this run; the message says which."""


# ---------------------------------------------------------------- checksums and shapes

_UNSIGNED = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}


def _leaf_checksum(x):
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    bits = jax.lax.bitcast_convert_type(x, _UNSIGNED[x.dtype.itemsize])
    return jnp.sum(bits.astype(jnp.uint32), dtype=jnp.uint32)   # wraps mod 2**32: order-free


def _tree_checksums(tree):
    return jax.tree.map(_leaf_checksum, tree)


def _flat(tree):
    return {jax.tree_util.keystr(path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def shapes(tree):
    """{path: [shape, dtype]} of every array in `tree` (concrete or abstract)."""
    return {k: [list(v.shape), str(v.dtype)] for k, v in _flat(tree).items()}


class _Checksummer:
    def __init__(self, mesh):
        self._fn = jax.jit(_tree_checksums, out_shardings=NamedSharding(mesh, PartitionSpec()))

    def __call__(self, tree):
        return {k: int(v) for k, v in _flat(jax.device_get(self._fn(tree))).items()}


# ---------------------------------------------------------------- the run's checkpoints

class Checkpointer:
    """The checkpoints of one run, in `directory` (normally WORKDIR/checkpoints).

    `save` is asynchronous: it returns once the arrays are copied off the devices (the
    next steps may donate them) and writes in the background; `close` waits for it. A
    save that fails (no space, a read-only mount) raises CheckpointError naming the step
    and the reason, at `save`, `wait` or `close`, whichever comes first; the checkpoints
    committed before it are untouched (Orbax writes a step under a temporary name and
    renames it when complete).

    `tokenizer`: {'sha256': ..., 'source': ...} of the run's tokenizer; stored in each
    checkpoint's meta, and a checkpoint saved with another tokenizer is refused at restore.
    """

    def __init__(self, directory, max_to_keep, mesh, tokenizer=None):
        self.directory = paths.resolve(directory)
        self.mesh = mesh
        self.tokenizer = tokenizer
        self._checksum = _Checksummer(mesh)
        self._pending = None        # the step of the save in flight
        self._unmoved = set()       # corrupt steps left in place (see _quarantine)
        self.manager = ocp.CheckpointManager(
            self.directory, item_names=ITEMS,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                                 enable_async_checkpointing=True))

    def steps(self):
        return sorted(self.manager.all_steps())

    def _failed(self, e):
        step, self._pending = self._pending, None
        return CheckpointError(os_error_message(e, self.directory, f"saving checkpoint {step}"))

    def save(self, state, data_state, config=None):
        """Starts saving `state` (a dict; see module docstring) at its step."""
        step = int(jax.device_get(state["step"]))
        meta = {"step": step, "checksums": self._checksum(state), "shapes": shapes(state),
                "nonfinite_streak": int(jax.device_get(state["nonfinite_streak"]))
                if "nonfinite_streak" in state else None,
                "config": json.loads(config.to_json_best_effort()) if config is not None else None,
                "tokenizer": self.tokenizer,
                "process_count": jax.process_count(), "device_count": jax.device_count(),
                "mesh": dict(self.mesh.shape), "saved_at": datetime.datetime.now().isoformat()}
        try:
            self.manager.wait_until_finished()        # a failure of the previous save surfaces here
            if step in self._unmoved:
                self._remove_unmoved(step)
            self._pending = step
            self.manager.save(step, force=True, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), data_iter=ocp.args.JsonSave(data_state),
                meta=ocp.args.JsonSave(meta)))
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001 -- Orbax / TensorStore raise many kinds
            raise self._failed(e) from None
        return step

    def poll(self):
        """Raises CheckpointError if the save in flight has failed; returns at once otherwise
        (cheap enough to call after every step, so that a failed save stops the run within
        a step instead of at the next checkpoint)."""
        if self._pending is not None and not self.manager.is_saving_in_progress():
            self.wait()

    def newest_committed(self):
        """The newest step committed on disk (read afresh), or None."""
        try:
            self.manager.reload()
            steps = self.manager.all_steps()
        except Exception:  # noqa: BLE001 -- only used to phrase an error message
            return None
        return max(steps) if steps else None

    def wait(self):
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            raise self._failed(e) from None
        self._pending = None

    def close(self):
        try:
            self.wait()
        finally:
            self.manager.close()

    def restore_latest(self, abstract_state, check_data_state=None):
        """(state, data_state, meta) from the newest usable checkpoint, or None if there is none.

        `abstract_state`: dict of `jax.ShapeDtypeStruct`s with the target shardings (any
        mesh). `check_data_state(data_state)` raises ValueError if the saved data position
        belongs to other data. Corrupt newer checkpoints are reported and moved aside.
        """
        failures = []
        for step in reversed(self.steps()):
            try:
                restored = self._restore_step(step, abstract_state, check_data_state)
            except _Corrupt as e:
                log(f"WARNING: checkpoint {self.directory}/{step} is unusable ({e}); "
                    "trying the previous one")
                failures.append((step, str(e)))
                continue
            self._quarantine([s for s, _ in failures])
            return restored
        if failures:
            raise CheckpointError(
                f"none of the checkpoints in {self.directory} can be restored: "
                + "; ".join(f"step {s}: {why}" for s, why in failures)
                + ". Nothing was moved or deleted; to start afresh use another workdir.")
        return None

    def _restore_step(self, step, abstract_state, check_data_state):
        def item(name, args):
            try:
                return self.manager.restore(step, args=ocp.args.Composite(**{name: args}))[name]
            except Exception as e:  # noqa: BLE001 -- any read failure means this checkpoint is unusable
                _drop_failed_reads()
                raise _Corrupt(f"{name} unreadable: {type(e).__name__}: {str(e)[:300]}") from None

        meta = item("meta", ocp.args.JsonRestore())
        if not isinstance(meta, dict) or "checksums" not in meta:
            raise _Corrupt("meta has no checksums")
        # Saved before the towers stacked their blocks (`models.layout`): read block by
        # block, verified as saved, then stacked.
        per_block = layout.is_per_block(meta.get("shapes", {}))
        target = layout.to_per_block(abstract_state) if per_block else abstract_state
        _check_fits(meta.get("shapes", {}), shapes(target), f"{self.directory}/{step}")
        self._check_tokenizer(meta.get("tokenizer"), step)
        data_state = item("data_iter", ocp.args.JsonRestore())
        if check_data_state is not None:
            try:
                check_data_state(data_state)
            except ValueError as e:
                raise CheckpointError(f"checkpoint {self.directory}/{step}: {e}") from None
        state = item("state", ocp.args.StandardRestore(target))
        bad = [k for k, v in self._checksum(state).items() if meta["checksums"].get(k) != v]
        if bad:
            raise _Corrupt(f"{len(bad)} array(s) differ from their saved checksums, e.g. {bad[0]}")
        if per_block:
            state = self._stacked(state, abstract_state, step)
        if int(jax.device_get(state["step"])) != step:
            raise _Corrupt(f"holds step {int(jax.device_get(state['step']))}")
        return state, data_state, meta

    def _stacked(self, state, abstract_state, step):
        """A per-block training state in the stacked layout, laid out as `abstract_state`."""
        shardings = jax.tree.map(lambda x: x.sharding, abstract_state)
        try:
            return jax.jit(layout.to_stacked, out_shardings=shardings)(state)
        except layout.LayoutError as e:
            raise CheckpointError(
                f"checkpoint {self.directory}/{step} stores its blocks one by one, as before they "
                f"were stacked, and cannot be converted ({e}); resume it with the version that "
                "wrote it, or start a new workdir with --config.init_from (which converts "
                "the parameters).") from None

    def _check_tokenizer(self, saved, step):
        """A checkpoint trained with other token ids must not be resumed silently (a changed
        workdir tokenizer file trained on with no error before). Checkpoints from before
        the tokenizer was recorded are accepted."""
        if not saved or not self.tokenizer or saved.get("sha256") == self.tokenizer.get("sha256"):
            return
        raise CheckpointError(
            f"checkpoint {self.directory}/{step} was trained with another tokenizer: "
            f"{saved.get('source') or 'its tokenizer'} had sha256 {str(saved.get('sha256'))[:12]}..., "
            f"{self.tokenizer.get('source') or 'this run'}'s has {str(self.tokenizer.get('sha256'))[:12]}... "
            "Put back the tokenizer file the run was trained with, or start a new workdir "
            "(--config.init_from can start it from these weights).")

    def _quarantine(self, steps):
        """Moves unusable checkpoints out of the manager's way, keeping them for inspection.

        They go to `<checkpoints>.corrupt/` beside the real checkpoints directory (a
        symlinked `checkpoints/` on another file system keeps them on its own, where a
        rename works). If even that move fails (a read-only or odd mount), they stay where
        they are with a warning: the restore has already fallen back past them, every
        restart skips them the same way, and a save of the same step replaces them
        (`_remove_unmoved`) rather than colliding with them.
        """
        if not steps:
            return
        moved = True
        if jax.process_index() == 0:
            target = paths.corrupt_dir(self.directory, CORRUPT_DIR_SUFFIX)
            stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
            for step in steps:
                dest = paths.join(target, f"{step}-{stamp}")
                try:
                    paths.makedirs(target)
                    paths.rename(paths.join(self.directory, str(step)), dest)
                    log(f"moved unusable checkpoint {step} to {dest}")
                except OSError as e:
                    moved = False
                    log(f"WARNING: could not move unusable checkpoint {self.directory}/{step} to "
                        f"{dest} ({type(e).__name__}: {e}); it stays in place and is skipped")
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            moved = bool(multihost_utils.broadcast_one_to_all(moved))
        if not moved:
            self._unmoved.update(s for s in steps if paths.exists(paths.join(self.directory, str(s))))
        self.manager.reload()

    def _remove_unmoved(self, step):
        """Saving step S over a corrupt checkpoint S that could not be moved aside: Orbax
        refuses an existing step, and the corrupt copy is known bad, so it is deleted."""
        if jax.process_index() == 0:
            log(f"replacing unusable checkpoint {self.directory}/{step}, which could not be moved aside")
            paths.rmtree(paths.join(self.directory, str(step)))
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices("clip_jax.checkpoint.remove_unmoved")
        self._unmoved.discard(step)
        self.manager.reload()


class _Corrupt(Exception):
    pass


def _drop_failed_reads():
    """After a failed restore, Orbax leaves one failed read future per array; when they are
    garbage-collected asyncio logs each with its full TensorStore spec (pages of text).
    Collect them now, with asyncio's logger silenced: the reason is reported once by us."""
    import gc
    import logging
    log = logging.getLogger("asyncio")
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        gc.collect()
    finally:
        log.setLevel(level)


def _check_fits(saved, wanted, where):
    if saved == wanted:
        return
    lines = describe_mismatch(saved, wanted)
    raise CheckpointError(
        f"checkpoint {where} was saved by a different model or optimiser than this config "
        f"builds ({'; '.join(lines[:6])}{' ...' if len(lines) > 6 else ''}). Resume with the "
        "config it was saved with, or start a new workdir with --config.init_from.")


def describe_mismatch(saved, wanted):
    """Human lines for the differences between two {path: [shape, dtype]} tables, the
    parameters' first (the optimiser state's differences follow from them)."""
    lines = [(k, f"missing {k}") for k in wanted if k not in saved]
    lines += [(k, f"unexpected {k}") for k in saved if k not in wanted]
    lines += [(k, f"{k}: saved {saved[k][0]} {saved[k][1]}, wanted {wanted[k][0]} {wanted[k][1]}")
              for k in wanted if k in saved and saved[k] != wanted[k]]
    return [line for k, line in sorted(lines, key=lambda kl: not kl[0].startswith("['params']"))]


# ---------------------------------------------------------------- parameters only
#
# Every read of a model's arrays other than training's resume -- `load_model_variables`, used
# by init_from, clip_jax.load (evaluate, search) and the OpenCLIP export -- checks them
# against the checksums saved with them: a training step's `meta`, or CHECKSUMS_FILE beside
# a tree written by `save_params`. A PATH naming a run (its workdir or checkpoints directory)
# means its newest intact step: newer damaged ones are reported and skipped, never moved
# (these readers only read; training alone quarantines). A PATH naming one checkpoint that
# does not verify is an error naming it and the array.

MODEL_KEYS = ("params", "batch_stats")
CHECKSUMS_FILE = "checksums.json"


def checksums(tree):
    """{path: checksum} of every array of `tree` (see `_leaf_checksum`): arrays laid over a
    mesh are summed there (a collective: every process calls this), the others on this host."""
    on_mesh = lambda x: isinstance(x, jax.Array) and isinstance(x.sharding, NamedSharding)
    meshed = jax.tree.map(lambda x: x if on_mesh(x) else None, tree)
    local = jax.tree.map(lambda x: None if on_mesh(x) else x, tree)
    out = {}
    if jax.tree.leaves(meshed):
        out.update(_Checksummer(jax.tree.leaves(meshed)[0].sharding.mesh)(meshed))
    if jax.tree.leaves(local):
        out.update({k: int(v) for k, v in _flat(jax.device_get(jax.jit(_tree_checksums)(local))).items()})
    return out


def save_params(directory, params, batch_stats=None, config=None, tokenizer_file=None):
    """Writes a parameters-only checkpoint (e.g. converted weights) that `init_from` reads.

    The arrays' checksums go to DIR/checksums.json, which every load checks. With `config`
    (its `model` and `data.tokenizer*` keys matter) it is also a model that
    `clip_jax.load(directory)` opens: the config goes to DIR/config.json and a SentencePiece
    `tokenizer_file` is copied to DIR/tokenizer/spm.model.
    """
    directory = paths.resolve(directory)
    tree = {"params": params, "batch_stats": batch_stats or {}}
    sums = checksums(tree)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(directory, tree)
    if jax.process_index() != 0:
        return
    paths.write_text(paths.join(directory, CHECKSUMS_FILE),
                     json.dumps({"checksums": sums, "shapes": shapes(tree)}, indent=1))
    if config is not None:
        paths.write_text(paths.join(directory, "config.json"), config.to_json_best_effort(indent=2))
    if tokenizer_file:
        paths.write_bytes(paths.join(directory, "tokenizer", "spm.model"), paths.read_bytes(tokenizer_file))


def read_arrays(path):
    """The arrays saved at `path` (see `resolve_state_dir`) as numpy, whatever mesh saved them.

    For inspection and tests (not checked against the checksums); tuples come back as lists."""
    state_dir = resolve_state_dir(path)
    tree = ocp.StandardCheckpointer().metadata(state_dir).item_metadata
    tree = getattr(tree, "tree", tree)
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    return ocp.PyTreeCheckpointer().restore(state_dir, args=ocp.args.PyTreeRestore(restore_args=args))


def _model_checkpoints(path, what):
    """(the Orbax tree directories PATH may mean, newest first; True if PATH names a run,
    whose older checkpoints stand in for a damaged newest one)."""
    path = paths.resolve(path)
    if paths.isdir(paths.join(path, "checkpoints")):
        path = paths.join(path, "checkpoints")
    steps = [int(d) for d in paths.listdir(path) if d.isdigit()
             and paths.isdir(paths.join(path, d, "state"))] if paths.isdir(path) else []
    if steps:
        return [paths.join(path, str(s), "state") for s in sorted(steps, reverse=True)], True
    if paths.isdir(paths.join(path, "state")):
        path = paths.join(path, "state")
    if not _is_tree(path):
        raise CheckpointError(f"{what}: no checkpoint found at {path}")
    return [path], False


def _is_tree(state_dir):
    return (paths.exists(paths.join(state_dir, "_CHECKPOINT_METADATA"))
            or paths.exists(paths.join(state_dir, "_METADATA")))


def resolve_state_dir(path, what="config.init_from"):
    """The Orbax tree directory that `init_from=path` means (`what` names the option in errors).

    Accepts a run's workdir (its newest checkpoint), a checkpoints directory (newest step),
    one step directory, or a parameters-only checkpoint written by `save_params`. Only the
    tree's metadata is looked for here: `load_model_variables` checks the arrays, and may
    settle on an older step.
    """
    candidates, _ = _model_checkpoints(path, what)
    for state_dir in candidates:
        if _is_tree(state_dir):
            return state_dir
    raise CheckpointError(f"{what}: no checkpoint found at {candidates[0]}")


def _step_dir(state_dir):
    """The training checkpoint (step directory) whose `state` is `state_dir`, or None."""
    parent = paths.dirname(state_dir)
    if state_dir.rstrip("/").endswith("/state") and paths.exists(paths.join(parent, "_CHECKPOINT_METADATA")):
        return parent
    return None


def _saved_checksums(state_dir):
    """{path: checksum} saved with the tree in `state_dir` (its step's `meta`, or
    CHECKSUMS_FILE beside it); None for parameters saved before `save_params` stored them.
    A training step saved while its loss was not finite is reported here too (its weights
    are the last good ones of a run that was diverging; evaluations of them mislead)."""
    step_dir = _step_dir(state_dir)
    where = paths.join(step_dir, "meta", "metadata") if step_dir else paths.join(state_dir, CHECKSUMS_FILE)
    if not step_dir and not paths.exists(where):
        return None
    try:
        saved = json.loads(paths.read_text(where))
    except (OSError, ValueError) as e:
        raise _Corrupt(f"its checksums ({where}) are unreadable: {type(e).__name__}: "
                       f"{str(e)[:200]}") from None
    if not isinstance(saved, dict) or not isinstance(saved.get("checksums"), dict):
        raise _Corrupt(f"{where} holds no checksums")
    streak = saved.get("nonfinite_streak")
    if isinstance(streak, int) and streak > 0:
        log(f"WARNING: checkpoint {step_dir} was saved after {streak} step(s) in a row with a "
            "non-finite loss or gradient: its weights are the last updated ones of a run that "
            "was diverging")
    return saved["checksums"]


@contextlib.contextmanager
def _read_failure_is_damage():
    try:
        yield
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 -- any read failure means this checkpoint is unusable
        _drop_failed_reads()
        raise _Corrupt(f"unreadable: {type(e).__name__}: {str(e)[:300]}") from None


def _read_verified(path, what, read):
    """`read(state_dir)` -> (tree of the arrays it read, as saved; result) on the newest
    checkpoint PATH means whose arrays match their saved checksums (see the comment above).
    Returns (result, state_dir)."""
    candidates, is_run = _model_checkpoints(path, what)
    failures = []
    for state_dir in candidates:
        name = _step_dir(state_dir) or state_dir
        try:
            expected = _saved_checksums(state_dir)
            arrays, result = read(state_dir)
            if expected is None:
                log(f"note: {what}: {state_dir} has no saved checksums (written before "
                    "save_params stored them), so its arrays are used unverified")
                return result, state_dir
            bad = sorted(k for k, v in checksums(arrays).items() if expected.get(k) != v)
            if bad:
                more = f" (and {len(bad) - 1} more array(s))" if len(bad) > 1 else ""
                raise _Corrupt(f"{bad[0]} differs from its saved checksum{more}")
        except _Corrupt as e:
            failures.append((name, str(e)))
            if is_run and state_dir != candidates[-1]:
                log(f"WARNING: {what}: checkpoint {name} is damaged ({e}); using the previous one")
                continue
            break
        return result, state_dir
    if len(failures) == 1:
        hint = (" (the run's workdir gives its newest intact checkpoint)"
                if _step_dir(candidates[0]) and not is_run else "")
        raise CheckpointError(f"{what}: checkpoint {failures[0][0]} is damaged: {failures[0][1]}{hint}")
    raise CheckpointError(f"{what}: no checkpoint of {path} is intact: "
                          + "; ".join(f"{name}: {why}" for name, why in failures))


def _resize_position_embedding(saved, shape):
    """ViT positional embedding [1 + g*g, w] resized to [1 + G*G, w] (class token kept).

    Bicubic (Keys a=-0.5, `jax.image.resize`), as OpenCLIP's resize_pos_embed does for a
    new image size; exact parity with torch's bicubic (a=-0.75) is not claimed.
    """
    g, new_g = int(round((saved.shape[0] - 1) ** 0.5)), int(round((shape[0] - 1) ** 0.5))
    if g * g + 1 != saved.shape[0] or new_g * new_g + 1 != shape[0] or saved.shape[1] != shape[1]:
        return None
    grid = jnp.asarray(saved[1:]).reshape(g, g, -1)
    grid = jax.image.resize(grid, (new_g, new_g, grid.shape[-1]), method="cubic")
    return jnp.concatenate([jnp.asarray(saved[:1]), grid.reshape(new_g * new_g, -1)], axis=0)


RESIZABLE = {"['params']['visual']['positional_embedding']": _resize_position_embedding}


def load_model_variables(path, target, what="config.init_from"):
    """Parameters (and BatchNorm statistics) of the checkpoint at `path`, fitted to `target`.

    `target`: {'params': ..., 'batch_stats': ...} of freshly initialised, sharded arrays
    (or `ShapeDtypeStruct`s; without a sharding a leaf is read as a numpy array).
    Returns (variables, report). The arrays read are checked against their saved checksums
    first; `path` naming a run falls back past damaged newer checkpoints (see the comment
    above). Leaves the checkpoint lacks keep their fresh values ('missing'); leaves this
    model lacks are ignored ('unexpected'); a ViT positional embedding of another image size
    is resized ('resized'). Any other shape difference raises CheckpointError listing every
    one of them. `report['source']` is the state directory read.

    Blocks are matched one by one, as the reference models name them (`models.layout`): a
    checkpoint that stores them one by one (written before the towers stacked them), or one
    of another depth, is read whole, its blocks matched to this model's in the per-block
    view and stacked again, and its report names blocks (`resblocks_{i}`, `layer{s}_{i}`).
    A checkpoint of this layout and depth is read straight into the target's shardings.
    """
    target = {m: target.get(m, {}) for m in MODEL_KEYS}
    # Shapes only: the per-block views below slice nothing.
    abstract = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(tuple(x.shape), x.dtype), tree)

    def read(state_dir):
        with _read_failure_is_damage():
            tree_meta = ocp.StandardCheckpointer().metadata(state_dir).item_metadata
        tree_meta = abstract({m: getattr(tree_meta, "tree", tree_meta).get(m, {}) for m in MODEL_KEYS})
        # Block by block unless the stacked arrays are saved with this model's shapes.
        stacked = lambda tree: {k: tuple(v.shape) for k, v in _flat(tree).items()
                                if layout.STACKED_KEYSTR.search(k)}
        per_block = layout.is_per_block(tree_meta) or stacked(tree_meta) != stacked(target)
        as_saved = _flat(tree_meta)
        saved = _flat(layout.to_per_block(tree_meta)) if per_block else as_saved
        wanted = _flat(layout.to_per_block(abstract(target))) if per_block else _flat(target)
        plan = {"source": state_dir, "per_block": per_block, "loaded": [], "resized": [],
                "mismatched": [], "missing": [k for k in wanted if k not in saved],
                "unexpected": [k for k in saved if k not in wanted], "exact": [], "resize": []}
        for k in wanted:
            if k not in saved:
                continue
            if tuple(saved[k].shape) == tuple(wanted[k].shape):
                plan["exact"].append(k)
            elif k in RESIZABLE:
                plan["resize"].append(k)
            else:
                plan["mismatched"].append(f"{k}: saved {list(saved[k].shape)}, this model "
                                          f"{list(wanted[k].shape)}")
        if plan["mismatched"]:
            raise CheckpointError(f"{what}={path}: parameter shapes differ from this "
                                  "model's: " + "; ".join(plan["mismatched"]))
        # The leaves we use, as saved (the checksums are of those): matched ones straight
        # into their target sharding, resized ones (and all, block by block) as host arrays.
        keys = list(_flat(tree_meta)) if per_block else plan["exact"] + plan["resize"]
        exact = set(plan["exact"])
        sharding = lambda k: wanted[k].sharding if k in exact and not per_block else None
        keypaths = {jax.tree_util.keystr(p): p for p, _ in jax.tree_util.tree_flatten_with_path(tree_meta)[0]}
        item = _unflatten({keypaths[k]: jax.ShapeDtypeStruct(tuple(as_saved[k].shape), as_saved[k].dtype,
                                                             sharding=sharding(k)) for k in keys})
        restore_args = jax.tree.map(
            lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding) if s.sharding is not None
            else ocp.RestoreArgs(restore_type=np.ndarray), item)
        with _read_failure_is_damage():
            restored = ocp.PyTreeCheckpointer().restore(state_dir, args=ocp.args.PyTreeRestore(
                item=item, restore_args=restore_args, partial_restore=True)) if item else {}
        return restored, (restored, plan, saved)

    (restored, report, saved), _ = _read_verified(path, what, read)
    exact, resize = report.pop("exact"), report.pop("resize")
    per_block = report.pop("per_block")
    got = _flat(layout.to_per_block(restored) if per_block else restored)

    def fill(keypath, fresh):
        k = jax.tree_util.keystr(keypath)
        if k in exact:
            report["loaded"].append(k)
            return got[k] if got[k].dtype == fresh.dtype else got[k].astype(fresh.dtype)
        if k in resize:
            new = RESIZABLE[k](np.asarray(got[k]), fresh.shape)
            if new is None:
                raise CheckpointError(f"{what}={path}: cannot resize {k} from "
                                      f"{list(saved[k].shape)} to {list(fresh.shape)}")
            report["resized"].append(f"{k}: {list(saved[k].shape)} -> {list(fresh.shape)}")
            return jax.device_put(new.astype(fresh.dtype), fresh.sharding)
        return fresh

    if not per_block:
        return jax.tree_util.tree_map_with_path(fill, target), report
    variables = jax.tree_util.tree_map_with_path(fill, layout.to_per_block(target))
    return jax.tree.map(_placed_like, layout.to_stacked(variables), target), report


def _placed_like(x, like):
    """`x` with the sharding of `like` (an array or a ShapeDtypeStruct); a host array if
    `like` has none."""
    sharding = getattr(like, "sharding", None)
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    return np.asarray(x) if sharding is None else jax.device_put(x, sharding)


def _unflatten(by_path):
    """A nested dict from {(DictKey, ...): leaf}."""
    out = {}
    for path, leaf in by_path.items():
        node = out
        for key in path[:-1]:
            node = node.setdefault(key.key, {})
        node[path[-1].key] = leaf
    return out


def format_report(report):
    """The init_from report as a few readable lines."""
    lines = [f"init_from {report['source']}: {len(report['loaded'])} arrays loaded"]
    for kind in ("resized", "missing", "unexpected"):
        items = report[kind]
        if items:
            shown = ", ".join(items[:8]) + (f" (+{len(items) - 8} more)" if len(items) > 8 else "")
            note = {"missing": " (kept freshly initialised)", "unexpected": " (ignored)",
                    "resized": ""}[kind]
            lines.append(f"  {kind} {len(items)}{note}: {shown}")
    return "\n".join(lines)
