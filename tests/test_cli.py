"""clip_jax.cli: the config flag's override check and the one way every command stops on an
error (one `error: ...` line, exit status 1, no traceback)."""
import os
import subprocess
import sys

import pytest

from clip_jax import cli, config_lib
from clip_jax.data import synthetic
from tests.helpers import REPO, run_python
from tests.test_config import load


def test_unknown_override_key_names_it_and_suggests():
    c = load(os.path.join(REPO, "configs", "smoke.py"))
    with pytest.raises(config_lib.ConfigError, match="'optim.lrr'.*did you mean optim.lr"):
        cli.check_override_keys(c, ["--config.optim.lrr=1"])
    cli.check_override_keys(c, ["--config.optim.lr=1", "--workdir=x"])


def test_every_config_command_names_an_unknown_override_key():
    """train, aot, summary and the benchmark check --config.* overrides before absl parses
    them (summary answered with ml_collections' AttributeError traceback); each command's
    `main` runs in a child forked from one interpreter that has loaded JAX."""
    out = run_python("""
        import importlib, json, os, sys
        import jax, absl.flags, ml_collections
        found = {}
        for module in ("clip_jax.train", "clip_jax.aot", "clip_jax.summary", "clip_jax.benchmark.__main__"):
            read, write = os.pipe()
            if os.fork() == 0:
                os.close(read)
                sys.argv = [module, "--config=configs/smoke.py", "--config.optim.lrr=1", "--workdir=w",
                            "--topology=v5e:2x2"]
                try:
                    importlib.import_module(module).main()
                    message = "ran"
                except SystemExit as e:
                    message = str(e.code)
                except BaseException as e:
                    message = f"{type(e).__name__}: {e}"
                os.write(write, message.encode())
                os._exit(0)
            os.close(write)
            found[module] = os.read(read, 65536).decode()
            os.close(read)
            os.wait()
        print(json.dumps(found))
    """)
    expected = ("error: unknown config key 'optim.lrr' in '--config.optim.lrr=1' "
                "(did you mean optim.lr?)")
    assert out == {m: expected for m in out} and len(out) == 4, out


def test_fail_at_once_writes_one_line_and_skips_the_interpreter_shutdown():
    """train's way out after a failed background save: stdout flushed, one `error:` line,
    status 1, and nothing of the shutdown (atexit handlers, threads' last words) runs."""
    code = ("import atexit; from clip_jax import cli; atexit.register(print, 'shutdown ran'); "
            "print('stdout so far', end=''); cli.fail(OSError('no space left on /w'), at_once=True)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert (proc.returncode, proc.stdout, proc.stderr) == (1, "stdout so far", "error: no space left on /w\n")


def test_argparse_commands_stop_the_same_way(tmp_path):
    """An unwritable --out of the synthetic export was an OSError traceback."""
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit) as stopped:
        synthetic.main(["--out", str(tmp_path / "file"), "--n", "1"])
    assert stopped.value.code.startswith("error: ") and str(tmp_path / "file") in stopped.value.code
