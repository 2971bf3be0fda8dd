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
