"""A training run's workdir: named, owned by one run, writable -- checked before any work.

- `check_name`: an empty `--workdir=` is refused (it would write into the current directory).
- `Ownership`: the run holds WORKDIR/lock (`lock.DirectoryLock`) from before it writes
  anything until it ends. With several processes the coordinator (process 0) holds it for
  the job and every process learns the outcome, so a second job stops on all its hosts.
  `check()` (before each checkpoint) stops a run whose lease was taken over.
- `check_writable`: a probe file written and removed, so a read-only or full workdir stops
  the run before the first step, not at its first checkpoint.
- `os_error_message`: one line for a write that failed (no space, quota, read-only,
  permission), from an OSError or from the text of Orbax's / TensorStore's errors, which
  carry the OS error only as text (`[os_error_code='28']`).
"""
import errno
import re
import uuid

import jax

from clip_jax import distributed, lock as lock_lib, paths


class WorkdirError(Exception):
    """The workdir cannot be used or written; the message says why and names it."""


def check_name(workdir):
    if workdir is None or not str(workdir).strip():
        raise WorkdirError("--workdir is empty: name the run's directory (created if missing; "
                           "rerunning with the same one resumes)")


_ERRNO_WORDS = {errno.ENOSPC: "no space left on", errno.EDQUOT: "disk quota exceeded on",
                errno.EROFS: "read-only file system:", errno.EACCES: "permission denied on",
                errno.EPERM: "permission denied on"}
_ERRNO_TEXT = {"No space left on device": errno.ENOSPC, "Disk quota exceeded": errno.EDQUOT,
               "Read-only file system": errno.EROFS, "Permission denied": errno.EACCES}


def error_number(exc):
    """The OS error number behind `exc` (also when only its text carries it), else None."""
    for e in _chain(exc):
        if isinstance(e, OSError) and e.errno:
            return e.errno
        text = str(e)
        m = re.search(r"os_error_code='(\d+)'", text)
        if m:
            return int(m.group(1))
        for words, number in _ERRNO_TEXT.items():
            if words in text:
                return number
    return None


def _chain(exc):
    seen = []
    while exc is not None and exc not in seen and len(seen) < 10:
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__
    return seen


def short_reason(exc, limit=300):
    """The first line of an exception, at most `limit` characters, with its type."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text = text if len(text) <= limit else text[:limit] + " ..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def os_error_message(exc, where, doing):
    """'no space left on WHERE (DOING)' and the like; `where`: the directory to name."""
    number = error_number(exc)
    if number in _ERRNO_WORDS:
        return f"{_ERRNO_WORDS[number]} {where} ({doing})"
    return f"{doing} failed: {short_reason(exc)}"


def check_writable(directory, what):
    """Writes and removes a probe file in `directory` (created if missing)."""
    probe = paths.join(directory, f".clip_jax-write-test-{uuid.uuid4().hex[:8]}")
    try:
        paths.makedirs(directory)
        paths.write_text(probe, "ok")
        paths.path(probe).unlink()
    except OSError as e:
        raise WorkdirError(os_error_message(e, directory, f"{what} must be writable")) from None


class Ownership:
    """The workdir's lock, held by process 0 for the whole job (see the module docstring)."""

    def __init__(self, workdir, **lock_options):
        self.workdir = paths.resolve(workdir)
        self.lock = (lock_lib.DirectoryLock(self.workdir, what=self.workdir, **lock_options)
                     if jax.process_index() == 0 else None)

    def acquire(self, writable=()):
        """Takes the lock (process 0), then checks that each (directory, what) in `writable`
        can be written (every process: each writes its own checkpoint shards); raises
        WorkdirError on every process if any of this fails anywhere."""
        error = None
        if self.lock is not None:
            try:
                note = self.lock.acquire()
                if note:
                    distributed.log(note)
            except lock_lib.LockHeld as e:
                error = str(e)
            except OSError as e:
                error = os_error_message(e, self.workdir, "taking the workdir's lock")
        if error is None:
            try:
                for directory, what in writable:
                    check_writable(directory, what)
            except WorkdirError as e:
                error = str(e)
        if not distributed.all_processes(error is None):
            self.release()
            raise WorkdirError(error or f"{self.workdir}: another process of this run could not "
                                        "lock or write it (see its error)")

    def check(self):
        """Raises WorkdirError if the lock was lost (a collective with several processes)."""
        lost = self.lock.lost if self.lock is not None else None
        if not distributed.all_processes(lost is None):
            raise WorkdirError(f"{lost or 'process 0 lost the workdir lock'}: this run stops "
                               "without writing more")

    def release(self):
        if self.lock is not None:
            self.lock.release()
