"""Transparent huge pages for the host allocations of XLA:CPU, set before the process starts.

XLA:CPU allocates each execution's temporaries as one buffer (3.4 GB for an RN50 train
step at batch 16) with malloc, which glibc serves with mmap and hands back with munmap, so
every step touches ~800k fresh 4 KiB pages, and the kernel faults in and zeroes each one:
~1 s of a 5 s step on the profiled 2-core VM (BUILD_NOTES "Performance", finding 10).
glibc's tunable `glibc.malloc.hugetlb=1` makes malloc advise transparent huge pages
(2 MiB) for its mappings: ~500x fewer faults, train steps 5-23% faster there, results
unchanged. Memory is still returned to the system as before.

glibc reads its tunables once, when the process starts, so the command-line entry points
(`python -m clip_jax.train`, `.benchmark`, `.evaluate`) call `reexec_with_malloc_tunables()`
before anything else: if the tunable is missing it re-executes the same command once with
it added to `GLIBC_TUNABLES`. Nothing happens off Linux/glibc, where the kernel's
transparent huge pages are `never`, or where the user set `glibc.malloc.hugetlb`
themselves; `CLIP_JAX_MALLOC_TUNABLES=0` turns it off. Only `clip_jax/__init__.py` and this
module (standard library only) run before the re-execution. On GPU/TPU hosts it changes
only how host memory is allocated (not measured there: no accelerator was lent).
"""
import os
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT = "CLIP_JAX_MALLOC_TUNABLES"
_DONE = "_CLIP_JAX_MALLOC_REEXEC"      # set on re-execution: never loop
THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"


def _thp_available(path):
    try:
        with open(path) as f:
            return "[never]" not in f.read()
    except OSError:
        return False


def tunables_env(environ, thp_path=None):
    """The environment to re-execute with, or None when nothing should change."""
    if environ.get(OPT_OUT, "1") == "0" or environ.get(_DONE):
        return None
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return None
    current = environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" in current or not _thp_available(thp_path or THP_MODE):
        return None
    env = dict(environ)
    env["GLIBC_TUNABLES"] = f"{current}:{TUNABLE}" if current else TUNABLE
    env[_DONE] = "1"
    return env


def reexec_with_malloc_tunables(environ=None, execve=os.execve):
    """Re-executes this process's command line with `glibc.malloc.hugetlb=1` (see above)."""
    env = tunables_env(os.environ if environ is None else environ)
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        execve(sys.executable, sys.orig_argv, env)
    except OSError as e:        # e.g. no usable sys.executable: run on without the tunable
        print(f"clip_jax: could not restart with {TUNABLE} ({e}); continuing without it",
              file=sys.stderr)
