"""Importing clip_jax has no side effects: no environment variable changes, no JAX backend
starts, and nothing re-executes the process (process settings are opt-in: launch/cpu_env.sh)."""
from tests.helpers import run_python


def test_import_clip_jax_changes_no_environment_variable_and_imports_no_jax():
    out = run_python("""
        import json, os, sys
        before = dict(os.environ)
        import clip_jax
        print(json.dumps({"changed": sorted(k for k in set(os.environ) | set(before)
                                            if os.environ.get(k) != before.get(k)),
                          "jax_imported": "jax" in sys.modules}))
    """)
    assert out == {"changed": [], "jax_imported": False}


def test_every_module_imports_without_side_effects():
    """After JAX itself is imported (which sets two variables of its own), importing every
    clip_jax module changes no variable, starts no JAX backend and no thread."""
    out = run_python("""
        import importlib, json, os, pkgutil, threading
        import jax
        from jax._src import xla_bridge
        before, threads = dict(os.environ), threading.active_count()
        import clip_jax
        names = [m.name for m in pkgutil.walk_packages(clip_jax.__path__, "clip_jax.")]
        for name in names:
            importlib.import_module(name)
        print(json.dumps({"modules": len(names),
                          "changed": sorted(k for k in set(os.environ) | set(before)
                                            if os.environ.get(k) != before.get(k)),
                          "backends_started": xla_bridge.backends_are_initialized(),
                          "new_threads": threading.active_count() - threads}))
    """)
    assert out["modules"] > 30
    assert out["changed"] == [] and not out["backends_started"] and out["new_threads"] == 0
