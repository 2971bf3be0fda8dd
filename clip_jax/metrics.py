"""Where training metrics go: DIR/metrics.jsonl, TensorBoard events, and a PNG plot at the end;
also Weights & Biases when `config.wandb.project` is set (`WandbRun`).

Only process 0 writes. Each jsonl line is one logged step: {"step": k, "loss": ..., ...}.
A run resumed from step S first drops the lines (and TensorBoard events) after S, which a
killed run logged past its last checkpoint, so the file keeps one history.

DIR may be remote (`paths`). An object store cannot append, so there metrics.jsonl is
rewritten whole, at most every `REMOTE_FLUSH_SECONDS` (GCS allows about one write a second
to one object), at every checkpoint (`flush`) and at the end: a killed run loses only
lines logged after its last checkpoint, which the resumed run drops anyway. TensorBoard
events on gs:// or s3:// go through tensorboardX's own writers (google-cloud-storage,
boto3).

A write that fails (a full disk, a quota, a read-only mount) raises `workdir.WorkdirError`
naming the workdir in the training loop's thread. TensorBoard events are therefore written
synchronously (tensorboardX's `EventsWriter`, flushed every `FLUSH_SECONDS` and at each
checkpoint), not through tensorboardX's `SummaryWriter`: that one queues events to a
writer thread, which dies on a write error, after which the training loop blocked forever
on the full queue (a run on a full disk hung for 14 minutes, SIGTERM unanswered).
A few scalars per logged step cost microseconds to serialise.
"""
import io
import json
import os
import secrets
import time

import jax

from clip_jax import paths
from clip_jax.distributed import log
from clip_jax.workdir import WorkdirError, os_error_message

REMOTE_FLUSH_SECONDS = 30.0
FLUSH_SECONDS = 30.0     # TensorBoard events on local disk (metrics.jsonl is flushed per line)


class _Events:
    """TensorBoard scalars in one event file, written in the caller's thread."""

    def __init__(self, logdir, purge_step):
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto.event_pb2 import Event, SessionLog
        from tensorboardX.record_writer import directory_check
        from tensorboardX.summary import scalar
        self._event, self._scalar = Event, scalar
        directory_check(logdir)
        self._writer = EventsWriter(os.path.join(logdir, "events") if not paths.is_remote(logdir)
                                    else f"{logdir.rstrip('/')}/events")
        # As SummaryWriter(purge_step=...): TensorBoard drops events at or after this step
        # that an earlier, killed invocation wrote.
        self._writer.write_event(Event(step=purge_step, wall_time=time.time(),
                                       session_log=SessionLog(status=SessionLog.START)))

    def add_scalars(self, step, scalars):
        now = time.time()
        for tag, value in scalars.items():
            self._writer.write_event(self._event(wall_time=now, step=step, summary=self._scalar(tag, value)))

    def flush(self):
        self._writer.flush()

    def close(self):
        self._writer.close()


class MetricWriter:
    """Appends to DIR/metrics.jsonl and TensorBoard; `start_step`: the step training resumes
    after (0 for a fresh run) -- anything logged after it is dropped first."""

    def __init__(self, workdir, start_step=0, enabled=None, config=None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.workdir = paths.resolve(workdir)
        self.path = paths.join(workdir, "metrics.jsonl")
        self._remote = paths.is_remote(workdir)
        self._tb = self._file = self._wandb = None
        if self.enabled and config is not None and config.get("wandb", {}).get("project"):
            self._wandb = WandbRun(workdir, config)
        if self.enabled:
            with self._writing("opening metrics.jsonl and tensorboard/"):
                paths.makedirs(workdir)
                kept = truncate_after(self.path, start_step)
                self._tb = _Events(paths.join(workdir, "tensorboard"), purge_step=start_step + 1)
                if self._remote:
                    self._lines, self._flushed = kept, len(kept)
                else:
                    self._file = open(self.path, "a")
            self._last_flush = time.monotonic()

    def _writing(self, doing):
        return _RaisesWorkdirError(self.workdir, doing)

    def write(self, step, scalars):
        if not self.enabled:
            return
        record = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
        line = json.dumps(record) + "\n"
        with self._writing("writing metrics.jsonl and tensorboard/"):
            if self._remote:
                self._lines.append(line)
            else:
                self._file.write(line)
                self._file.flush()
            self._tb.add_scalars(record["step"], {k: v for k, v in record.items() if k != "step"})
        if self._wandb is not None:
            self._wandb.log(record["step"], {k: v for k, v in record.items() if k != "step"})
        if time.monotonic() - self._last_flush >= (REMOTE_FLUSH_SECONDS if self._remote else FLUSH_SECONDS):
            self.flush()

    def flush(self):
        """Makes every line and event written so far durable."""
        if not self.enabled:
            return
        with self._writing("writing metrics.jsonl and tensorboard/"):
            if self._remote and len(self._lines) != self._flushed:
                paths.write_text(self.path, "".join(self._lines))
                self._flushed = len(self._lines)
            self._tb.flush()
        self._last_flush = time.monotonic()

    def close(self):
        if not self.enabled:
            return
        try:
            self.flush()
        finally:
            for f in (self._file, self._tb, self._wandb):
                if f is not None:
                    try:
                        f.close()
                    except OSError:
                        pass      # flush() above has raised what matters
            self._file = self._tb = self._wandb = None


class WandbRun:
    """The run in Weights & Biases (process 0 only): the config once, then each logged step's
    scalars at that step. Its id is kept in WORKDIR/wandb_run_id, so a resumed run continues
    the same W&B run (`resume="allow"`); W&B keeps a run's history append-only, so the steps
    a killed run logged after its last checkpoint stay there from the first attempt (W&B
    warns when they are logged again), where metrics.jsonl and TensorBoard drop them. Its
    local files go under WORKDIR/wandb (W&B's default directory when WORKDIR is remote, or
    WANDB_DIR when set). wandb is imported here only: nothing of it runs without a project."""

    def __init__(self, workdir, config):
        try:
            import wandb
        except ImportError:
            raise WorkdirError("config.wandb.project is set but wandb is not installed: "
                               "pip install -e '.[wandb]'") from None
        cfg = config.wandb
        id_path = paths.join(workdir, "wandb_run_id")
        run_id = paths.read_text(id_path).strip() if paths.isfile(id_path) else secrets.token_hex(4)
        # W&B writes under DIR/wandb.
        local = None if paths.is_remote(workdir) or os.environ.get("WANDB_DIR") else \
            paths.resolve(workdir)
        try:
            self._run = wandb.init(project=cfg.project, entity=cfg.entity or None, mode=cfg.mode,
                                   name=cfg.name or None, id=run_id, resume="allow", dir=local,
                                   config=json.loads(config.to_json_best_effort()))
        except Exception as e:  # noqa: BLE001 -- wandb's own errors (no login, no network, ...)
            raise WorkdirError(f"config.wandb: W&B could not start the run ({type(e).__name__}: "
                               f"{e}); log in with `wandb login`, or set --config.wandb.mode="
                               "offline (sync later) or --config.wandb.project= (off)") from None
        paths.write_text(id_path, run_id + "\n")

    def log(self, step, scalars):
        self._run.log(dict(scalars), step=int(step))

    def close(self):
        self._run.finish()


class _RaisesWorkdirError:
    """A block whose OSError becomes a WorkdirError naming the workdir ('no space left on
    WORKDIR (writing metrics.jsonl)')."""

    def __init__(self, workdir, doing):
        self.workdir, self.doing = workdir, doing

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if isinstance(exc, OSError):
            raise WorkdirError(os_error_message(exc, self.workdir, self.doing)) from exc
        return False


def _records(path, text=None):
    """(line, record) for each line of a metrics.jsonl that holds a whole record. A line a
    killed run left half-written (no newline), or cut short by a crash of the file system
    (not JSON, or not a record), is left out with a warning naming the file and line."""
    out = []
    for number, line in enumerate(io.StringIO(paths.read_text(path) if text is None else text), 1):
        if not line.strip():
            continue
        record = None
        if line.endswith("\n"):
            try:
                record = json.loads(line)
            except ValueError:
                pass
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            if line.endswith("\n"):        # a half-written last line is routine after a kill
                log(f"WARNING: {path} line {number} is not a whole record ({line[:60]!r}); dropped")
            continue
        out.append((line, record))
    return out


def truncate_after(path, step):
    """Drops the lines of a metrics.jsonl whose step is after `step`, and lines that are not
    whole records (see `_records`), atomically. Returns the lines kept."""
    if not paths.exists(path):
        return []
    text = paths.read_text(path)
    keep = [line for line, record in _records(path, text) if record["step"] <= step]
    if "".join(keep) != text:
        paths.write_text(path, "".join(keep))
    return keep


def read_metrics(workdir):
    """All logged records, a later line for the same step replacing an earlier one."""
    by_step = {}
    for _, rec in _records(paths.join(workdir, "metrics.jsonl")):
        by_step.setdefault(rec["step"], {}).update(rec)
    return [by_step[s] for s in sorted(by_step)]


def plot_metrics(workdir, keys=("loss", "temperature", "lr", "zeroshot/top1")):
    """Writes DIR/metrics.png with one panel per key that was logged."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    records = read_metrics(workdir)
    keys = [k for k in keys if any(k in r for r in records)]
    if not keys:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3), squeeze=False)
    for ax, key in zip(axes[0], keys):
        pts = [(r["step"], r[key]) for r in records if key in r]
        ax.plot(*zip(*pts), marker="." if len(pts) < 30 else None)
        ax.set_title(key)
        ax.set_xlabel("step")
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    plt.close(fig)
    path = paths.join(workdir, "metrics.png")
    paths.write_bytes(path, png.getvalue())
    return path
