#!/usr/bin/env bash
# Runs a command with the process settings of a GPU training job (NVIDIA GPUs):
#
#   launch/gpu_env.sh python -m clip_jax.train --config=configs/vit_b16.py --workdir=runs/b16
#   launch/gpu_env.sh python -m clip_jax.aot --config=configs/vit_b16.py --topology=h100:32x8
#
# launch/slurm.sbatch runs every training process through it, and benchmarks/gpu_step.sh the
# on-device benchmark; clip_jax.aot compiled under it reports what those processes will
# hold. clip_jax itself never changes its process's environment. It adds, unless you set
# it yourself:
# - XLA_PYTHON_CLIENT_MEM_FRACTION=0.90: XLA's allocator takes 90% of each GPU's memory
#   instead of JAX's default 75%, the rest left to the CUDA context, cuBLAS/cuDNN handles
#   and NCCL's buffers, which live outside it. clip_jax.aot reports `fits` against the same
#   90% (clip_jax.pod.GPU_MEMORY_FRACTION); at 75% ViT-B/16's largest batch on one H100
#   host is smaller (BUILD_NOTES "GPU clusters").
# No XLA or NCCL flag is added: each candidate that GPU JAX trainers set was compiled into
# the real step and changed nothing, or only for the worse (benchmarks/gpu_flags.py;
# BUILD_NOTES "GPU clusters" has the table).
set -euo pipefail

if [ "$#" -lt 1 ]; then
  echo "usage: launch/gpu_env.sh COMMAND [ARGS...]" >&2
  exit 2
fi

export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}"
exec "$@"
