"""The kernels the models run on, and which ones a run uses: chosen once from the mesh's
devices.

The models (`clip_jax/models`) call every platform-dependent piece on an `ops` object, an
`Ops` (plain.py): `matmul` (every dense layer), `conv` and `batch_norm` (the ResNet),
`avg_pool` (the ResNet's pools), and `scan_convolutions`. `Ops` is the plain code, which
is what runs on TPUs and GPUs, whose compilers fuse and lay out those pieces themselves;
`PLAIN` is every module's default. `CpuOps` (cpu.py) subclasses it with the XLA:CPU
variants; a test checks each against the plain piece, forward and backward.

`config.kernels` is a runtime choice, not architecture: it lives outside the saved model
block, so a checkpoint loads with whatever kernels suit the host that reads it
(`clip_jax.load(..., kernels=)`). Its keys:
- `ops`, one of `CHOICES`: 'auto' (default) is `CpuOps` on a mesh of CPU devices, the
  plain code on any other; 'xla' the plain code everywhere (e.g. to compare on a CPU);
  'cpu' `CpuOps`, only on CPU devices (they pin XLA:CPU memory layouts);
- `cpu_ops_off`, comma-separated names from `PIECES`: those pieces of `CpuOps` are left to
  the plain code, what a side-by-side run turns off to measure what each gains.

This package owns those names: config_lib's defaults are plain literals (it imports
nothing of clip_jax), and config validation asks `check`.

The choice is made from the devices of the mesh the model runs on, never from the
process's default backend, so a step traced on a CPU host for a TPU topology (clip_jax.aot)
is the TPU program.
"""
from clip_jax.ops.cpu import PIECES, CpuOps
from clip_jax.ops.plain import PLAIN, Ops

__all__ = ["CHOICES", "PIECES", "PLAIN", "CpuOps", "Ops", "check", "from_config", "select"]

CHOICES = ("auto", "xla", "cpu")


def _choice(name):
    if name not in CHOICES:
        raise ValueError(f"config.kernels.ops: must be one of {CHOICES} (got {name!r})")
    return name


def _pieces_off(text):
    """`config.kernels.cpu_ops_off` as piece names (each checked: `CpuOps`)."""
    off = frozenset(p.strip() for p in str(text or "").split(",") if p.strip())
    try:
        CpuOps(off=off)
    except ValueError as e:
        raise ValueError(f"config.kernels.cpu_ops_off: {e} (got {text!r})") from None
    return off


def check(kernels_cfg):
    """Raises ValueError naming the bad key of `config.kernels`."""
    _choice(kernels_cfg.get("ops"))
    _pieces_off(kernels_cfg.get("cpu_ops_off", ""))


def from_config(kernels_cfg, mesh):
    """The kernels `config.kernels` asks for when the model runs on `mesh`."""
    return select(kernels_cfg.get("ops"), mesh, _pieces_off(kernels_cfg.get("cpu_ops_off", "")))


def select(name, mesh, off=()):
    """The kernels for `config.kernels.ops = name` when the model runs on `mesh`; `off`:
    `CpuOps` pieces left to the plain code."""
    if _choice(name) == "xla":
        return PLAIN
    platform = mesh.devices.flat[0].platform
    if name == "cpu" and platform != "cpu":
        raise ValueError(f"config.kernels.ops: 'cpu' kernels need CPU devices, but the mesh's "
                         f"devices are {platform!r} (use 'auto' or 'xla')")
    if platform != "cpu":
        return PLAIN
    return CpuOps(per_image_im2col=mesh.size > 1, off=frozenset(off))
