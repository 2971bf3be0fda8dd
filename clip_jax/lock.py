"""One writer per directory: a lock that a process takes and holds until it ends.

A training run's workdir (and an image-search index) must have one writer: two runs in one
workdir interleave their checkpoints and metrics, and the later silently takes over.
`DirectoryLock(DIR).acquire()` either takes DIR's lock or raises `LockHeld` naming the
holder (`DIR is in use by pid P on HOST since T`).

Decisions:
- **Local directories: `fcntl.lockf` on DIR/lock**, a POSIX record lock. The kernel drops
  it when its process ends, however it ends (SIGKILL, OOM kill, crash), so no lock is ever
  left stuck; forked children (Grain's or the ingest's workers) do not inherit it (a
  `flock` would be shared with them and outlive a killed parent); NFS carries it across
  hosts (v4, or v3 with lockd). The file holds the holder's record (pid, host, start
  time): a second process reads it for its message, and a record left by a holder whose
  lock is gone means that holder died, which the next holder reports when it takes over.
  A record is cleared on release, so an orderly restart says nothing.
- **Where no lock can be taken -- object stores (gs://) and file systems that refuse
  locks (ENOLCK, EOPNOTSUPP: some FUSE mounts, Lustre without `-o flock`) -- a lease**:
  the record, with a heartbeat time, rewritten every `heartbeat_s` by a daemon thread. A
  record not renewed for `lease_s`, or naming a process on this host that no longer runs,
  is stale and taken over; a fresh one is refused with its age. epath offers no atomic
  create-if-absent, so a new holder writes its record, waits `settle_s` (longer than a
  write takes) and reads it back: of two processes starting together the later writer
  wins and the earlier one refuses. A holder that finds its record replaced (its heartbeat
  stalled past the lease) marks the lock `lost`; training checks that before each
  checkpoint and stops. Hosts' clocks are assumed NTP-synchronised (cloud VMs are).
- Nothing here runs per training step: the local lock costs one system call at start, the
  lease one small write per `heartbeat_s` on a thread.
"""
import datetime
import errno
import fcntl
import json
import os
import socket
import threading
import time
import uuid

from clip_jax import paths

LOCK_FILE = "lock"
# Errors by which a file system says it cannot lock at all (then a lease is used).
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}
_held = set()      # local lock files held by this process (POSIX locks do not conflict within one)


class LockHeld(Exception):
    """Another live process holds the lock; the message names it, `holder` is its record."""

    def __init__(self, message, holder=None):
        super().__init__(message)
        self.holder = holder


def _now_iso():
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def _pid_alive(pid):
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, TypeError, OverflowError):
        return True
    return True


def _parse(text):
    try:
        record = json.loads(text)
    except (ValueError, TypeError):
        return None
    return record if isinstance(record, dict) else None


def describe(record):
    """'pid P on HOST since T' for a holder's record."""
    if not record:
        return "another process (it has not written its name yet)"
    return f"pid {record.get('pid', '?')} on {record.get('host', '?')} since {record.get('since', '?')}"


class DirectoryLock:
    """The lock of `directory` (local or remote; see the module docstring).

    `acquire()` returns a line to log when it took over a dead holder's lock (else None)
    and raises `LockHeld` if a live process holds it. `lost` is None while held, else why
    the lock was lost (leases only). `release()` is idempotent.
    """

    def __init__(self, directory, what=None, heartbeat_s=30.0, lease_s=120.0, settle_s=2.0):
        self.directory = paths.resolve(directory)
        self.path = paths.join(self.directory, LOCK_FILE)
        self.what = what or self.directory
        self.heartbeat_s, self.lease_s, self.settle_s = heartbeat_s, lease_s, settle_s
        self.record = {"pid": os.getpid(), "host": socket.gethostname(), "since": _now_iso(),
                       "token": uuid.uuid4().hex}
        self.lost = None
        self.kind = None        # 'local' or 'lease' once acquired
        self._fd = None
        self._stop = threading.Event()
        self._thread = None
        self._renewed = time.monotonic()

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()

    def __del__(self):          # dropped without release(), as an open file would be
        try:
            self.release()
        except Exception:  # noqa: BLE001 -- at interpreter shutdown modules may be gone
            pass

    def _in_use(self, record, extra=""):
        return LockHeld(f"{self.what} is in use by {describe(record)}{extra}", record)

    def acquire(self):
        if not paths.is_remote(self.directory):
            try:
                return self._acquire_local()
            except OSError as e:
                if e.errno not in _NO_LOCKS:
                    raise
        return self._acquire_lease()

    # ------------------------------------------------------------------ local: lockf
    def _acquire_local(self):
        real = os.path.realpath(self.path)
        if real in _held:
            raise self._in_use(self.record, " (this process)")
        os.makedirs(self.directory, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            previous = _parse(os.pread(fd, 65536, 0).decode("utf-8", "replace"))
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise self._in_use(previous) from None
            raise
        previous = _parse(os.pread(fd, 65536, 0).decode("utf-8", "replace"))
        data = json.dumps(self.record).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        os.fsync(fd)
        self._fd, self.kind = fd, "local"
        _held.add(real)
        if previous and previous.get("token") != self.record["token"]:
            return (f"took over the lock of {self.what} from {describe(previous)}, "
                    "which ended without releasing it")
        return None

    # ------------------------------------------------------------------ lease
    def _read(self):
        try:
            return _parse(paths.read_text(self.path))
        except (FileNotFoundError, OSError):
            return None

    def _write(self):
        paths.write_text(self.path, json.dumps({**self.record, "heartbeat": time.time()}))

    def _stale(self, record):
        age = time.time() - float(record.get("heartbeat", 0) or 0)
        if age > self.lease_s:
            return f"not renewed for {age:.0f} s"
        if record.get("host") == socket.gethostname() and not _pid_alive(record.get("pid")):
            return "no longer running"
        return None

    def _acquire_lease(self):
        previous = self._read()
        note = None
        if previous and previous.get("token") != self.record["token"]:
            why = self._stale(previous)
            if why is None:
                age = time.time() - float(previous.get("heartbeat", 0) or 0)
                raise self._in_use(previous, f" (renewed {age:.0f} s ago; a holder silent for "
                                             f"{self.lease_s:.0f} s is considered gone)")
            note = f"took over the lock of {self.what} from {describe(previous)} ({why})"
        self._write()
        time.sleep(self.settle_s)          # start-up only: see the module docstring
        now = self._read()
        if not now or now.get("token") != self.record["token"]:
            raise self._in_use(now, " (it started at the same time)")
        self.kind = "lease"
        self._thread = threading.Thread(target=self._renew, name="clip_jax-lock", daemon=True)
        self._thread.start()
        return note

    def _renew(self):
        self._renewed = time.monotonic()
        while not self._stop.wait(self.heartbeat_s) and self.renew():
            pass

    def renew(self):
        """One heartbeat (the lease thread's): False once the lock is lost (see `lost`)."""
        record = self._read()
        if record is not None and record.get("token") != self.record["token"]:
            self.lost = f"{self.what} was taken over by {describe(record)}"
            return False
        try:
            self._write()
            self._renewed = time.monotonic()
        except Exception:  # noqa: BLE001 -- a failed renewal is retried; the lease decides
            if time.monotonic() - self._renewed > self.lease_s:
                self.lost = f"the lock of {self.what} could not be renewed for {self.lease_s:.0f} s"
                return False
        return True

    # ------------------------------------------------------------------ release
    def release(self):
        if self.kind == "local" and self._fd is not None:
            try:
                os.ftruncate(self._fd, 0)      # an orderly end: the next holder reports nothing
            except OSError:
                pass
            os.close(self._fd)                 # drops the lock
            _held.discard(os.path.realpath(self.path))
            self._fd = None
        elif self.kind == "lease":
            self._stop.set()
            if self._thread is not None:
                self._thread.join()
            record = self._read()
            if record is not None and record.get("token") == self.record["token"]:
                try:
                    paths.path(self.path).unlink()
                except OSError:
                    pass
        self.kind = None
