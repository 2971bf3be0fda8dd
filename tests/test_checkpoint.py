"""checkpoint.py and the train loop's use of it, in process on one CPU device.

The subprocess tests (SIGTERM/SIGKILL, other meshes, several processes) are in test_resume.py.
"""
import glob
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clip_jax import checkpoint, metrics, train
from clip_jax.models import layout
from tests.helpers import tiny_config


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """8 steps with checkpoints at 4 and 8; returns (workdir, metrics)."""
    wd = str(tmp_path_factory.mktemp("ref"))
    train.train(tiny_config(total_steps=8, checkpoint_every=4), wd)
    return wd, metrics.read_metrics(wd)


def _losses(records):
    return {r["step"]: r["loss"] for r in records}


def _flip_a_byte(step_dir):
    """Flips one bit in the middle of the largest array file: Orbax restores it silently."""
    files = [f for f in glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True)
             if os.path.isfile(f)]
    big = max(files, key=os.path.getsize)
    data = bytearray(open(big, "rb").read())
    data[len(data) // 2] ^= 0x10
    open(big, "wb").write(bytes(data))


def _truncate(step_dir):
    for f in glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True):
        if os.path.isfile(f):
            os.truncate(f, os.path.getsize(f) // 2)


def test_checksums_see_one_flipped_bit_and_ignore_the_summation_order():
    mesh = jax.make_mesh((1,), ("data",))
    summer = checkpoint._Checksummer(mesh)
    tree = {"w": jnp.linspace(-3, 3, 1000, dtype=jnp.float32), "n": jnp.arange(7, dtype=jnp.int32),
            "h": jnp.ones(5, jnp.bfloat16)}
    base = summer(tree)
    bits = np.asarray(tree["w"]).view(np.uint32).copy()
    bits[123] ^= 1 << 3
    flipped = summer({**tree, "w": jnp.asarray(bits.view(np.float32))})
    assert flipped["['w']"] != base["['w']"] and flipped["['n']"] == base["['n']"]
    shuffled = summer({**tree, "w": tree["w"][::-1]})
    assert shuffled["['w']"] == base["['w']"]    # a sum of bit patterns mod 2**32


@pytest.mark.parametrize("damage", [_flip_a_byte, _truncate], ids=["flipped_bit", "truncated"])
def test_corrupt_newest_checkpoint_falls_back_to_the_previous(reference_run, tmp_path, damage, capsys):
    ref_dir, ref_metrics = reference_run
    wd = str(tmp_path / "run")
    shutil.copytree(ref_dir, wd)
    damage(os.path.join(wd, "checkpoints", "8"))
    capsys.readouterr()
    train.train(tiny_config(total_steps=8, checkpoint_every=4), wd)
    out = capsys.readouterr().out
    assert "checkpoints/8 is unusable" in out and "resumed from" in out and "checkpoints/4" in out
    moved = os.listdir(os.path.join(wd, "checkpoints.corrupt"))
    assert len(moved) == 1 and moved[0].startswith("8-")         # kept, not deleted
    assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["4", "8"]   # 8 saved again
    resumed = metrics.read_metrics(wd)
    assert [r["step"] for r in resumed] == [r["step"] for r in ref_metrics]
    assert _losses(resumed) == _losses(ref_metrics)                # bit for bit


def test_a_save_cut_short_is_ignored_and_the_run_resumes_from_the_previous(reference_run, tmp_path):
    """A process killed while an async save is in flight leaves Orbax's uncommitted
    `<step>.orbax-checkpoint-tmp-<n>` directory (here with half-written arrays): the next run
    never reads it, resumes from the checkpoint before and repeats the same steps."""
    ref_dir, ref_metrics = reference_run
    wd = str(tmp_path / "run")
    shutil.copytree(ref_dir, wd)
    cut = os.path.join(wd, "checkpoints", "8.orbax-checkpoint-tmp-1796400000")
    os.rename(os.path.join(wd, "checkpoints", "8"), cut)
    _truncate(cut)
    train.train(tiny_config(total_steps=8, checkpoint_every=4), wd)
    assert "8" in os.listdir(os.path.join(wd, "checkpoints"))
    assert not os.path.exists(os.path.join(wd, "checkpoints.corrupt"))   # nothing was unusable
    resumed = metrics.read_metrics(wd)
    assert [r["step"] for r in resumed] == [r["step"] for r in ref_metrics]
    assert _losses(resumed) == _losses(ref_metrics)                # bit for bit


def test_no_restorable_checkpoint_stops_and_moves_nothing(reference_run, tmp_path):
    wd = str(tmp_path / "run")
    shutil.copytree(reference_run[0], wd)
    for step in ("4", "8"):
        _truncate(os.path.join(wd, "checkpoints", step))
    with pytest.raises(checkpoint.CheckpointError, match="none of the checkpoints") as e:
        train.train(tiny_config(total_steps=8, checkpoint_every=4), wd)
    assert "step 8" in str(e.value) and "step 4" in str(e.value)
    assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["4", "8"]
    assert not os.path.exists(os.path.join(wd, "checkpoints.corrupt"))


def test_checkpoint_of_another_model_is_a_config_error(reference_run, tmp_path):
    wd = str(tmp_path / "run")
    shutil.copytree(reference_run[0], wd)
    config = tiny_config(total_steps=8, checkpoint_every=4)
    config.model.text.layers = 2
    with pytest.raises(checkpoint.CheckpointError, match="different model") as e:
        train.train(config, wd)
    assert "missing ['params']['text']['transformer']['resblocks']" in str(e.value)
    assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["4", "8"]


def test_checkpoint_of_other_data_is_a_config_error(reference_run, tmp_path):
    wd = str(tmp_path / "run")
    shutil.copytree(reference_run[0], wd)
    config = tiny_config(total_steps=8, checkpoint_every=4)
    config.seed = 1
    with pytest.raises(checkpoint.CheckpointError, match="seed: saved 0, now 1"):
        train.train(config, wd)


def test_rerunning_a_finished_run_does_nothing(reference_run, capsys):
    wd, ref_metrics = reference_run
    train.train(tiny_config(total_steps=8, checkpoint_every=4), wd)
    assert "nothing to do" in capsys.readouterr().out
    assert metrics.read_metrics(wd) == ref_metrics


def _init(config):
    run = train.build(config)
    with run.context():
        return run.init_state()


def _leaves(tree):
    return checkpoint._flat(jax.device_get(tree))


def test_init_from_reports_missing_unexpected_and_resizes_position_embeddings(tmp_path):
    src = _init(tiny_config(model__text__layers=2, seed=3))
    checkpoint.save_params(str(tmp_path / "src"), src.params)
    # Blocks are matched one by one (the report names them so): compared in that view.
    source = _leaves(layout.to_per_block(src.params))
    config = tiny_config()                  # text resblocks_1 of the source: unexpected
    config.model.vision.layers = 2          # vision resblocks_1: missing from the source
    config.model.vision.image_size = 32     # 2x2+1 -> 4x4+1 position embeddings
    fresh = _init(config)
    variables, report = checkpoint.load_model_variables(
        str(tmp_path / "src"), {"params": fresh.params, "batch_stats": fresh.batch_stats})
    assert report["source"] == str(tmp_path / "src")
    assert report["missing"] and all("['visual']['transformer']['resblocks_1']" in k for k in report["missing"])
    assert report["unexpected"] and all("['text']['transformer']['resblocks_1']" in k for k in report["unexpected"])
    assert report["resized"] == ["['params']['visual']['positional_embedding']: [5, 32] -> [17, 32]"]
    got, before = _leaves(layout.to_per_block(variables["params"])), _leaves(layout.to_per_block(fresh.params))
    for k in report["loaded"]:
        np.testing.assert_array_equal(got[k.removeprefix("['params']")], source[k.removeprefix("['params']")])
    for k in report["missing"]:
        np.testing.assert_array_equal(got[k.removeprefix("['params']")], before[k.removeprefix("['params']")])
    pos = got["['visual']['positional_embedding']"]
    np.testing.assert_array_equal(pos[0], source["['visual']['positional_embedding']"][0])   # class token
    assert len(report["loaded"]) == len(got) - len(report["missing"]) - 1
    text = checkpoint.format_report(report)
    assert "missing" in text and "unexpected" in text and "resized 1" in text


def test_init_from_refuses_mismatched_shapes(reference_run):
    config = tiny_config()
    config.model.embed_dim = 48
    fresh = _init(config)
    with pytest.raises(checkpoint.CheckpointError, match=r"\['visual'\]\['proj'\]: saved \[32, 32\], this model \[32, 48\]"):
        checkpoint.load_model_variables(reference_run[0], {"params": fresh.params, "batch_stats": {}})


def test_init_from_starts_a_new_run_from_a_params_only_checkpoint(tmp_path, capsys):
    src = _init(tiny_config(seed=5))
    checkpoint.save_params(str(tmp_path / "converted"), src.params)
    wd = str(tmp_path / "run")
    config = tiny_config(total_steps=1, init_from=str(tmp_path / "converted"))
    train.train(config, wd)
    assert "init_from" in capsys.readouterr().out
    # The schedule's first learning rate is 0 (warm-up from 0), so after step 1 the
    # parameters are still exactly the converted ones -- not a fresh initialisation.
    after = _leaves(checkpoint.read_arrays(wd)["params"])
    for key, value in _leaves(src.params).items():
        np.testing.assert_array_equal(after[key], value)


def test_nonfinite_step_changes_nothing_but_the_counters():
    config = tiny_config()
    run = train.build(config)
    size, ctx = config.model.vision.image_size, config.model.text.context_length
    good = {"images": jnp.zeros((config.batch_size, size, size, 3)),
            "tokens": jnp.ones((config.batch_size, ctx), jnp.int32)}
    bad = {**good, "images": good["images"].at[0, 0, 0, 0].set(jnp.nan)}
    with run.context():
        state, _ = run.train_step(run.init_state(), good)   # step 1 (its learning rate is 0)
        before = jax.device_get(train.state_to_dict(state))
        state, m = run.train_step(state, bad)
        after = jax.device_get(train.state_to_dict(state))
        assert not np.isfinite(float(m["loss"]))
        assert int(after["step"]) == 2 and int(after["nonfinite_streak"]) == 1
        for key in ("params", "opt_state", "batch_stats"):
            jax.tree.map(np.testing.assert_array_equal, after[key], before[key])
        state, m = run.train_step(state, bad)
        assert int(m["nonfinite_streak"]) == 2 and int(m["nonfinite_steps"]) == 2
        state, m = run.train_step(state, good)
        assert np.isfinite(float(m["loss"])) and int(m["nonfinite_streak"]) == 0
        assert int(m["nonfinite_steps"]) == 2
        np.testing.assert_allclose(float(m["lr"]), run_schedule(config)(1), rtol=1e-6)   # 2nd update
        assert run_schedule(config)(3) > 2 * run_schedule(config)(1)   # not step 4's rate
        changed = jax.tree.leaves(jax.device_get(state.params))
        assert any(not np.array_equal(a, b) for a, b in zip(changed, jax.tree.leaves(before["params"])))


def run_schedule(config):
    from clip_jax import optim
    return optim.make_schedule(config.optim, config.total_steps)


def test_too_many_nonfinite_steps_stop_the_run_with_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    from clip_jax.data import pipeline
    real = pipeline.make_train_iterator

    class PoisonedFrom5:
        """The real batches, with a NaN pixel from batch index 5 (step 6) on."""
        def __init__(self, *args):
            self.inner = real(*args)

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def __iter__(self):
            return self

        def __next__(self):
            poison = self.inner.position >= 5
            batch = next(self.inner)
            if poison:
                # the step takes normalised float pixels too: a NaN one poisons the batch
                size = config.model.vision.image_size      # pixel rows -> [B, S, S, 3]
                images = pipeline.normalize_images(batch["images"].reshape(-1, size, size, 3))
                batch = {**batch, "images": images.at[0, 0, 0, 0].set(jnp.nan)}
            return batch

    monkeypatch.setattr(pipeline, "make_train_iterator", PoisonedFrom5)
    wd = str(tmp_path / "run")
    config = tiny_config(total_steps=20, checkpoint_every=2, max_bad_steps=3)
    with pytest.raises(train.TrainingStopped, match=r"3 steps in a row \(steps 6 to 8\)") as e:
        train.train(config, wd)
    assert "checkpoints/8) is intact" in str(e.value)
    records = metrics.read_metrics(wd)
    assert [r["step"] for r in records] == list(range(1, 9))
    assert all(np.isfinite(r["loss"]) for r in records[:5])
    assert all(np.isnan(r["loss"]) for r in records[5:])
    assert [r["nonfinite_steps"] for r in records[4:]] == [0, 1, 2, 3]
    # Steps 6-8 were skipped: the newest checkpoint (8) holds step 5's parameters, as does 6.
    assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["6", "8"]
    s6, s8 = (checkpoint.read_arrays(os.path.join(wd, "checkpoints", s)) for s in ("6", "8"))
    assert int(s8["nonfinite_total"]) == 3 and int(s6["nonfinite_total"]) == 1
    jax.tree.map(np.testing.assert_array_equal, s8["params"], s6["params"])
    jax.tree.map(np.testing.assert_array_equal, s8["opt_state"], s6["opt_state"])
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(s8["params"]))
    # Resumed, the streak goes on from the checkpoint's 3: the message counts all of them.
    with pytest.raises(train.TrainingStopped, match=r"4 steps in a row \(steps 6 to 9\)"):
        train.train(config, wd)
    # Its checkpoints' weights are finite, but an evaluation of them is told the run diverged.
    import clip_jax
    capsys.readouterr()
    clip_jax.load(wd)
    assert (f"WARNING: checkpoint {wd}/checkpoints/8 was saved after 3 step(s) in a row with a "
            "non-finite loss") in capsys.readouterr().out


def test_truncate_after_drops_later_steps_and_a_half_written_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "loss": 2.5}\n'
                    '{"step": 3, "loss": 2.0}\n{"step": 4, "lo')       # killed mid-write
    metrics.truncate_after(str(path), 2)
    assert path.read_text() == '{"step": 1, "loss": 3.0}\n{"step": 2, "loss": 2.5}\n'
    metrics.truncate_after(str(path), 2)                                 # idempotent
    assert [r["step"] for r in metrics.read_metrics(str(tmp_path))] == [1, 2]


# ---------------------------------------------------------------- issue 38: what a resume must catch

def test_a_changed_workdir_tokenizer_is_refused_on_resume(reference_run, tmp_path):
    """One piece of WORKDIR/tokenizer/spm.model changed: the same ids now mean other text,
    and the resumed run used to train on silently. Its hash is in every checkpoint."""
    import sentencepiece
    wd = str(tmp_path / "run")
    shutil.copytree(reference_run[0], wd)
    spm = os.path.join(wd, "tokenizer", "spm.model")
    sp = sentencepiece.SentencePieceProcessor(model_file=spm)
    piece = next(p for p in map(sp.id_to_piece, range(sp.get_piece_size()))
                 if p.isascii() and p.isalpha() and len(p) >= 3)
    data = open(spm, "rb").read()
    field = bytes([0x0A, len(piece)]) + piece.encode()      # the piece's string in the model proto
    assert data.count(field) == 1
    open(spm, "wb").write(data.replace(field, bytes([0x0A, len(piece)]) + piece.upper().encode()))
    with pytest.raises(checkpoint.CheckpointError, match="trained with another tokenizer") as e:
        train.train(tiny_config(total_steps=12, checkpoint_every=4), wd)
    assert f"{wd}/checkpoints/8" in str(e.value) and spm in str(e.value)
    assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["4", "8"]   # nothing moved
    assert not os.path.exists(os.path.join(wd, "checkpoints.corrupt"))


def test_a_symlinked_checkpoints_directory_keeps_its_corrupt_ones_beside_its_target(reference_run, tmp_path):
    """`checkpoints/` a symlink to another file system: the corrupt checkpoint moves beside
    the link's target, where a rename works (to WORKDIR/checkpoints.corrupt it failed with
    EXDEV, and every restart died; the real cross-device case is in test_faults.py)."""
    wd, elsewhere = str(tmp_path / "run"), str(tmp_path / "disk2" / "ckpts")
    shutil.copytree(reference_run[0], wd)
    os.makedirs(os.path.dirname(elsewhere))
    shutil.move(os.path.join(wd, "checkpoints"), elsewhere)
    os.symlink(elsewhere, os.path.join(wd, "checkpoints"))
    _flip_a_byte(os.path.join(elsewhere, "8"))
    train.train(tiny_config(total_steps=8, checkpoint_every=4), wd)
    assert os.listdir(elsewhere + ".corrupt")[0].startswith("8-")
    assert not os.path.exists(os.path.join(wd, "checkpoints.corrupt"))
    assert _losses(metrics.read_metrics(wd)) == _losses(reference_run[1])


def test_a_corrupt_checkpoint_that_cannot_be_moved_is_skipped_and_then_replaced(reference_run, tmp_path,
                                                                              monkeypatch, capsys):
    from clip_jax import paths
    wd = str(tmp_path / "run")
    shutil.copytree(reference_run[0], wd)
    _flip_a_byte(os.path.join(wd, "checkpoints", "8"))

    def cannot(src, dst):
        raise OSError(18, "Invalid cross-device link", src)
    monkeypatch.setattr(paths, "rename", cannot)
    capsys.readouterr()
    train.train(tiny_config(total_steps=8, checkpoint_every=4), wd)
    out = capsys.readouterr().out
    assert f"WARNING: could not move unusable checkpoint {wd}/checkpoints/8" in out
    assert "it stays in place and is skipped" in out and "resumed from" in out
    assert f"replacing unusable checkpoint {wd}/checkpoints/8" in out
    assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["4", "8"]   # 8 saved again
    assert _losses(metrics.read_metrics(wd)) == _losses(reference_run[1])        # bit for bit
    # ... and it is a good checkpoint now: the next resume uses it.
    capsys.readouterr()
    train.train(tiny_config(total_steps=8, checkpoint_every=4), wd)
    assert "already trained to step 8" in capsys.readouterr().out


# ---------------------------------------------------------------- reading a model's arrays

def _flip_a_byte_of(step_dir, array):
    """Flips one bit inside the stored (compressed) chunk of `array` (e.g. 'params.visual.proj')
    in an OCDBT data file of `step_dir`'s state: found by reading the chunk's bytes through
    TensorStore's OCDBT driver. Orbax then restores different values without complaint."""
    import tensorstore as ts
    state = os.path.join(step_dir, "state")
    kv = ts.KvStore.open({"driver": "ocdbt", "base": f"file://{state}/"}).result()
    key = next(k for k in kv.list().result() if k.startswith(array.encode() + b"/")
               and not k.endswith(b".zarray"))
    chunk = kv.read(key).result().value
    for f in glob.glob(os.path.join(state, "**", "d", "*"), recursive=True):
        data = bytearray(open(f, "rb").read())
        at = data.find(chunk)
        if at >= 0:
            data[at + len(chunk) * 3 // 4] ^= 0x10     # in the literals: a different value
            open(f, "wb").write(bytes(data))
            return
    raise AssertionError(f"{array}'s chunk is in no data file of {state}")


def test_loads_check_checksums_fall_back_past_a_damaged_newest_and_move_nothing(reference_run, tmp_path, capsys):
    import clip_jax
    from clip_jax import convert, evaluate
    wd = str(tmp_path / "run")
    shutil.copytree(reference_run[0], wd)
    step8, step4 = (os.path.join(wd, "checkpoints", s) for s in ("8", "4"))
    intact = checkpoint.read_arrays(step8)["params"]["visual"]["proj"]
    _flip_a_byte_of(step8, "params.visual.proj")
    damaged = checkpoint.read_arrays(step8)["params"]["visual"]["proj"]
    assert not np.array_equal(intact, damaged)                   # Orbax reads it silently
    capsys.readouterr()

    model = clip_jax.load(wd)                      # the run: its newest intact checkpoint
    assert model.source == os.path.join(step4, "state")
    assert (f"WARNING: clip_jax.load: checkpoint {step8} is damaged "
            "(['params']['visual']['proj'] differs from its saved checksum); using the previous one"
            in capsys.readouterr().out)
    np.testing.assert_array_equal(np.asarray(model.variables["params"]["visual"]["proj"]),
                                  checkpoint.read_arrays(step4)["params"]["visual"]["proj"])
    named = rf"checkpoint {step8} is damaged: \['params'\]\['visual'\]\['proj'\] differs from its saved checksum"
    with pytest.raises(checkpoint.CheckpointError, match="clip_jax.load: " + named):
        clip_jax.load(step8)                       # one checkpoint, named: an error
    with pytest.raises(SystemExit, match="error: clip_jax.load: " + named):
        evaluate.main(["zeroshot", "--checkpoint", step8, "--data", "synthetic", "--no-progress"])
    with pytest.raises(checkpoint.CheckpointError, match="SRC: " + named):
        convert.export_open_clip(step8, str(tmp_path / "export" / "model.safetensors"))
    assert not os.path.exists(tmp_path / "export")

    _flip_a_byte_of(step4, "params.text.token_embedding.embedding")
    with pytest.raises(checkpoint.CheckpointError, match=rf"no checkpoint of {wd} is intact: .*8: .*; .*4: "
                                                         r"\['params'\]\['text'\]\['token_embedding'\]"):
        clip_jax.load(wd)
    assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["4", "8"]   # readers move nothing
    assert not os.path.exists(os.path.join(wd, "checkpoints.corrupt"))


def test_save_params_stores_checksums_that_loads_check(tmp_path, capsys):
    src = _init(tiny_config(seed=5))
    target = {"params": src.params, "batch_stats": {}}
    out = str(tmp_path / "converted")
    checkpoint.save_params(out, src.params)
    sums = json.load(open(os.path.join(out, checkpoint.CHECKSUMS_FILE)))["checksums"]
    assert sums == checkpoint.checksums({"params": src.params, "batch_stats": {}})
    checkpoint.load_model_variables(out, target)
    # One flipped bit in one array: an error naming the directory and the array.
    stored = json.load(open(os.path.join(out, checkpoint.CHECKSUMS_FILE)))
    stored["checksums"]["['params']['logit_scale']"] += 1
    open(os.path.join(out, checkpoint.CHECKSUMS_FILE), "w").write(json.dumps(stored))
    with pytest.raises(checkpoint.CheckpointError, match=rf"checkpoint {out} is damaged: "
                                                         r"\['params'\]\['logit_scale'\] differs"):
        checkpoint.load_model_variables(out, target)
    # Written before save_params stored checksums: loaded, with a one-line note.
    os.remove(os.path.join(out, checkpoint.CHECKSUMS_FILE))
    capsys.readouterr()
    checkpoint.load_model_variables(out, target)
    assert f"note: config.init_from: {out} has no saved checksums" in capsys.readouterr().out
