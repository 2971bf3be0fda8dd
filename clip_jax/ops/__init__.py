"""The kernels the models run on, and which ones a run uses: chosen once from the mesh's
devices.

The models (`clip_jax/models`) call every platform-dependent piece on an `ops` object, an
`Ops` (plain.py): `matmul` (every dense layer), `conv` and `batch_norm` (the ResNet),
`avg_pool` (the ResNet's pools), `attention`, and `scan_convolutions`. `Ops` is the plain
code, which is what runs on TPUs, whose compiler fuses and lays out those pieces itself;
`PLAIN` is every module's default. `CpuOps` (cpu.py) subclasses it with the XLA:CPU
variants, a test checking each against the plain piece, forward and backward; `GpuOps`
(gpu.py) with cuDNN's flash attention, which the GPU compile shows (tests/test_aot_gpu.py).

`config.kernels` is a runtime choice, not architecture: it lives outside the saved model
block, so a checkpoint loads with whatever kernels suit the host that reads it
(`clip_jax.load(..., kernels=)`). Its keys:
- `ops`, one of `CHOICES`: 'auto' (default) is `CpuOps` on a mesh of CPU devices,
  `GpuOps` on a mesh of GPUs, the plain code on any other (TPUs); 'xla' the plain code
  everywhere (e.g. to compare); 'cpu' `CpuOps`, only on CPU devices (they pin XLA:CPU
  memory layouts); 'gpu' `GpuOps`, only on GPU devices (cuDNN exists nowhere else);
- `cpu_ops_off`, comma-separated names from `PIECES`: those pieces of `CpuOps` are left to
  the plain code, what a side-by-side run turns off to measure what each gains;
- `gpu_ops_off`, the same for `GpuOps` (`GPU_PIECES`).

This package owns those names: config_lib's defaults are plain literals (it imports
nothing of clip_jax), and config validation asks `check`.

The choice is made from the devices of the mesh the model runs on, never from the
process's default backend, so a step traced on a CPU host for a TPU topology (clip_jax.aot)
is the TPU program.
"""
from clip_jax.ops.cpu import PIECES, CpuOps
from clip_jax.ops.gpu import PIECES as GPU_PIECES
from clip_jax.ops.gpu import GpuOps
from clip_jax.ops.plain import PLAIN, Ops

__all__ = ["CHOICES", "GPU_PIECES", "PIECES", "PLAIN", "CpuOps", "GpuOps", "Ops", "check",
           "from_config", "select"]

CHOICES = ("auto", "xla", "cpu", "gpu")
# The platform each platform-only choice needs (jax's `Device.platform`).
_NEEDS = {"cpu": "cpu", "gpu": "gpu"}


def _choice(name):
    if name not in CHOICES:
        raise ValueError(f"config.kernels.ops: must be one of {CHOICES} (got {name!r})")
    return name


def _pieces_off(kernels_cfg, platform):
    """`config.kernels.{platform}_ops_off` as piece names (each checked by the kernels)."""
    key = f"{platform}_ops_off"
    text = kernels_cfg.get(key, "")
    off = frozenset(p.strip() for p in str(text or "").split(",") if p.strip())
    try:
        (CpuOps if platform == "cpu" else GpuOps)(off=off)
    except ValueError as e:
        raise ValueError(f"config.kernels.{key}: {e} (got {text!r})") from None
    return off


def check(kernels_cfg):
    """Raises ValueError naming the bad key of `config.kernels`."""
    _choice(kernels_cfg.get("ops"))
    for platform in _NEEDS:
        _pieces_off(kernels_cfg, platform)


def from_config(kernels_cfg, mesh):
    """The kernels `config.kernels` asks for when the model runs on `mesh`."""
    platform = mesh.devices.flat[0].platform
    off = _pieces_off(kernels_cfg, platform) if platform in _NEEDS else ()
    return select(kernels_cfg.get("ops"), mesh, off)


def select(name, mesh, off=()):
    """The kernels for `config.kernels.ops = name` when the model runs on `mesh`; `off`:
    pieces of the platform's kernels left to the plain code."""
    if _choice(name) == "xla":
        return PLAIN
    platform = mesh.devices.flat[0].platform
    if name in _NEEDS and platform != _NEEDS[name]:
        raise ValueError(f"config.kernels.ops: {name!r} kernels need {_NEEDS[name].upper()} "
                         f"devices, but the mesh's devices are {platform!r} (use 'auto' or 'xla')")
    if platform == "cpu":
        return CpuOps(per_image_im2col=mesh.size > 1, off=frozenset(off))
    if platform == "gpu":
        return GpuOps(off=frozenset(off))
    return PLAIN
