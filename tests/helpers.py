"""Shared test helpers: running code under N fake CPU devices in a fresh interpreter."""
import json
import os
import subprocess
import sys
import textwrap

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def device_env(n_devices):
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n_devices}"
    env["JAX_PLATFORMS"] = "cpu"
    return env


def run_python(code, n_devices=1, timeout=600):
    """Runs `code` with `n_devices` fake devices; returns the JSON its last line prints."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO,
                          env=device_env(n_devices), capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_cli(args, n_devices=1, timeout=900, check=True):
    proc = subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=device_env(n_devices),
                          capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-5000:])
    return proc


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
