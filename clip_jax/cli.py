"""What the command lines share: the config flag and the check of its overrides, quiet
logging, and one way to stop on an error.

- `config_flag()`: the `--config=FILE[:ARG]` flag (ml_collections' config file, overridden by
  `--config.key=value`), defined after `check_overrides_or_exit` has checked every override
  against the file: ml_collections answers an unknown key with a bare AttributeError (with a
  default file, at definition time), this names the key with the closest suggestion.
- `run(main)`: absl's `app.run(main)` with `quiet_absl_logging` first.
- `stop_on(*errors)`: a block whose `errors` end the program with one line on stderr,
  `error: <message>`, and exit status 1 (`fail`), never a traceback. Every command reports
  its errors so, absl's (train, aot, summary, benchmark) and argparse's (evaluate, convert,
  tokenizer, ingest, search) alike; argparse's own usage errors keep its form (status 2).

Command-line modules use this; the library does not (tests/test_imports.py). `config_lib`
keeps the schema, tables and defaults.
"""
import contextlib
import importlib.util
import os
import sys

from clip_jax import config_lib

CONFIG_HELP = ("Config file, e.g. configs/smoke.py (FILE:ARG passes ARG to its get_config). "
               "Override keys with --config.key=value (README.md, 'Config keys').")


# ----------------------------------------------------------------------------- errors

def fail(error, at_once=False):
    """Ends the program with one line `error: <error>` on stderr, exit status 1.

    `at_once`: without the interpreter's shutdown (`os._exit`), when threads of a failed
    background save may still be running (at shutdown they print pages of "Event loop is
    closed"); stdout is flushed first, and the line is one write, so processes sharing a
    terminal do not interleave it. Only for when everything that matters is closed."""
    if not at_once:
        sys.exit(f"error: {error}")
    sys.stdout.flush()
    os.write(2, f"error: {error}\n".encode())
    os._exit(1)


@contextlib.contextmanager
def stop_on(*errors, at_once=False):
    """A block in which an exception of `errors` ends the program with `fail`."""
    try:
        yield
    except errors as e:
        fail(e, at_once)


# ----------------------------------------------------------------------------- absl commands

def config_flag(default=None, help=CONFIG_HELP):
    """Defines --config (a config file; --config.key=value overrides) once `sys.argv`'s
    overrides are checked against that file (or `default`): an unknown key ends the program
    with `error: unknown config key ...`. Returns the flag holder (`.value`: the ConfigDict)."""
    from ml_collections import config_flags
    # Before the flag is defined: with a default file, config_flags applies the overrides at
    # definition time and would fail there with a bare AttributeError.
    check_overrides_or_exit(sys.argv, default)
    return config_flags.DEFINE_config_file("config", default, help, lock_config=True)


def run(main):
    """absl's `app.run(main)`, with `quiet_absl_logging` before `main(argv)`."""
    from absl import app

    def quiet_main(argv):
        quiet_absl_logging()
        return main(argv)
    app.run(quiet_main)


def quiet_absl_logging():
    """Warnings and up only (no 'Unable to initialize backend tpu' lines), unless --verbosity
    was given. Without --verbosity, Orbax's ERROR records and asyncio's "exception was never
    retrieved" (TensorStore's futures) are dropped too: they repeat, with pages of
    traceback per array, a failed save or restore that reaches clip_jax as an exception
    and is reported by it in one line (`error: no space left on ...`)."""
    import logging as py_logging
    from absl import flags, logging
    if flags.FLAGS["verbosity"].present:
        return
    logging.set_verbosity(logging.WARNING)

    def reported_elsewhere(record):
        if record.levelno < py_logging.ERROR:
            return True
        if "/orbax/" in record.pathname.replace("\\", "/"):
            return False
        return not (record.name == "asyncio" and "exception was never retrieved" in str(record.msg))
    py_logging.getLogger("absl").addFilter(reported_elsewhere)
    py_logging.getLogger("asyncio").addFilter(reported_elsewhere)
    # TensorStore's callbacks into the event loop of a save or restore that failed and closed
    # it arrive as "unraisable" RuntimeErrors, a traceback each.
    previous = sys.unraisablehook

    def unraisable(info):
        if not (isinstance(info.exc_value, RuntimeError) and str(info.exc_value) == "Event loop is closed"):
            previous(info)
    sys.unraisablehook = unraisable


# ----------------------------------------------------------------------------- config overrides

def check_override_keys(config, argv, flag="config"):
    """Rejects `--config.a.b=v` overrides whose key `a.b` does not exist in `config`."""
    import difflib
    prefix = f"--{flag}."
    for arg in argv:
        if not arg.startswith(prefix):
            continue
        dotted = arg[len(prefix):].split("=", 1)[0]
        found, parent = config_lib.lookup(config, dotted)
        if not found and dotted in config_lib.MOVED_KEYS:
            new = config_lib.MOVED_KEYS[dotted]
            raise config_lib.ConfigError(
                f"config key '{dotted}' in {arg!r} moved to '{new}': use "
                f"{prefix}{new}={arg.split('=', 1)[1] if '=' in arg else '...'}")
        if not found:
            leaf = dotted.rsplit(".", 1)[-1]
            options = list(parent.keys()) if hasattr(parent, "keys") else []
            close = difflib.get_close_matches(leaf, options, n=1)
            hint = f" (did you mean {dotted.rsplit('.', 1)[0] + '.' if '.' in dotted else ''}{close[0]}?)" if close else ""
            raise config_lib.ConfigError(f"unknown config key '{dotted}' in {arg!r}{hint}")


def load_config_file(argv, default=None):
    """The config named by argv's --config=PATH[:ARG] (or `default`), loaded as absl would."""
    path = default
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        elif arg == "--config" and i + 1 < len(argv):
            path = argv[i + 1]
    if path is None:
        return config_lib.base_config()
    path, _, arg = path.partition(":")
    if not os.path.exists(path):
        raise config_lib.ConfigError(f"--config: no such file {path!r}")
    spec = importlib.util.spec_from_file_location("_clip_jax_config", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        raise config_lib.ConfigError(f"--config={path}: {type(e).__name__}: {e}") from None
    return module.get_config(arg) if arg else module.get_config()


def check_overrides_or_exit(argv, default=None):
    """Before absl parses argv: ends the program with a line naming an unknown --config.* key
    (or a config file that is missing or fails to load)."""
    with stop_on(config_lib.ConfigError):
        check_override_keys(load_config_file(argv, default), argv)
