"""Importing clip_jax has no side effects: no environment variable changes, no JAX backend
starts, and nothing re-executes the process (process settings are opt-in: launch/cpu_env.sh)."""
import ast
import pathlib

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


# --- The import graph: no cycles, and function-local imports only with a reason -------------

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "clip_jax"


def _modules():
    """{dotted name: path} of every clip_jax module."""
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(name, path, modules):
    """(line, imported clip_jax module, at module level?) for each import statement in `path`;
    `from pkg import x` counts as importing pkg.x when that is a module, else pkg."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    module_level = {id(n) for n in tree.body}
    module_level |= {id(n) for top in tree.body if isinstance(top, (ast.If, ast.Try))
                     for n in ast.walk(top)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                       for a in node.names]
        else:
            continue
        for target in dict.fromkeys(targets):
            if target in modules and target != name:
                yield node.lineno, target, id(node) in module_level


def test_no_import_cycle_among_clip_jax_modules():
    """Function-local imports count too: a cycle hidden inside a function is still one."""
    modules = _modules()
    graph = {name: {t for _, t, _ in _imports(name, path, modules)} for name, path in modules.items()}
    cycles, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [])
    assert len(graph) > 40
    assert cycles == [], "\n".join(" -> ".join(c) for c in cycles)


def test_function_local_imports_of_clip_jax_say_why():
    """An import of a clip_jax module inside a function is allowed only to keep a heavy
    optional dependency (or, for `clip_jax.load`, JAX itself) from loading at import time,
    and says so in a `# lazy: <reason>` comment on its line or the line above."""
    modules = _modules()
    unexplained = []
    for name, path in modules.items():
        lines = path.read_text().splitlines()
        for lineno, target, at_module_level in _imports(name, path, modules):
            said = " ".join(lines[max(lineno - 2, 0):lineno])
            if not at_module_level and "# lazy:" not in said:
                unexplained.append(f"{path.relative_to(PACKAGE.parent)}:{lineno} imports {target}")
    assert unexplained == []


def test_each_module_imports_alone():
    """Each module imported first in a fresh interpreter (forked from one that has loaded the
    third-party libraries only), so no module works only when another was imported before it."""
    names = sorted(_modules())
    out = run_python(f"""
        import importlib, json, os, sys
        import jax, flax.linen, numpy, optax, grain, orbax.checkpoint, ml_collections
        assert not any(m == "clip_jax" or m.startswith("clip_jax.") for m in sys.modules)
        failed = {{}}
        for name in {names!r}:
            read, write = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.close(read)
                try:
                    importlib.import_module(name)
                    message = b""
                except BaseException as e:
                    message = f"{{type(e).__name__}}: {{e}}".encode()
                os.write(write, message)
                os._exit(0)
            os.close(write)
            message = os.read(read, 65536).decode()
            os.close(read)
            os.waitpid(pid, 0)
            if message:
                failed[name] = message
        print(json.dumps({{"count": {len(names)}, "failed": failed}}))
    """)
    assert out["failed"] == {} and out["count"] > 40


def test_the_library_imports_no_tool():
    """Training, evaluation and inference never import the benchmarks or the apps (tools sit
    on top of the library, not inside it)."""
    modules = _modules()
    tools = ("clip_jax.benchmark", "clip_jax.apps")
    is_tool = lambda name: any(name == t or name.startswith(t + ".") for t in tools)
    wrong = [f"{name} imports {target}" for name, path in modules.items() if not is_tool(name)
             for _, target, _ in _imports(name, path, modules) if is_tool(target)]
    assert [m for m in modules if is_tool(m)] and wrong == []


# Library modules that also hold a thin command line: a `main` over their own functions (as
# big_vision's train.py). They are library: other modules import them for those functions.
LIBRARY_WITH_MAIN = ("clip_jax.train", "clip_jax.convert", "clip_jax.data.synthetic", "clip_jax.goodput")


def _defines_main(path):
    return any(isinstance(node, ast.FunctionDef) and node.name == "main"
               for node in ast.parse(path.read_text(), str(path)).body)


def _command_line_modules(modules):
    """The command-line modules: those with a module-level `main` (a package's `__main__`
    included), except LIBRARY_WITH_MAIN."""
    return sorted(name for name, path in modules.items()
                  if _defines_main(path) and name not in LIBRARY_WITH_MAIN)


def test_no_module_imports_a_command_line_module():
    """A command-line module is an entry point: no clip_jax module imports it, the library
    nor another command line. What both need lives in a library module (train took its
    evaluators from evaluate, aot its FLOP counts from summary, the benchmark its search
    from aot: now evals/training.py, cost.py, pod.py); the shared flags and error handling
    are clip_jax/cli.py."""
    modules = _modules()
    command_lines = _command_line_modules(modules)
    wrong = [f"{name} imports {target}" for name, path in modules.items()
             for _, target, _ in _imports(name, path, modules) if target in command_lines]
    assert {"clip_jax.evaluate", "clip_jax.aot", "clip_jax.summary", "clip_jax.ingest",
            "clip_jax.tokenizer", "clip_jax.benchmark.__main__", "clip_jax.apps.search"} <= set(command_lines)
    assert all(_defines_main(modules[name]) for name in LIBRARY_WITH_MAIN)
    assert wrong == []
