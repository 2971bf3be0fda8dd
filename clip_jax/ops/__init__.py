"""The kernels the models run on, chosen once from the mesh's devices.

The models (`clip_jax/models`) call every platform-dependent piece on an `ops` object, an
`Ops` (plain.py): `matmul` (every dense layer), `conv` and `batch_norm` (the ResNet),
`avg_pool` (the ResNet's pools), and `scan_convolutions`. `Ops` is the plain code, which
is what runs on TPUs and GPUs, whose compilers fuse and lay out those pieces themselves;
`PLAIN` is every module's default. `CpuOps` (cpu.py) subclasses it with the XLA:CPU
variants; a test checks each against the plain piece, forward and backward.

`config.model.ops`:
- 'auto' (default): `CpuOps` on a mesh of CPU devices, the plain code on any other;
- 'xla': the plain code everywhere (e.g. to compare on a CPU);
- 'cpu': `CpuOps`; only on CPU devices (they pin XLA:CPU memory layouts).

`config.model.cpu_ops_off` (comma-separated names from `cpu.PIECES`) leaves those pieces of
`CpuOps` to the plain code: what a side-by-side run turns off to measure what each gains.

The choice is made from the devices of the mesh the model runs on, never from the
process's default backend, so a step traced on a CPU host for a TPU topology (clip_jax.aot)
is the TPU program.
"""
from clip_jax.config_lib import MODEL_OPS as CHOICES
from clip_jax.ops.cpu import CpuOps
from clip_jax.ops.plain import PLAIN, Ops

__all__ = ["CHOICES", "PLAIN", "CpuOps", "Ops", "for_model", "select"]


def for_model(model_cfg, mesh):
    """The `ops` a model config asks for (`model.ops`, `model.cpu_ops_off`) on `mesh`."""
    off = [p.strip() for p in model_cfg.get("cpu_ops_off", "").split(",") if p.strip()]
    return select(model_cfg.get("ops", "auto"), mesh, off)


def select(name, mesh, off=()):
    """The `ops` for `config.model.ops = name` (`models.from_config(config, mesh)`) when the
    model runs on `mesh`; `off`: `CpuOps` pieces left to the plain code."""
    if name not in CHOICES:
        raise ValueError(f"config.model.ops: must be one of {CHOICES}, got {name!r}")
    if name == "xla":
        return PLAIN
    platform = mesh.devices.flat[0].platform
    if name == "cpu" and platform != "cpu":
        raise ValueError(f"config.model.ops: 'cpu' kernels need CPU devices, but the mesh's "
                         f"devices are {platform!r} (use 'auto' or 'xla')")
    if platform != "cpu":
        return PLAIN
    return CpuOps(per_image_im2col=mesh.size > 1, off=frozenset(off))
