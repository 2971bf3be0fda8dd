from types import SimpleNamespace

import jax
import ml_collections
import pytest
from jax.sharding import PartitionSpec as P

from clip_jax import sharding
from clip_jax.config_lib import DEFAULT_RULES
from tests.helpers import run_python


def mesh_cfg(data=-1, fsdp=1, model=1):
    return ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, model=model))


def test_mesh_shape_fills_the_free_axis():
    assert sharding.mesh_shape(mesh_cfg(), 8) == (8, 1, 1)
    assert sharding.mesh_shape(mesh_cfg(-1, 2, 2), 8) == (2, 2, 2)
    assert sharding.mesh_shape(mesh_cfg(2, -1, 1), 8) == (2, 4, 1)


@pytest.mark.parametrize("cfg,n", [(mesh_cfg(3), 8), (mesh_cfg(-1, -1), 8), (mesh_cfg(-1, 3), 8),
                                   (mesh_cfg(0), 1)])
def test_bad_mesh_raises_naming_config_mesh(cfg, n):
    with pytest.raises(ValueError, match="config.mesh"):
        sharding.mesh_shape(cfg, n)


def test_the_config_mesh_is_one_slices_and_the_data_axis_spans_the_slices():
    assert sharding.mesh_shape(mesh_cfg(), 8, slices=2) == (8, 1, 1)
    assert sharding.mesh_shape(mesh_cfg(1, -1), 8, slices=2) == (2, 4, 1)      # FSDP per slice
    assert sharding.mesh_shape(mesh_cfg(2, 2), 8, slices=2) == (4, 2, 1)
    with pytest.raises(ValueError, match=r"config.mesh: .* 4 are available of each of the 2 slices"):
        sharding.mesh_shape(mesh_cfg(4, 2), 8, slices=2)                       # 8 per slice
    with pytest.raises(ValueError, match="config.mesh.slices"):
        sharding.mesh_shape(mesh_cfg(), 8, slices=3)


def fake_devices(processes=1, slices=None, per=4):
    """Device stand-ins: `per` devices in each of `processes` processes, over `slices` TPU
    slices (devices that name theirs; None: a platform whose devices do not, as on CPU)."""
    n = processes * per
    return [SimpleNamespace(id=i, process_index=i // per,
                            **({} if slices is None else {"slice_index": i * slices // n}))
            for i in range(n)]


@pytest.mark.parametrize("setting, devices, expected", [
    (-1, fake_devices(2, slices=2), 2), (2, fake_devices(2, slices=2), 2),
    (-1, fake_devices(8, slices=2), 2),          # slices of several hosts each
    (-1, fake_devices(1, slices=1), 1), (-1, fake_devices(2), 1), (-1, fake_devices(2, slices=1), 1),
    (2, fake_devices(2), 2), (2, fake_devices(2, slices=1), 2),   # on one slice, processes
    (1, fake_devices(2), 1)])
def test_slices_come_from_the_devices_or_the_config(setting, devices, expected):
    assert sharding.num_slices({"data": -1, "fsdp": 1, "model": 1, "slices": setting}, devices) == expected


@pytest.mark.parametrize("setting, devices, message", [
    (1, fake_devices(2, slices=2), "span 2 TPU slices"), (4, fake_devices(2, slices=2), "span 2 TPU slices"),
    (2, fake_devices(1), "on one slice and 1 processes"), (0, fake_devices(1), "positive")])
def test_a_slice_count_the_devices_cannot_have_is_refused_naming_the_key(setting, devices, message):
    with pytest.raises(ValueError, match="config.mesh.slices") as e:
        sharding.num_slices({"data": -1, "fsdp": 1, "model": 1, "slices": setting}, devices)
    assert e.match(message)


def test_batch_axes_from_rules():
    assert sharding.batch_axes(DEFAULT_RULES) == ("data", "fsdp")
    assert sharding.batch_axes((("batch", "data"),)) == ("data",)


def test_mesh_on_one_device():
    mesh = sharding.make_mesh(mesh_cfg())
    assert dict(mesh.shape) == {"data": 1, "fsdp": 1, "model": 1}


def test_param_shardings_follow_rules_on_8_devices():
    r = run_python("""
    import json, jax, flax.linen as nn, ml_collections
    from clip_jax import sharding
    from clip_jax.config_lib import DEFAULT_RULES
    mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=2, model=2)))
    class M(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Dense(16, kernel_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed", "mlp")))(x)
            return nn.Dense(3, kernel_init=nn.with_logical_partitioning(nn.initializers.ones, ("mlp", "joint")),
                            use_bias=False)(x)
    abstract = jax.eval_shape(M().init, jax.random.key(0), jax.numpy.ones((1, 6)))
    s = sharding.logical_to_sharding(abstract, mesh, DEFAULT_RULES)["params"]
    print(json.dumps({k: str(v["kernel"].spec) for k, v in s.items()}))
    """, n_devices=8)
    # embed -> fsdp, mlp -> model; 6 % 2 == 0 so both kept; 'joint' replicated
    assert r["Dense_0"] == str(P("fsdp", "model"))
    assert r["Dense_1"] == str(P("model", None))


def test_non_dividing_axis_is_dropped():
    mesh = jax.sharding.AbstractMesh((4, 2, 1), sharding.MESH_AXES)
    assert sharding._drop_indivisible_axes(P("fsdp", "model"), (3, 8), mesh) == P(None, "model")  # size-1 axis divides
    assert sharding._drop_indivisible_axes(P(("data", "fsdp"),), (4,), mesh) == P("data")
    assert sharding._drop_indivisible_axes(P(("data", "fsdp"),), (16,), mesh) == P(("data", "fsdp"))
