#!/usr/bin/env bash
# Cloud TPU VM pod slice: create it, install clip_jax on every worker, train on all workers.
#
#   launch/tpu_vm.sh create                 # gcloud compute tpus tpu-vm create ...
#   launch/tpu_vm.sh install                # this checkout + venv + bucket mount, all workers
#   launch/tpu_vm.sh train [train flags]    # python -m clip_jax.train on all workers (detached)
#   launch/tpu_vm.sh logs                   # follow worker 0's log
#   launch/tpu_vm.sh stop                   # SIGTERM: save a checkpoint and exit, all workers
#   launch/tpu_vm.sh delete
#
# Settings (environment variables; defaults in brackets):
#   TPU_NAME [clip-jax]  ZONE [us-central2-b]  PROJECT [gcloud's default]
#   ACCELERATOR [v4-32]  RUNTIME [tpu-ubuntu2204-base]  SPOT [unset; 1 = spot VMs]
#   BUCKET [required for install/train: gs://NAME, mounted with gcsfuse at /mnt/clip_jax
#           on every worker so all processes share the workdir]
#   CONFIG [configs/rn50.py]  RUN [the run's directory name in the bucket; default rn50]
#
# Each worker runs one process driving its local TPU chips; jax.distributed is
# initialised automatically (JAX detects the pod slice). Rerunning `train` with the same
# RUN resumes from the newest checkpoint in gs://BUCKET/RUN/checkpoints; after a spot
# preemption: `create`, `install`, `train` again.
set -euo pipefail

TPU_NAME="${TPU_NAME:-clip-jax}"
ZONE="${ZONE:-us-central2-b}"
ACCELERATOR="${ACCELERATOR:-v4-32}"
RUNTIME="${RUNTIME:-tpu-ubuntu2204-base}"
repo_root="$(cd "$(dirname "$0")/.." && pwd)"
CONFIG="${CONFIG:-configs/rn50.py}"
RUN="${RUN:-rn50}"
MOUNT=/mnt/clip_jax

gcloud_tpu=(gcloud compute tpus tpu-vm)
where=(--zone="$ZONE")
if [ -n "${PROJECT:-}" ]; then
  where+=(--project="$PROJECT")
fi

# Runs a shell command on every worker of the slice.
on_all_workers() {
  "${gcloud_tpu[@]}" ssh "$TPU_NAME" "${where[@]}" --worker=all --command="$1"
}

need_bucket() {
  if [ -z "${BUCKET:-}" ]; then
    echo "launch/tpu_vm.sh: set BUCKET=gs://NAME (the shared workdir)" >&2
    exit 2
  fi
}

cmd="${1:-}"
shift || true
case "$cmd" in
  create)
    spot=()
    if [ -n "${SPOT:-}" ]; then
      spot=(--spot)
    fi
    "${gcloud_tpu[@]}" create "$TPU_NAME" "${where[@]}" --accelerator-type="$ACCELERATOR" \
      --version="$RUNTIME" "${spot[@]}"
    ;;
  install)
    need_bucket
    # The code is this checkout's committed HEAD, copied to every worker.
    archive="$(mktemp -d)/clip_jax.tar.gz"
    git -C "$repo_root" archive --format=tar.gz -o "$archive" HEAD
    "${gcloud_tpu[@]}" scp "$archive" "$TPU_NAME:clip_jax.tar.gz" "${where[@]}" --worker=all
    on_all_workers "set -e
      if ! command -v gcsfuse >/dev/null; then
        echo 'deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -cs) main' | sudo tee /etc/apt/sources.list.d/gcsfuse.list
        curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null
        sudo apt-get update -q && sudo apt-get install -y -q gcsfuse python3-venv
      fi
      sudo mkdir -p $MOUNT && sudo chown \$USER $MOUNT
      mountpoint -q $MOUNT || gcsfuse --implicit-dirs ${BUCKET#gs://} $MOUNT
      rm -rf ~/clip_jax && mkdir ~/clip_jax && tar -xzf ~/clip_jax.tar.gz -C ~/clip_jax
      python3 -m venv ~/venv
      ~/venv/bin/pip install -q --upgrade pip
      ~/venv/bin/pip install -q -e ~/clip_jax 'jax[tpu]'"
    ;;
  train)
    need_bucket
    printf -v extra ' %q' "$@"
    on_all_workers "cd ~/clip_jax && nohup ~/venv/bin/python -m clip_jax.train \
      --config=$CONFIG --workdir=$MOUNT/$RUN$extra > ~/train.log 2>&1 < /dev/null &"
    echo "started on all workers; follow with: launch/tpu_vm.sh logs"
    ;;
  logs)
    "${gcloud_tpu[@]}" ssh "$TPU_NAME" "${where[@]}" --worker=0 --command="tail -f ~/train.log"
    ;;
  stop)
    on_all_workers "pkill -TERM -f 'clip_jax.train' || true"
    ;;
  delete)
    "${gcloud_tpu[@]}" delete "$TPU_NAME" "${where[@]}" --quiet
    ;;
  *)
    echo "usage: launch/tpu_vm.sh {create|install|train [flags]|logs|stop|delete}" >&2
    exit 2
    ;;
esac
