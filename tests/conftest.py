"""Test-session settings.

XLA's persistent compilation cache: the suite compiles the same programs in many
subprocesses (every CLI run of the smoke model compiles the same train step). A cached
executable is the same program, so results, bit-exact comparisons included, are
unchanged; only compile time is saved (a smoke CLI run: 25 s -> 15 s). Set before JAX is
imported, and inherited by the subprocesses the tests start.
"""
import os
import tempfile

os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), f"clip_jax_test_xla_cache_{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
# The tests run on the CPU. With the `tpu` extra installed, JAX would otherwise try to start
# libtpu's backend in every process (~0.6 s each, and warnings); the AOT tests compile for
# TPU topologies without it.
os.environ.setdefault("JAX_PLATFORMS", "cpu")



def pytest_collection_modifyitems(config, items):
    """The longest test (the 1000-step smoke acceptance run, ~4 min) goes first, so that it
    does not start late and leave one xdist worker alone at the end. (Moving every slow test
    first made the suite slower: their concurrent first runs missed the XLA compilation
    cache that the default order lets one run fill for the next.)"""
    items.sort(key=lambda item: item.name != "test_smoke_config_learns")
