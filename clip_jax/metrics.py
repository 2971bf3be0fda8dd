"""Where training metrics go: DIR/metrics.jsonl, TensorBoard events, and a PNG plot at the end.

Only process 0 writes. Each jsonl line is one logged step: {"step": k, "loss": ..., ...}.
A run resumed from step S first drops the lines (and TensorBoard events) after S, which a
killed run logged past its last checkpoint, so the file keeps one history.

DIR may be remote (`paths`). An object store cannot append, so there metrics.jsonl is
rewritten whole, at most every `REMOTE_FLUSH_SECONDS` (GCS allows about one write a second
to one object), at every checkpoint (`flush`) and at the end: a killed run loses only
lines logged after its last checkpoint, which the resumed run drops anyway. TensorBoard
events on gs:// or s3:// go through tensorboardX's own writers (google-cloud-storage,
boto3).
"""
import io
import json
import time

import jax

from clip_jax import paths

REMOTE_FLUSH_SECONDS = 30.0


class MetricWriter:
    """Appends to DIR/metrics.jsonl and TensorBoard; `start_step`: the step training resumes
    after (0 for a fresh run) -- anything logged after it is dropped first."""

    def __init__(self, workdir, start_step=0, enabled=None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.path = paths.join(workdir, "metrics.jsonl")
        self._remote = paths.is_remote(workdir)
        self._tb = None
        if self.enabled:
            from tensorboardX import SummaryWriter
            paths.makedirs(workdir)
            kept = truncate_after(self.path, start_step)
            self._tb = SummaryWriter(paths.join(workdir, "tensorboard"), purge_step=start_step + 1)
            if self._remote:
                self._lines, self._flushed, self._last_flush = kept, len(kept), time.monotonic()
            else:
                self._file = open(self.path, "a")

    def write(self, step, scalars):
        if not self.enabled:
            return
        record = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
        line = json.dumps(record) + "\n"
        if self._remote:
            self._lines.append(line)
            if time.monotonic() - self._last_flush >= REMOTE_FLUSH_SECONDS:
                self.flush()
        else:
            self._file.write(line)
            self._file.flush()
        for k, v in record.items():
            if k != "step":
                self._tb.add_scalar(k, v, record["step"])

    def flush(self):
        """Makes every line written so far durable (a no-op locally, where each line is)."""
        if self.enabled and self._remote and len(self._lines) != self._flushed:
            paths.write_text(self.path, "".join(self._lines))
            self._flushed, self._last_flush = len(self._lines), time.monotonic()

    def close(self):
        if self.enabled:
            if self._remote:
                self.flush()
            else:
                self._file.close()
            self._tb.close()


def truncate_after(path, step):
    """Drops the lines of a metrics.jsonl whose step is after `step` (atomically), and a
    last line that a killed run left half-written. Returns the lines kept."""
    if not paths.exists(path):
        return []
    lines = [line for line in io.StringIO(paths.read_text(path)) if line.strip()]
    keep = [line for line in lines if line.endswith("\n") and json.loads(line)["step"] <= step]
    if len(keep) != len(lines):
        paths.write_text(path, "".join(keep))
    return keep


def read_metrics(workdir):
    """All logged records, a later line for the same step replacing an earlier one."""
    by_step = {}
    for line in io.StringIO(paths.read_text(paths.join(workdir, "metrics.jsonl"))):
        if line.strip():
            rec = json.loads(line)
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
