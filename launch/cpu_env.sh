#!/usr/bin/env bash
# Runs a command with the process settings that make XLA:CPU faster on a CPU host:
#
#   launch/cpu_env.sh python -m clip_jax.train --config=configs/smoke.py --workdir=runs/smoke
#
# Opt-in, and for CPU hosts only: clip_jax itself never changes its process's environment,
# and a TPU or GPU host needs none of this. It adds, unless you set them yourself:
# - to XLA_FLAGS, --xla_cpu_experimental_ynn_fusion_type=-individual_convolution:
#   convolutions run as XLA:CPU's own convolution kernels, not YNNPACK's, which ran
#   RN50's 3x3 convolutions slower (an unknown flag aborts XLA, so only jaxlib builds
#   that have it should get it: this one has been checked against jaxlib 0.10.2);
# - to GLIBC_TUNABLES, glibc.malloc.hugetlb=1 (glibc with transparent huge pages in
#   `madvise` or `always` mode): malloc asks for 2 MiB pages for XLA:CPU's per-step
#   buffers, which are otherwise faulted in and zeroed 4 KiB at a time every step.
# BUILD_NOTES ("Platform ops on CPU") has the measured effect of each. Results are unchanged.
set -euo pipefail

if [ "$#" -lt 1 ]; then
  echo "usage: launch/cpu_env.sh COMMAND [ARGS...]" >&2
  exit 2
fi

ynn_flag="--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"
case " ${XLA_FLAGS:-} " in
  *" --xla_cpu_experimental_ynn_fusion_type"*) ;;
  *) export XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }$ynn_flag" ;;
esac

thp=/sys/kernel/mm/transparent_hugepage/enabled
if getconf GNU_LIBC_VERSION >/dev/null 2>&1 && [ -r "$thp" ] && ! grep -q '\[never\]' "$thp"; then
  case ":${GLIBC_TUNABLES:-}:" in
    *":glibc.malloc.hugetlb="*) ;;
    *) export GLIBC_TUNABLES="${GLIBC_TUNABLES:+$GLIBC_TUNABLES:}glibc.malloc.hugetlb=1" ;;
  esac
fi

exec "$@"
