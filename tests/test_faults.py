"""Faults a run's workdir meets on a shared cluster (issue 38): a second run, a full disk,
a read-only or cross-device checkpoints directory, a hang answered by SIGTERM, bad names.

Real file-system faults need a file system that can be filled or mounted read-only: those
tests run in a private mount namespace (`unshare -rm`, no privileges needed where user
namespaces are enabled) with a small tmpfs, and are skipped, saying why, where that is
not possible. Kills, resumes and the same-workdir race against an uninterrupted run are
in test_resume.py; the checkpoint fallbacks in process in test_checkpoint.py.
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from clip_jax import lock, metrics, train, workdir
from tests.helpers import REPO, device_env, tiny_config, tiny_flags, wait_for


def test_an_empty_workdir_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("", "  "):
        with pytest.raises(workdir.WorkdirError, match="--workdir is empty"):
            train.train(tiny_config(), name)
    assert os.listdir(tmp_path) == []             # nothing written into the current directory


def test_an_unwritable_checkpoints_directory_stops_the_run_before_its_first_step(tmp_path, monkeypatch):
    from clip_jax import paths
    real = paths.write_text

    def read_only_checkpoints(p, text):
        if "/checkpoints/" in str(p):
            raise OSError(30, "Read-only file system", str(p))
        return real(p, text)
    monkeypatch.setattr(paths, "write_text", read_only_checkpoints)
    wd = tmp_path / "run"
    with pytest.raises(workdir.WorkdirError) as e:
        train.train(tiny_config(), str(wd))
    assert str(e.value) == (f"read-only file system: {wd}/checkpoints (its checkpoints directory "
                            "must be writable)")
    assert not (wd / "metrics.jsonl").exists()
    assert (wd / "lock").read_text() == ""        # released


def test_a_cut_metrics_line_is_dropped_with_a_warning_naming_the_file(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    # A crash of the file system can leave a line cut short but ended by a newline.
    path.write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "lo\n{"step": 3, "loss": 2.0}\n'
                    '{"step": 4, "loss": 1.5}\n')
    assert [r["step"] for r in metrics.read_metrics(str(tmp_path))] == [1, 3, 4]
    metrics.truncate_after(str(path), 3)                         # what a resume at step 3 does
    assert path.read_text() == '{"step": 1, "loss": 3.0}\n{"step": 3, "loss": 2.0}\n'
    out = capsys.readouterr().out
    assert f"WARNING: {path} line 2 is not a whole record" in out


def test_a_tensorboard_write_error_stops_the_run_instead_of_hanging_it(tmp_path, monkeypatch):
    """tensorboardX's SummaryWriter wrote on a thread that died on ENOSPC; the next events
    then blocked the training loop forever on the thread's full queue. Now the error is
    raised where the loop writes, naming the workdir."""
    from tensorboardX import event_file_writer

    def full(self, data):
        raise OSError(28, "No space left on device")
    writer = metrics.MetricWriter(str(tmp_path), start_step=0)
    monkeypatch.setattr(event_file_writer.EventsWriter, "_write_serialized_event", full)
    with pytest.raises(workdir.WorkdirError, match=f"^no space left on {tmp_path} "):
        for step in range(1, 40):      # more than the old queue's 10 events
            writer.write(step, {"loss": 1.0, "lr": 0.1})
    writer.close()


# ---------------------------------------------------------------- SIGTERM while the loop hangs

HANG_AT_STEP_5 = """
import signal, sys, threading
from clip_jax import metrics, train
BLOCK = sys.argv.pop(1) == "block"
real = metrics.MetricWriter.write
def write(self, step, scalars):
    if step == 5:
        if BLOCK:     # the kernel then hands SIGTERM to one of the process's other threads
            signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM])
        print("hanging", flush=True)
        threading.Event().wait()      # a write that never returns (a hung file system)
    return real(self, step, scalars)
metrics.MetricWriter.write = write
sys.argv = ["train", *sys.argv[1:]]
train.main()
"""


@pytest.mark.parametrize("main_thread", ["waiting", "block"])
def test_a_second_sigterm_stops_a_hung_run_at_once(tmp_path, main_thread):
    """A Python signal handler runs on the main thread only; with SIGTERM blocked there
    (or landing on another thread, as it did in CI once), neither signal was answered."""
    wd = tmp_path / "run"
    log_path = tmp_path / "log"
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-c", HANG_AT_STEP_5, main_thread,
                             "--config=configs/smoke.py",
                             *tiny_flags(total_steps=50, checkpoint_every=2), f"--workdir={wd}"],
                            cwd=REPO, env=device_env(1), stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: "hanging" in log_path.read_text(), 300, "step 5", proc)
        proc.send_signal(signal.SIGTERM)
        wait_for(lambda: "SIGTERM: saving a checkpoint after this step" in log_path.read_text(),
                 30, "the first SIGTERM's message", proc, log_path)
        time.sleep(0.5)
        assert proc.poll() is None            # still hung: the step never ends
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 128 + signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
    out = log_path.read_text()
    assert "second SIGTERM: stopping now, without saving" in out
    assert "2" in os.listdir(wd / "checkpoints")      # committed before the hang, intact
    assert (wd / "lock").read_text()         # a stopped holder's record; the next run takes over


# ---------------------------------------------------------------- several processes, one lock

def test_a_multi_process_job_is_refused_by_a_held_workdir_on_every_process(tmp_path):
    wd = tmp_path / "run"
    held = lock.DirectoryLock(wd)
    held.acquire()
    try:
        t0 = time.monotonic()
        proc = subprocess.run(["bash", "launch/local.sh", "2", "--config=configs/smoke.py",
                               *tiny_flags(), f"--workdir={wd}"], cwd=REPO,
                              env={**device_env(1), "PYTHON": sys.executable}, capture_output=True,
                              text=True, timeout=300)
        elapsed = time.monotonic() - t0
    finally:
        held.release()
    assert proc.returncode == 1, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    # Process 0 names the holder, process 1 stops because of it; neither waits for a
    # timeout of the collectives.
    assert len(errors) == 2, proc.stderr[-3000:]
    holder = f"error: {wd} is in use by pid {os.getpid()} on {socket.gethostname()} since "
    assert sum(e.startswith(holder) for e in errors) == 1, errors
    assert f"error: {wd}: another process of this run could not lock or write it (see its error)" in errors
    assert elapsed < 120
    assert not (wd / "config.json").exists()


# ---------------------------------------------------------------- real file systems (tmpfs)

def _namespace_works():
    if not shutil.which("unshare"):
        return "no unshare command"
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt && "
                            "mount --bind /mnt /mnt && mount -o remount,bind,ro /mnt"],
                           capture_output=True, text=True)
    return None if probe.returncode == 0 else f"unshare -rm cannot mount here: {probe.stderr.strip()}"


needs_mounts = pytest.mark.skipif(_namespace_works() is not None, reason=str(_namespace_works()))


def _in_namespace(code, timeout=600):
    """Runs Python `code` as root of a private user + mount namespace; the JSON of its last line."""
    proc = subprocess.run(["unshare", "-rm", sys.executable, "-c", textwrap.dedent(code)], cwd=REPO,
                          env={**device_env(1), "PYTHONPATH": REPO}, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-5000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


FULL_DISK = """
import json, os, re, subprocess, sys, time
mnt = {mnt!r}
os.makedirs(mnt, exist_ok=True)
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", mnt], check=True)
wd = os.path.join(mnt, "run")
cmd = [sys.executable, "-m", "clip_jax.train", "--config=configs/smoke.py", *{flags!r}, "--workdir=" + wd]
proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
def logged():
    try:
        return [json.loads(l)["step"] for l in open(os.path.join(wd, "metrics.jsonl")) if l.endswith("\\n")]
    except (OSError, ValueError):
        return []
while len(logged()) < 25 and proc.poll() is None:
    time.sleep(0.02)
with open(os.path.join(mnt, "filler"), "wb") as f:     # the disk fills up
    try:
        while True:
            f.write(b"\\0" * (1 << 20))
            f.flush()
    except OSError:
        pass
t0 = time.monotonic()
try:
    out, err = proc.communicate(timeout=120)
except subprocess.TimeoutExpired:
    proc.kill()
    out, err = proc.communicate()
stopped_after = time.monotonic() - t0
os.remove(os.path.join(mnt, "filler"))
m = re.search(r"checkpoints/(\\d+), is intact", err)
resume = subprocess.run(cmd + ["--config.total_steps=%d" % (int(m.group(1)) + 2 if m else 1)],
                        capture_output=True, text=True)
print(json.dumps({{"rc": proc.returncode, "stopped_after": stopped_after, "stderr": err, "stdout": out,
                  "named": int(m.group(1)) if m else None, "resume_rc": resume.returncode,
                  "resume_out": resume.stdout + resume.stderr[-2000:]}}))
"""


@needs_mounts
def test_a_full_disk_stops_the_run_in_seconds_with_one_line_and_the_newest_checkpoint_resumes(tmp_path):
    flags = tiny_flags(total_steps=5000, checkpoint_every=10, log_every=1)
    r = _in_namespace(FULL_DISK.format(mnt=str(tmp_path / "mnt"), flags=flags))
    assert r["rc"] == 1, r
    assert r["stopped_after"] < 30, r
    errors = [line for line in r["stderr"].splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in r["stderr"], r["stderr"][-3000:]
    wd = f"{tmp_path}/mnt/run"
    assert errors[0].startswith(f"error: no space left on {wd}"), errors
    assert r["named"] is not None and r["named"] >= 10, errors       # a checkpoint committed before
    assert f"The newest complete checkpoint, {wd}/checkpoints/{r['named']}, is intact" in errors[0]
    assert r["resume_rc"] == 0 and f"resumed from {wd}/checkpoints/{r['named']} " in r["resume_out"], r


MOUNTED = """
import glob, json, os, subprocess
from clip_jax import checkpoint, metrics, train, workdir
from tests.helpers import tiny_config
base = {base!r}
def run(wd, **kw):
    train.train(tiny_config(total_steps=8, checkpoint_every=4, **kw), wd)
out = {{}}
# A read-only checkpoints directory: refused before the first step.
wd = os.path.join(base, "ro")
os.makedirs(os.path.join(wd, "checkpoints"))
subprocess.run(["mount", "--bind", wd + "/checkpoints", wd + "/checkpoints"], check=True)
subprocess.run(["mount", "-o", "remount,bind,ro", wd + "/checkpoints"], check=True)
try:
    run(wd)
except workdir.WorkdirError as e:
    out["read_only"] = str(e)
out["read_only_metrics"] = os.path.exists(os.path.join(wd, "metrics.jsonl"))
# checkpoints/ a symlink to another file system, its newest checkpoint corrupt.
other = os.path.join(base, "other")
os.makedirs(other)
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", other], check=True)
wd = os.path.join(base, "linked")
os.makedirs(wd)
os.makedirs(os.path.join(other, "ckpts"))
os.symlink(os.path.join(other, "ckpts"), os.path.join(wd, "checkpoints"))
run(wd)
reference = {{r["step"]: r["loss"] for r in metrics.read_metrics(wd)}}
big = max((f for f in glob.glob(os.path.join(other, "ckpts", "8", "state", "**", "d", "*"), recursive=True)
           if os.path.isfile(f)), key=os.path.getsize)
data = bytearray(open(big, "rb").read())
data[len(data) // 2] ^= 0x10
open(big, "wb").write(bytes(data))
run(wd)
out["linked_moved"] = os.listdir(os.path.join(other, "ckpts.corrupt"))
out["linked_steps"] = sorted(os.listdir(os.path.join(other, "ckpts")))
out["linked_same_losses"] = {{r["step"]: r["loss"] for r in metrics.read_metrics(wd)}} == reference
print(json.dumps(out))
"""


@needs_mounts
def test_read_only_and_cross_device_checkpoint_directories(tmp_path):
    r = _in_namespace(MOUNTED.format(base=str(tmp_path)))
    assert r["read_only"] == (f"read-only file system: {tmp_path}/ro/checkpoints (its checkpoints "
                              "directory must be writable)"), r
    assert not r["read_only_metrics"]
    # The corrupt checkpoint moved beside the symlink's target (a rename across file systems
    # to WORKDIR/checkpoints.corrupt failed with EXDEV, and every restart died).
    assert len(r["linked_moved"]) == 1 and r["linked_moved"][0].startswith("8-"), r
    assert r["linked_steps"] == ["4", "8"] and r["linked_same_losses"], r
