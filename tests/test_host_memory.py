"""host_memory: the command-line entry points re-execute once with glibc.malloc.hugetlb=1."""
import os
import subprocess
import sys

import pytest

from clip_jax import host_memory
from tests.helpers import REPO


@pytest.fixture
def linux_glibc(monkeypatch, tmp_path):
    monkeypatch.setattr(host_memory.sys, "platform", "linux")
    monkeypatch.setattr(host_memory.platform, "libc_ver", lambda: ("glibc", "2.36"))
    thp = tmp_path / "enabled"
    thp.write_text("always [madvise] never\n")
    return str(thp)


def test_adds_the_tunable_and_keeps_the_rest(linux_glibc):
    env = host_memory.tunables_env({"PATH": "/bin"}, thp_path=linux_glibc)
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1" and env["PATH"] == "/bin"
    env = host_memory.tunables_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, thp_path=linux_glibc)
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    # The re-executed process sees the marker and leaves its environment alone: no loop.
    assert host_memory.tunables_env(env, thp_path=linux_glibc) is None


@pytest.mark.parametrize("case", ["opt_out", "user_set", "thp_never", "thp_missing", "musl"])
def test_leaves_the_environment_alone(linux_glibc, monkeypatch, tmp_path, case):
    environ, thp = {}, linux_glibc
    if case == "opt_out":
        environ = {"CLIP_JAX_MALLOC_TUNABLES": "0"}
    elif case == "user_set":
        environ = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}
    elif case == "thp_never":
        (tmp_path / "never").write_text("always madvise [never]\n")
        thp = str(tmp_path / "never")
    elif case == "thp_missing":
        thp = str(tmp_path / "absent")
    else:
        monkeypatch.setattr(host_memory.platform, "libc_ver", lambda: ("", ""))
    assert host_memory.tunables_env(environ, thp_path=thp) is None
    calls = []
    monkeypatch.setattr(host_memory, "THP_MODE", thp)
    host_memory.reexec_with_malloc_tunables(environ, execve=lambda *a: calls.append(a))
    assert calls == []


def test_a_failed_restart_runs_on(linux_glibc, monkeypatch, capsys):
    monkeypatch.setattr(host_memory, "THP_MODE", linux_glibc)

    def fail(*args):
        raise PermissionError("not allowed")
    host_memory.reexec_with_malloc_tunables({}, execve=fail)
    assert "not allowed" in capsys.readouterr().err


def test_reexecutes_the_same_command_line_once():
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", host_memory._DONE)}
    if host_memory.tunables_env(env) is None:
        pytest.skip("no glibc or no transparent huge pages here: nothing to re-execute")
    script = ("import os, sys\n"
              "print('started', flush=True)\n"
              "from clip_jax.host_memory import reexec_with_malloc_tunables\n"
              "reexec_with_malloc_tunables()\n"
              "print(os.environ['GLIBC_TUNABLES'], sys.argv[1:])\n")
    out = subprocess.run([sys.executable, "-c", script, "a", "--b=c"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120, check=True).stdout
    assert out.splitlines() == ["started", "started", "glibc.malloc.hugetlb=1 ['a', '--b=c']"]
