"""lock.py: one holder per directory, locally (lockf) and on a bucket (a lease).

The whole-run cases (a second training run refused, a multi-process job, a killed holder
during training) are in test_faults.py and test_resume.py.
"""
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from clip_jax import lock
from tests.helpers import REPO


def _hold_in_child(directory):
    """A child process that takes the lock of `directory`, says so, and waits to be killed."""
    code = textwrap.dedent(f"""
        import sys, time
        from clip_jax import lock
        held = lock.DirectoryLock({str(directory)!r})
        held.acquire()
        print("held", flush=True)
        time.sleep(600)
    """)
    child = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": REPO})
    assert child.stdout.readline().strip() == "held"
    return child


def test_a_live_holder_is_named_and_a_dead_ones_lock_is_taken_over(tmp_path):
    child = _hold_in_child(tmp_path)
    try:
        with pytest.raises(lock.LockHeld) as e:
            lock.DirectoryLock(tmp_path).acquire()
        assert f"{tmp_path} is in use by pid {child.pid} on {socket.gethostname()} since " in str(e.value)
    finally:
        child.send_signal(signal.SIGKILL)       # no release: the kernel drops the lock
        child.wait()
    held = lock.DirectoryLock(tmp_path)
    note = held.acquire()
    assert note and f"from pid {child.pid} on {socket.gethostname()}" in note
    assert "ended without releasing it" in note
    record = json.loads((tmp_path / lock.LOCK_FILE).read_text())
    assert record["pid"] == os.getpid()
    with pytest.raises(lock.LockHeld, match="this process"):    # POSIX locks do not see their own process
        lock.DirectoryLock(tmp_path).acquire()
    held.release()
    assert (tmp_path / lock.LOCK_FILE).read_text() == ""         # an orderly release leaves no holder
    again = lock.DirectoryLock(tmp_path)
    assert again.acquire() is None                               # ... so the next says nothing
    again.release()


def test_where_files_cannot_be_locked_a_lease_is_used(tmp_path, monkeypatch):
    def refuse(*args):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(lock.fcntl, "lockf", refuse)
    first = lock.DirectoryLock(tmp_path, settle_s=0.0)
    assert first.acquire() is None and first.kind == "lease"
    with pytest.raises(lock.LockHeld, match=fr"pid {os.getpid()} on .*\(renewed 0 s ago"):
        lock.DirectoryLock(tmp_path, settle_s=0.0).acquire()
    first.release()
    assert not (tmp_path / lock.LOCK_FILE).exists()


def _lease_record(directory, **fields):
    record = {"pid": 1, "host": "elsewhere", "since": "then", "token": "theirs", "heartbeat": time.time()}
    record.update(fields)
    from clip_jax import paths
    paths.write_text(f"{directory}/{lock.LOCK_FILE}", json.dumps(record))


@pytest.fixture(scope="module")
def bucket():
    pytest.importorskip("gcsfs")
    pytest.importorskip("gcp_storage_emulator")
    from tests.helpers import GCS_BUCKET, gcs_emulator
    with gcs_emulator():
        yield f"gs://{GCS_BUCKET}"


def test_a_lease_on_a_bucket(bucket):
    from clip_jax import paths
    d = f"{bucket}/leases/run"
    fast = dict(heartbeat_s=3600.0, lease_s=5.0, settle_s=0.0)     # heartbeats by hand below
    # A holder on another host, renewed recently: refused, with its age.
    _lease_record(d)
    with pytest.raises(lock.LockHeld, match=r"in use by pid 1 on elsewhere since then \(renewed 0 s ago"):
        lock.DirectoryLock(d, **fast).acquire()
    # Not renewed for longer than the lease: taken over, and said so.
    _lease_record(d, heartbeat=time.time() - 60)
    ours = lock.DirectoryLock(d, **fast)
    assert "not renewed for 60 s" in ours.acquire()
    # A process of this host that no longer runs: taken over at once.
    ours.release()
    dead = subprocess.Popen(["true"])
    dead.wait()
    _lease_record(d, pid=dead.pid, host=socket.gethostname())
    ours = lock.DirectoryLock(d, **fast)
    assert "no longer running" in ours.acquire()
    # The holder renews; one that finds its record replaced knows it lost the lock.
    before = json.loads(paths.read_text(f"{d}/{lock.LOCK_FILE}"))["heartbeat"]
    assert ours.renew() and ours.lost is None
    assert json.loads(paths.read_text(f"{d}/{lock.LOCK_FILE}"))["heartbeat"] > before
    _lease_record(d, pid=7, host="intruder")
    assert not ours.renew()
    assert ours.lost and "taken over by pid 7 on intruder" in ours.lost
    ours.release()                                    # leaves the intruder's record alone
    assert json.loads(paths.read_text(f"{d}/{lock.LOCK_FILE}"))["host"] == "intruder"


def test_two_lease_holders_starting_together_do_not_both_win(bucket):
    """Both find no holder and write their record; the settle-and-read-back makes one refuse."""
    d = f"{bucket}/leases/race"
    a = lock.DirectoryLock(d, settle_s=0.5)
    b = lock.DirectoryLock(d, settle_s=0.5)
    import threading
    results = {}

    def take(name, held):
        try:
            results[name] = held.acquire() or "ok"
        except lock.LockHeld as e:
            results[name] = e
    threads = [threading.Thread(target=take, args=(n, h)) for n, h in (("a", a), ("b", b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    won = [n for n, r in results.items() if r == "ok"]
    assert len(won) == 1, results
    (a if won == ["a"] else b).release()
