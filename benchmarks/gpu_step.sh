#!/usr/bin/env bash
# The on-device benchmark for an NVIDIA GPU host (H100 / H200): the real train step of
# ViT-B/16 and RN50 in bfloat16, samples/s and MFU against the GPU's dense bfloat16 peak
# (989 TFLOP/s for H100 and H200 SXM), run with the process settings of launch/gpu_env.sh.
#
#   pip install -e '.[gpu]' && benchmarks/gpu_step.sh            # all GPUs of this host
#   CUDA_VISIBLE_DEVICES=0 benchmarks/gpu_step.sh                 # one GPU
#
# No rematerialisation (MFU counts no recomputed forward pass). The global batch is
# PER_GPU x the GPUs JAX sees: B16_PER_GPU (default 384) and RN50_PER_GPU (512), the sizes
# clip_jax.aot fits in one H100's 71.2 GiB without remat (57.5 and 61.2 GiB;
# benchmarks/RESULTS.md "GPU hosts"). EXTRA adds flags to both runs (e.g.
# EXTRA=--config.model.remat=true). Each run prints its figures and, last, one JSON line
# (`python -m clip_jax.benchmark --json`).
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python}"
gpus="$("$python" -c 'import jax; print(jax.device_count())')"
b16="${B16_PER_GPU:-384}"
rn50="${RN50_PER_GPU:-512}"
read -r -a extra <<< "${EXTRA:-}"
echo "GPUs: $gpus ($("$python" -c 'import jax; print(jax.devices()[0].device_kind)'))"
for run in "vit_b16 $b16" "rn50 $rn50"; do
  read -r name per_gpu <<< "$run"
  echo "== $name: global batch $((per_gpu * gpus)), bfloat16"
  launch/gpu_env.sh "$python" -m clip_jax.benchmark train --config="configs/$name.py" \
    --config.batch_size="$((per_gpu * gpus))" --config.model.dtype=bfloat16 \
    --config.model.remat=false --steps=10 --warmup=3 --repeats=3 --json "${extra[@]}"
done
