"""Where training metrics go: DIR/metrics.jsonl, TensorBoard events, and a PNG plot at the end.

Only process 0 writes. Each jsonl line is one logged step: {"step": k, "loss": ..., ...}.
A run resumed from step S first drops the lines (and TensorBoard events) after S, which a
killed run logged past its last checkpoint, so the file keeps one history.
"""
import json
import os

import jax


class MetricWriter:
    """Appends to DIR/metrics.jsonl and TensorBoard; `start_step`: the step training resumes
    after (0 for a fresh run) -- anything logged after it is dropped first."""

    def __init__(self, workdir, start_step=0, enabled=None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        if self.enabled:
            from tensorboardX import SummaryWriter
            os.makedirs(workdir, exist_ok=True)
            truncate_after(self.path, start_step)
            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=start_step + 1)
            self._file = open(self.path, "a")

    def write(self, step, scalars):
        if not self.enabled:
            return
        record = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        for k, v in record.items():
            if k != "step":
                self._tb.add_scalar(k, v, record["step"])

    def close(self):
        if self.enabled:
            self._file.close()
            self._tb.close()


def truncate_after(path, step):
    """Drops the lines of a metrics.jsonl whose step is after `step` (atomically), and a
    last line that a killed run left half-written."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    keep = [line for line in lines if line.endswith("\n") and json.loads(line)["step"] <= step]
    if len(keep) != len(lines):
        with open(path + ".tmp", "w") as f:
            f.writelines(keep)
        os.replace(path + ".tmp", path)


def read_metrics(workdir):
    """All logged records, a later line for the same step replacing an earlier one."""
    by_step = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
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
    path = os.path.join(workdir, "metrics.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
