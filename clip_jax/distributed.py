"""Several processes (hosts) in one run, and preemption.

`initialize` joins this process to the others with `jax.distributed.initialize`: with
explicit coordinator/process arguments, or -- by default -- when JAX detects a cluster
(Cloud TPU VM pod slice, SLURM, Open MPI, Kubernetes) and there is nothing to pass.
A lone process on a laptop or a single GPU/TPU host runs without it.

`Preemption` says, at a step boundary, whether the run was asked to stop (SIGTERM: a
preempted VM or node gets one before it goes down). All processes must stop at the same
step, because saving a checkpoint is a collective: with several processes JAX's
preemption sync service (started by `jax.distributed.initialize`, listening for SIGTERM
on every process) picks a step that every process reaches; a single process just notes
the signal itself. A second SIGTERM to a single process ends it at once, without saving
(exit status 143, as an unhandled SIGTERM): whatever the first one was waiting for (a
hung write, a slow evaluation), the operator's second signal is always honoured, and the
newest complete checkpoint is intact (a save cut short is never committed).

A single process acts on SIGTERM from a thread of its own, not from a Python signal
handler: Python runs a handler on the main thread between bytecodes, so a main thread
blocked in a call that never returns, or a signal the kernel hands to another thread (the
main thread had SIGTERM blocked: the mask is inherited from whatever started the process),
left both signals unanswered. The C-level handler writes the signal's number to
`signal.set_wakeup_fd`'s pipe whichever thread takes it; a daemon thread reads the pipe.
For the run's length the process has SIGTERM unblocked and that pipe as its wakeup fd (an
asyncio loop's own wakeup fd, if the caller had one, is restored by `close`).
"""
import os
import signal
import threading

import jax


def is_main():
    """True on the process that prints and writes files (process 0)."""
    return jax.process_index() == 0


def log(msg):
    """A line on process 0's stdout; the other processes stay quiet."""
    if jax.process_index() == 0:
        print(f"clip_jax: {msg}", flush=True)


def all_processes(flag):
    """True if `flag` holds on every process (a collective: every process must call it)."""
    if jax.process_count() == 1:
        return bool(flag)
    import numpy as np
    from jax.experimental import multihost_utils
    return bool(np.all(multihost_utils.process_allgather(np.array(bool(flag)))))


def allgather_objects(obj):
    """[every process's `obj`] in process order (picklable objects; a collective: every
    process must call it)."""
    if jax.process_count() == 1:
        return [obj]
    import pickle

    import numpy as np
    from jax.experimental import multihost_utils
    data = np.frombuffer(pickle.dumps(obj), np.uint8)
    sizes = multihost_utils.process_allgather(np.array(len(data), np.int64))
    padded = np.zeros(int(np.max(sizes)), np.uint8)
    padded[:len(data)] = data
    gathered = multihost_utils.process_allgather(padded)
    return [pickle.loads(gathered[i, :int(sizes[i])].tobytes()) for i in range(len(sizes))]


def read_shared(n, read):
    """An index of `n` parts read once over all processes: `read(range)` -> list, called by each
    process on its contiguous share of range(n) only; every process returns the whole list
    (the shares concatenated in order). A collective when there are several processes: an
    error on one process (a bad file in its share) is raised on every process, the first
    process's first, rather than leaving the others waiting."""
    count, index = jax.process_count(), jax.process_index()
    if count == 1:
        return list(read(range(n)))
    share = range(n * index // count, n * (index + 1) // count)
    try:
        part = list(read(share))
    except (ValueError, OSError) as e:
        part = _Failed(e)
    parts = allgather_objects(part)
    for part in parts:
        if isinstance(part, _Failed):
            raise part.error
    return [item for part in parts for item in part]


class _Failed:
    """A process's share that raised (`read_shared`)."""

    def __init__(self, error):
        self.error = error


def cluster_detected():
    """True if JAX would find a multi-process cluster environment to initialise from."""
    try:   # JAX's own detection (private module; guarded so a JAX upgrade cannot break us)
        from jax._src.clusters import ClusterEnv
        return any(env.is_env_present() for env in ClusterEnv._cluster_types
                   if not env.opt_in_only_method)
    except Exception:  # noqa: BLE001
        return False


def initialize(mode="auto", coordinator_address=None, num_processes=None, process_id=None):
    """Joins the run's other processes. Returns True if jax.distributed was initialised.

    mode: 'auto' (initialise if explicit arguments are given or a cluster is detected),
    'on' (always; JAX detects the rest), 'off' (never). Must run before any JAX
    computation.
    """
    explicit = coordinator_address is not None or num_processes is not None or process_id is not None
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"--distributed must be auto, on or off, got {mode!r}")
    if mode == "off" or (mode == "auto" and not explicit and not cluster_detected()):
        return False
    if explicit and None in (coordinator_address, num_processes, process_id):
        raise ValueError("--coordinator_address, --num_processes and --process_id go together")
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
    return True


class Preemption:
    """`reached(step)`: stop and save after this step? Install before training starts."""

    def __init__(self):
        self.signalled = False
        self._previous = None
        self._multi = jax.process_count() > 1
        # Asked now, not when the signal comes: the watcher calls nothing that may wait on a
        # lock (JAX's backend lock) that a hung thread holds.
        self._main = jax.process_index() == 0
        if not self._multi:
            read_fd, self._write_fd = os.pipe()
            os.set_blocking(self._write_fd, False)   # set_wakeup_fd's requirement
            self._previous = signal.signal(signal.SIGTERM, _noted_by_the_watcher)
            self._previous_fd = signal.set_wakeup_fd(self._write_fd, warn_on_full_buffer=False)
            self._previous_mask = signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGTERM])
            threading.Thread(target=self._watch, args=(read_fd,), daemon=True,
                             name="clip_jax SIGTERM").start()

    def _watch(self, read_fd):
        """Acts on each SIGTERM byte in the wakeup pipe; ends when `close` closes its other end."""
        with os.fdopen(read_fd, "rb", buffering=0) as pipe:
            while chunk := pipe.read(64):
                for signum in chunk:
                    if signum == signal.SIGTERM:
                        self._on_sigterm()

    def _on_sigterm(self):
        if self.signalled:
            # os.write, not print: print's buffer lock may be held by a hung print.
            os.write(2, b"clip_jax: second SIGTERM: stopping now, without saving; the newest "
                        b"complete checkpoint is intact\n")
            os._exit(128 + signal.SIGTERM)
        self.signalled = True
        if self._main:
            os.write(1, b"clip_jax: SIGTERM: saving a checkpoint after this step, then stopping "
                        b"(a second SIGTERM stops at once)\n")

    def reached(self, step):
        if self._multi:
            from jax.experimental import multihost_utils
            try:
                self.signalled = multihost_utils.reached_preemption_sync_point(step)
            except RuntimeError:   # the preemption service is disabled
                return False
        return self.signalled

    def close(self):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            signal.set_wakeup_fd(self._previous_fd)
            if signal.SIGTERM in self._previous_mask:
                signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM])
            os.close(self._write_fd)          # the watcher reads end-of-file and ends
            self._previous = None


def _noted_by_the_watcher(signum, frame):
    """SIGTERM's Python-level handler: nothing to do (Preemption's thread acts on the signal)."""
