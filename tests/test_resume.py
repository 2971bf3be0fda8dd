"""Interrupted runs, resumed: SIGTERM and SIGKILL, other meshes, several processes (subprocesses).

Every run here is `python -m clip_jax.train` (or launch/local.sh) on a tiny model (the
smoke config's code path, compiled in seconds) with a fixed seed; the reference is the
same command left alone. Signals are sent from outside, at whatever point the run is.
"""
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.helpers import (REPO, device_env, logged_steps, read_jsonl, run_cli, run_python,
                           start_cli, tiny_flags, wait_for)

pytestmark = pytest.mark.slow

TOTAL = 150
FLAGS = ["--config=configs/smoke.py",
         *tiny_flags(batch_size=64, total_steps=TOTAL, checkpoint_every=20, data__synthetic__num_eval=64)]
EXACT_KEYS = ("loss", "lr", "grad_norm", "temperature", "logit_scale", "nonfinite_steps")


def train_cmd(workdir):
    return ["clip_jax.train", *FLAGS, f"--workdir={workdir}"]


def metrics(workdir):
    return read_jsonl(os.path.join(workdir, "metrics.jsonl"))


def checkpoint_steps(workdir):
    d = os.path.join(workdir, "checkpoints")
    return sorted(int(s) for s in os.listdir(d) if s.isdigit()) if os.path.isdir(d) else []


def assert_one_history_equal_to(records, reference, keys=EXACT_KEYS, rtol=0.0):
    assert [r["step"] for r in records] == list(range(1, TOTAL + 1))     # nothing logged twice
    for got, want in zip(records, reference):
        for key in keys:
            if rtol:
                np.testing.assert_allclose(got[key], want[key], rtol=rtol, err_msg=f"step {got['step']} {key}")
            else:
                assert got[key] == want[key], (got["step"], key, got[key], want[key])
    if rtol:
        assert records[-1]["zeroshot/top1"] == pytest.approx(reference[-1]["zeroshot/top1"], abs=0.05)
    else:
        assert records[-1]["zeroshot/top1"] == reference[-1]["zeroshot/top1"]


@pytest.fixture(scope="module")
def reference_1dev(tmp_path_factory):
    wd = tmp_path_factory.mktemp("ref1")
    run_cli(train_cmd(wd))
    return metrics(wd)


@pytest.mark.xdist_group("resume_reference_1dev")   # shares the module-scoped run
def test_sigterm_saves_at_the_current_step_and_the_resumed_run_is_bit_exact(reference_1dev, tmp_path):
    wd = tmp_path / "run"
    proc = start_cli(train_cmd(wd), log=tmp_path / "log1")
    wait_for(lambda: len(logged_steps(wd)) >= 25, 300, "step 25", proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(120) == 0, (tmp_path / "log1").read_text()[-3000:]
    log = (tmp_path / "log1").read_text()
    assert "preempted (SIGTERM): saved a checkpoint at step" in log
    stopped = max(checkpoint_steps(wd))
    assert 25 <= stopped < TOTAL, f"SIGTERM did not interrupt the run (stopped at {stopped})"
    assert logged_steps(wd)[-1] == stopped            # nothing was lost or run past the save
    proc = run_cli(train_cmd(wd))
    assert f"resumed from {wd}/checkpoints/{stopped}" in proc.stdout
    assert_one_history_equal_to(metrics(wd), reference_1dev)


@pytest.mark.xdist_group("resume_reference_1dev")   # shares the module-scoped run
def test_sigkill_resumes_from_the_last_periodic_checkpoint_bit_exact(reference_1dev, tmp_path):
    wd = tmp_path / "run"
    proc = start_cli(train_cmd(wd), log=tmp_path / "log1")
    wait_for(lambda: 40 in checkpoint_steps(wd) and len(logged_steps(wd)) >= 45, 300,
             "checkpoint 40 and step 45", proc)
    proc.kill()
    proc.wait(60)
    last_logged = logged_steps(wd)[-1]
    newest = max(checkpoint_steps(wd))
    assert newest < last_logged < TOTAL, "SIGKILL should leave steps logged past the newest checkpoint"
    proc = run_cli(train_cmd(wd))
    assert f"resumed from {wd}/checkpoints/{newest}" in proc.stdout
    assert_one_history_equal_to(metrics(wd), reference_1dev)


def test_goodput_counts_the_steps_redone_after_two_kills_and_adds_up_to_the_wall_time(tmp_path):
    """A run killed twice (SIGKILL, past a periodic checkpoint) and resumed: goodput.jsonl
    holds its three invocations; the steps trained again are those between each restored
    checkpoint and the step the killed invocation had reached (to within the one step a
    kill may fall between the goodput line and the metrics line); each invocation's
    categories add up to its wall time, and the last one's wall time is what the test
    measured around it, less the process's exit after its last record."""
    from clip_jax import goodput
    wd = tmp_path / "run"
    flags = ["--config=configs/smoke.py", *tiny_flags(total_steps=60, checkpoint_every=10),
             f"--workdir={wd}"]
    expected = 0
    for k, (checkpoint, reached) in enumerate(((10, 15), (30, 35))):
        proc = start_cli(["clip_jax.train", *flags], log=tmp_path / f"log{k}")
        wait_for(lambda: checkpoint in checkpoint_steps(wd) and len(logged_steps(wd)) >= reached,
                 300, f"checkpoint {checkpoint} and step {reached}", proc, tmp_path / f"log{k}")
        proc.kill()
        proc.wait(60)
        expected += logged_steps(wd)[-1] - max(checkpoint_steps(wd))
    t0 = time.time()
    run_cli(["clip_jax.train", *flags])
    measured = time.time() - t0
    r = goodput.report(str(wd))
    assert r["invocations"] == 3 and r["step"] == 60
    assert expected >= 10 and expected <= r["redone_steps"] <= expected + 2
    assert r["seconds"]["redone"] > 0 and r["seconds"]["restore"] > 0 and r["seconds"]["compile"] > 0
    assert r["accounted_s"] == pytest.approx(r["wall_s"], rel=1e-9)
    last = list(goodput.read(str(wd)).values())[-1]
    assert sum(last["seconds"].values()) == pytest.approx(last["time"] - last["start"], rel=1e-9)
    # From the process's start (imports included), not the ledger's creation: the ledger
    # misses only the exit after its last record (interpreter and JAX teardown, 4 s here).
    assert 0.7 * measured - 3 < last["time"] - last["start"] <= measured + 0.5
    out = run_cli(["clip_jax.goodput", str(wd)]).stdout
    assert "3 invocation(s) to step 60" in out and "redone" in out and "goodput" in out
    logged = metrics(wd)[-1]          # logged with the metrics: all invocations so far
    assert 0 < logged["goodput/fraction"] < 1
    assert 0 < logged["goodput/redone_s"] <= r["seconds"]["redone"]
    assert logged["goodput/restore_s"] == pytest.approx(r["seconds"]["restore"])


@pytest.mark.xdist_group("resume_reference_1dev")   # shares the module-scoped run
def test_a_second_run_in_a_busy_workdir_is_refused_and_the_first_is_untouched(reference_1dev, tmp_path):
    """Two runs in one workdir (a SLURM requeue racing a manual restart) interleaved their
    checkpoints and metrics, and the second, with another lr, silently took over."""
    wd = tmp_path / "run"
    first = start_cli(train_cmd(wd), log=tmp_path / "log1")
    wait_for(lambda: os.path.exists(wd / "lock") and (wd / "lock").read_text(), 300, "the lock", first)
    second = run_cli([*train_cmd(wd), "--config.optim.lr=0.05"], check=False)
    assert first.poll() is None                   # the second really met a running first
    assert second.returncode == 1
    assert second.stderr.strip().splitlines()[-1].startswith(
        f"error: {wd} is in use by pid {first.pid} on {socket.gethostname()} since ")
    assert first.wait(300) == 0
    assert_one_history_equal_to(metrics(wd), reference_1dev)
    assert json.loads((wd / "config.json").read_text())["optim"]["lr"] != 0.05


def _kill_mid_save(proc, checkpoints_dir, timeout=300):
    """SIGKILLs `proc` while an async save is in flight (Orbax's uncommitted
    `<step>.orbax-checkpoint-tmp` directory exists); returns that directory's name, or None
    if the run ended first."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        saving = [n for n in (os.listdir(checkpoints_dir) if os.path.isdir(checkpoints_dir) else [])
                  if ".orbax-checkpoint-tmp" in n]
        if saving:
            proc.kill()
            return saving[0]
        time.sleep(0.001)
    return None


@pytest.mark.xdist_group("resume_reference_1dev")   # shares the module-scoped run
def test_sigkills_at_random_moments_and_mid_save_leave_one_uninterrupted_history(reference_1dev, tmp_path):
    """12 SIGKILLs -- 4 after a random number of steps, 4 during a save, 4 at a random
    moment of a start (imports, lock, tokenizer, restore) -- then the same command to the
    end: every logged step equals the uninterrupted run's, bit for bit, each once."""
    rng = random.Random(38)
    wd = tmp_path / "run"
    kills, cut_saves = 0, []
    for i in range(12):
        proc = start_cli(train_cmd(wd), log=tmp_path / f"log{i}")
        kind = ("steps", "save", "start")[i % 3]
        if kind == "steps":
            target = min(TOTAL - 1, max(checkpoint_steps(wd), default=0) + rng.randint(1, 20))
            wait_for(lambda: (logged_steps(wd) or [0])[-1] >= target, 300, f"step {target}", proc)
            proc.kill()
        elif kind == "save":
            cut = _kill_mid_save(proc, wd / "checkpoints")
            assert cut is not None, "the run ended before a save"
            cut_saves.append(cut)
        else:
            time.sleep(rng.uniform(0.3, 5.0))
            proc.kill()
        assert proc.wait(60) == -signal.SIGKILL, (tmp_path / f"log{i}").read_text()[-3000:]
        kills += 1
    assert kills == 12 and len(cut_saves) == 4
    proc = run_cli(train_cmd(wd))
    assert "done" in proc.stdout
    assert_one_history_equal_to(metrics(wd), reference_1dev)


# ---------------------------------------------------------------- several processes, other meshes

@pytest.fixture(scope="module")
def reference_8dev(tmp_path_factory):
    wd = tmp_path_factory.mktemp("ref8")
    run_cli(train_cmd(wd), n_devices=8)
    return metrics(wd)


RESTORE = """
import json, os, sys
import numpy as np
from clip_jax import checkpoint, train
from tests.helpers import tiny_config
config = tiny_config(batch_size=64)
config.mesh.data, config.mesh.fsdp = {mesh}
run = train.build(config)
ckpt = checkpoint.Checkpointer(os.path.join({workdir!r}, "checkpoints"), 2, run.mesh)
with run.context():
    state, data_state, meta = ckpt.restore_latest(train.state_to_dict(run.abstract_state))
np.savez({out!r}, **{{k: np.asarray(v) for k, v in checkpoint._flat(state).items()}})
emb = state["params"]["text"]["token_embedding"]["embedding"]
print(json.dumps({{"next_batch": data_state["next_batch"], "step": meta["step"],
                  "mesh": dict(run.mesh.shape), "spec": str(emb.sharding.spec)}}))
"""


def test_two_processes_as_two_slices_equal_one_and_their_checkpoint_resumes_on_another_mesh(reference_8dev, tmp_path):
    from clip_jax import checkpoint
    wd = tmp_path / "run"
    # 2 processes x 4 devices, joined by jax.distributed, each process a slice (the data axis
    # across them as across TPU slices: `mesh.slices`); SIGTERM to the launcher.
    with open(tmp_path / "log_mp", "w") as log:
        launcher = subprocess.Popen(
            ["bash", "launch/local.sh", "2", *FLAGS, "--config.mesh.slices=2", f"--workdir={wd}"],
            cwd=REPO,
            env={**device_env(1), "DEVICES_PER_PROCESS": "4", "PYTHON": sys.executable},
            stdout=log, stderr=subprocess.STDOUT)
        wait_for(lambda: len(logged_steps(wd)) >= 25, 600, "step 25 of the 2-process run", launcher,
                 tmp_path / "log_mp")
        launcher.send_signal(signal.SIGTERM)
        assert launcher.wait(180) == 0, (tmp_path / "log_mp").read_text()[-3000:]
    log = (tmp_path / "log_mp").read_text()
    assert "mesh data=8 (2 slices x 4) x fsdp=1 x model=1 (8 devices, 2 processes)" in log
    assert log.count("preempted (SIGTERM)") == 1          # only process 0 logs
    stopped = max(checkpoint_steps(wd))
    assert 25 <= stopped < TOTAL
    before = metrics(wd)
    assert [r["step"] for r in before] == list(range(1, stopped + 1))
    # Same losses as 1 process x 8 devices, up to the summation order of the collectives
    # (gloo across processes vs. in-process); measured differences are ~1 ulp.
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose([r[key] for r in before], [r[key] for r in reference_8dev[:stopped]],
                                   rtol=1e-5)

    # Restored on 2 devices (1 process) and on a 4x2 data x fsdp mesh: the saved values exactly.
    def by_name(flat):   # read_arrays gives optax's named tuples back as dicts
        return {re.sub(r"\.(\w+)", r"['\1']", k): v for k, v in flat.items()}

    saved = by_name(checkpoint._flat(checkpoint.read_arrays(str(wd))))
    for n_devices, mesh in ((2, (2, 1)), (8, (4, 2))):
        out = tmp_path / f"restored_{n_devices}.npz"
        info = run_python(RESTORE.format(mesh=mesh, workdir=str(wd), out=str(out)), n_devices=n_devices)
        assert info["step"] == info["next_batch"] == stopped
        assert info["mesh"] == {"data": mesh[0], "fsdp": mesh[1], "model": 1}
        if mesh[1] == 2:
            assert "fsdp" in info["spec"]                 # really laid out on the new mesh
        restored = by_name(dict(np.load(out)))
        assert set(restored) == set(saved)
        for k, v in restored.items():
            np.testing.assert_array_equal(v, saved[k], err_msg=k)

    # The same command, now 1 process on 2 devices, finishes the run.
    proc = run_cli(train_cmd(wd), n_devices=2)
    assert f"resumed from {wd}/checkpoints/{stopped} (saved by 2 process(es), 8 devices" in proc.stdout
    assert_one_history_equal_to(metrics(wd), reference_8dev, keys=("loss", "grad_norm"), rtol=1e-5)
