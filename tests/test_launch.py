"""launch/: the scripts pass shellcheck, and local.sh refuses bad arguments.

The 2-process run through local.sh is in test_resume.py; the TPU VM and SLURM scripts
cannot run here (no gcloud, no SLURM) and are checked by shellcheck and by reading.
"""
import glob
import os
import shutil
import subprocess

import pytest

from tests.helpers import REPO

SCRIPTS = sorted(glob.glob(os.path.join(REPO, "launch", "*.sh")) + [os.path.join(REPO, "launch", "slurm.sbatch"),
                                                                  os.path.join(REPO, "benchmarks", "gpu_step.sh")])


def test_every_launch_script_is_there_and_executable():
    names = {os.path.basename(p) for p in SCRIPTS}
    assert {"local.sh", "tpu_vm.sh", "slurm.sbatch", "cpu_env.sh", "gpu_env.sh"} <= names
    assert all(os.access(p, os.X_OK) for p in SCRIPTS)


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed (test extra)")
@pytest.mark.parametrize("script", SCRIPTS, ids=os.path.basename)
def test_shellcheck_is_clean(script):
    proc = subprocess.run(["shellcheck", "--severity=style", script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


@pytest.mark.parametrize("args, message", [([], "usage"), (["two"], "positive integer"),
                                           (["0"], "positive integer")])
def test_local_sh_refuses_bad_process_counts(args, message):
    proc = subprocess.run(["bash", "launch/local.sh", *args], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and message in proc.stderr


def test_tpu_vm_sh_needs_a_command_and_a_bucket():
    proc = subprocess.run(["bash", "launch/tpu_vm.sh"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and "usage" in proc.stderr
    env = {k: v for k, v in os.environ.items() if k != "BUCKET"}
    proc = subprocess.run(["bash", "launch/tpu_vm.sh", "train"], cwd=REPO, capture_output=True,
                          text=True, env=env)
    assert proc.returncode == 2 and "BUCKET" in proc.stderr


def _cpu_env(environ):
    proc = subprocess.run(["bash", "launch/cpu_env.sh", "env"], cwd=REPO, capture_output=True,
                          text=True, env=environ, check=True)
    return dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)


def test_cpu_env_sh_adds_the_cpu_settings_and_keeps_the_users():
    base = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "GLIBC_TUNABLES")}
    env = _cpu_env({**base, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
    assert env["XLA_FLAGS"].split() == ["--xla_force_host_platform_device_count=2",
                                        "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"]
    thp = "/sys/kernel/mm/transparent_hugepage/enabled"
    huge_pages = os.path.exists(thp) and "[never]" not in open(thp).read()
    assert (env.get("GLIBC_TUNABLES") == "glibc.malloc.hugetlb=1") == huge_pages
    # The user's own choices are kept as they are.
    own = _cpu_env({**base, "XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=",
                    "GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})
    assert own["XLA_FLAGS"] == "--xla_cpu_experimental_ynn_fusion_type="
    assert own["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=0"
    proc = subprocess.run(["bash", "launch/cpu_env.sh"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and "usage" in proc.stderr


def test_gpu_env_sh_gives_xla_the_memory_share_aot_fits_against_and_keeps_the_users():
    """launch/gpu_env.sh (slurm.sbatch runs every training process through it) gives XLA's
    allocator the share of GPU memory that clip_jax.aot reports `fits` against."""
    from clip_jax import pod
    base = {k: v for k, v in os.environ.items() if k != "XLA_PYTHON_CLIENT_MEM_FRACTION"}

    def gpu_env(env):
        proc = subprocess.run(["bash", "launch/gpu_env.sh", "env"], cwd=REPO, env=env,
                              capture_output=True, text=True, check=True)
        return dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)

    assert float(gpu_env(base)["XLA_PYTHON_CLIENT_MEM_FRACTION"]) == pod.GPU_MEMORY_FRACTION
    assert gpu_env({**base, "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.8"})["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.8"
    proc = subprocess.run(["bash", "launch/gpu_env.sh"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and "usage" in proc.stderr
    with open(os.path.join(REPO, "launch", "slurm.sbatch")) as f:
        assert "srun --kill-on-bad-exit=1 launch/gpu_env.sh " in f.read()
