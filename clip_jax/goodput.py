"""Where a run's wall time went, across all its restarts: goodput and badput.

    python -m clip_jax.goodput WORKDIR [--json]

Each invocation of `clip_jax.train` keeps a `Ledger`: a clock that is always in exactly one
category, from the process's start (psutil's create time; else the moment `train` began) to
its last record, so the categories add up to the invocation's wall time by construction:

- `startup`: interpreter and imports, config checks, tokenizer, building the model and the
  data pipeline, and a fresh run's initialisation;
- `restore`: reading the newest checkpoint (a resumed run);
- `compile`: the first step, compiled and run (its run is a step's time, counted here);
- `steps`: training steps, dispatch and waiting for the device;
- `data_wait`: the loop waiting for the next batch;
- `evaluation`: `config.evals` at their steps;
- `checkpoint`: the blocking part of saves (Orbax writes the rest in the background);
- `redone`: steps a restart trains again, up to the furthest step an earlier invocation
  recorded (badput: their first run was lost with the process);
- `shutdown`: from the last step to the end (the final save's wait, closing writers, plots).

Process 0 appends a snapshot of its invocation's totals to WORKDIR/goodput.jsonl at every
logged step, every checkpoint and at the end (one line: invocation id, start, time, step,
seconds per category), and logs `goodput/fraction` and each category's seconds (all
invocations so far) with the step's metrics (metrics.jsonl, TensorBoard, W&B). A killed
invocation's time after its last snapshot, at most one logging interval, is not counted;
neither is the time between invocations (a queued or rebooting job). Goodput is `steps`
over the wall time of all invocations.
"""
import argparse
import collections
import json
import os
import time
import uuid

from clip_jax import paths

CATEGORIES = ("startup", "restore", "compile", "steps", "data_wait", "evaluation", "checkpoint",
              "redone", "shutdown")
FILE = "goodput.jsonl"


def process_start_time():
    """The wall-clock time this process started (psutil), or None."""
    try:
        import psutil
        return psutil.Process(os.getpid()).create_time()
    except Exception:  # noqa: BLE001 -- psutil missing, or no /proc
        return None


def read(workdir):
    """{invocation id: its last snapshot}, in the order the invocations started."""
    path = paths.join(workdir, FILE)
    if not paths.isfile(path):
        return {}
    last = {}
    for line in paths.read_text(path).splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue                         # a line cut short by a kill
        last[record["invocation"]] = record
    return dict(sorted(last.items(), key=lambda kv: kv[1]["start"]))


def totals(snapshots):
    """Seconds per category and wall seconds, summed over invocations' last snapshots."""
    seconds = collections.Counter()
    wall = 0.0
    for s in snapshots:
        seconds.update(s["seconds"])
        wall += s["time"] - s["start"]
    return {c: seconds.get(c, 0.0) for c in CATEGORIES}, wall


class Ledger:
    """This invocation's clock (process 0 writes; the others keep time and write nothing)."""

    def __init__(self, workdir, enabled=True):
        self.enabled, self.path = enabled, paths.join(workdir, FILE)
        now = time.time()
        self.start = min(process_start_time() or now, now)
        self.invocation = uuid.uuid4().hex[:12]
        earlier = list(read(workdir).values()) if enabled else []
        self.earlier, self.earlier_wall = totals(earlier)
        # Steps up to here were trained by an earlier invocation: training them again is badput.
        self.reached = max((s["step"] for s in earlier), default=0)
        self.seconds = dict.fromkeys(CATEGORIES, 0.0)
        self.current, self.since = "startup", self.start
        self.step = self.resumed_from = 0
        self._text = None        # goodput.jsonl's text, on an object store
    def switch(self, category):
        """From now on the clock runs in `category`; the time since the last switch goes to
        the category it was in."""
        now = time.time()
        self.seconds[self.current] += now - self.since
        self.current, self.since = category, now

    def _append(self, line):
        """One line more: appended on a local disk; rewritten whole on an object store, which
        cannot append (a snapshot per logged step, as metrics.jsonl's flushes)."""
        if not paths.is_remote(self.path):
            with open(self.path, "a") as f:
                f.write(line)
            return
        if self._text is None:
            self._text = paths.read_text(self.path) if paths.isfile(self.path) else ""
        self._text += line
        paths.write_text(self.path, self._text)

    def training(self, step):
        """The category of training step `step`: `steps`, or `redone` up to `reached`."""
        return "redone" if step <= self.reached else "steps"

    def move(self, source, target):
        """Counts `source`'s seconds so far as `target`'s (a fresh run's 'restore' is startup)."""
        self.switch(self.current)
        self.seconds[target] += self.seconds[source]
        self.seconds[source] = 0.0

    def record(self, step):
        """Appends a snapshot at `step`; returns the scalars to log (all invocations so far)."""
        self.switch(self.current)
        self.step = max(self.step, int(step))
        if self.enabled:
            line = {"invocation": self.invocation, "start": self.start, "time": self.since,
                    "step": self.step, "seconds": self.seconds, "resumed_from": self.resumed_from,
                    "redone_steps": max(0, min(self.step, self.reached) - self.resumed_from)}
            try:
                self._append(json.dumps(line) + "\n")
            except OSError:
                pass            # the accounting never stops a run; metrics.jsonl reports write errors
        wall = self.earlier_wall + self.since - self.start
        scalars = {f"goodput/{c}_s": self.earlier[c] + self.seconds[c] for c in CATEGORIES}
        scalars["goodput/fraction"] = scalars["goodput/steps_s"] / wall if wall > 0 else 0.0
        return scalars


def report(workdir):
    """The breakdown of WORKDIR's goodput.jsonl: a dict (see `main`)."""
    snapshots = list(read(workdir).values())
    if not snapshots:
        raise ValueError(f"{paths.join(workdir, FILE)}: no goodput records (a run of clip_jax "
                         "before they existed, or not a training workdir)")
    seconds, wall = totals(snapshots)
    return {"workdir": workdir, "invocations": len(snapshots), "wall_s": wall,
            "seconds": seconds, "accounted_s": sum(seconds.values()),
            "goodput": seconds["steps"] / wall if wall > 0 else 0.0,
            "badput": {c: seconds[c] / wall if wall > 0 else 0.0 for c in CATEGORIES if c != "steps"},
            "step": max(s["step"] for s in snapshots),
            "redone_steps": sum(s.get("redone_steps", 0) for s in snapshots)}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m clip_jax.goodput",
                                     description="Where a training run's wall time went.")
    parser.add_argument("workdir")
    parser.add_argument("--json", action="store_true", help="print the breakdown as JSON too")
    args = parser.parse_args(argv)
    try:
        r = report(args.workdir)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    print(f"{r['workdir']}: {r['invocations']} invocation(s) to step {r['step']:,}, "
          f"{r['wall_s']:,.1f} s of wall time")
    for c in CATEGORIES:
        print(f"  {c:<11} {r['seconds'][c]:>12,.1f} s  {r['seconds'][c] / r['wall_s']:>6.1%}")
    print(f"goodput {r['goodput']:.1%} (training steps over wall time); {r['redone_steps']:,} "
          "steps trained again after restarts")
    if args.json:
        print(json.dumps(r))
    return r


if __name__ == "__main__":
    main()
