#!/usr/bin/env bash
# Starts N training processes on this machine, joined by jax.distributed: how multi-host
# runs are exercised without a pod (each process is one "host" with its own CPU devices).
#
#   launch/local.sh N --config=configs/smoke.py --workdir=DIR [--config.key=value ...]
#
# Environment:
#   DEVICES_PER_PROCESS  fake CPU devices per process (default 1); N x this = the mesh size
#   COORDINATOR_PORT     port of process 0's coordinator (default: a free one)
#   PYTHON               the interpreter (default: python)
# SIGTERM or Ctrl-C is passed on to every process: they agree on a step, save a
# checkpoint there and exit; rerunning the same command resumes. The exit status is the
# last non-zero status of any process (0 if all succeeded).
set -euo pipefail

if [ "$#" -lt 1 ]; then
  echo "usage: launch/local.sh N [python -m clip_jax.train flags...]" >&2
  exit 2
fi
num_processes="$1"
shift
case "$num_processes" in
  '' | *[!0-9]* | 0)
    echo "launch/local.sh: N must be a positive integer, got '$num_processes'" >&2
    exit 2
    ;;
esac
devices="${DEVICES_PER_PROCESS:-1}"
python="${PYTHON:-python}"
port="${COORDINATOR_PORT:-$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"

pids=()
trap 'kill -TERM "${pids[@]}" 2>/dev/null || true' TERM INT

for ((i = 0; i < num_processes; i++)); do
  JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=${devices}" \
    "$python" -m clip_jax.train --coordinator_address="127.0.0.1:${port}" \
    --num_processes="$num_processes" --process_id="$i" "$@" &
  pids+=("$!")
done

status=0
for pid in "${pids[@]}"; do
  while true; do
    rc=0
    wait "$pid" || rc=$?
    # A trapped signal interrupts `wait` (status > 128) while the process still runs.
    if [ "$rc" -gt 128 ] && kill -0 "$pid" 2>/dev/null; then
      continue
    fi
    break
  done
  if [ "$rc" -ne 0 ]; then
    status="$rc"
  fi
done
exit "$status"
