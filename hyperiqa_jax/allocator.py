"""Runs the CPU-heavy commands under mimalloc, which the project installs (cmeel-mimalloc).

glibc's malloc hands JAX's large temporary buffers back to the OS after every
step and page-faults them in again on the next one; a thread-caching allocator
keeps them. Measured on the demo's training (docs/benchmarks.md, "Allocator"):
a faster run, and far fewer minor page faults and less system time.

An allocator has to be in LD_PRELOAD when the process starts, so `preload`
re-executes the command once with

    LD_PRELOAD=<site-packages>/cmeel.prefix/lib/libmimalloc.so  MIMALLOC_PURGE_DELAY=-1

(the purge delay -1: freed memory stays with the process instead of being
returned to the OS, which is what the faults came from). It does nothing when

- the command is not the program being run (a test importing `main`, library use),
- not on Linux, or the wheel is not installed (other platforms),
- LD_PRELOAD already names an allocator (tcmalloc, jemalloc, mimalloc: the user's
  choice is kept),
- HYPERIQA_ALLOCATOR=system (opt out: glibc's malloc).

The allocator only concerns host memory, so GPU/TPU hosts get it too; it is
harmless there. Child processes inherit LD_PRELOAD.
"""

import os
import sys

OPT_OUT = "HYPERIQA_ALLOCATOR"
ALLOCATORS = ("mimalloc", "tcmalloc", "jemalloc")
LIBRARY = "cmeel.prefix/lib/libmimalloc.so"


def library_path():
    """libmimalloc from the installed cmeel-mimalloc wheel, or None."""
    from importlib import metadata

    try:
        path = metadata.distribution("cmeel-mimalloc").locate_file(LIBRARY)
    except metadata.PackageNotFoundError:
        return None
    return str(path) if os.path.isfile(path) else None


def preload_environment(env, platform=sys.platform, library=None):
    """The environment to re-execute with, or None to carry on as is (pure: for tests)."""
    if platform != "linux" or env.get(OPT_OUT, "").lower() == "system":
        return None
    preloaded = env.get("LD_PRELOAD", "")
    if any(name in preloaded for name in ALLOCATORS):
        return None
    library = library or library_path()
    if library is None:
        return None
    new = dict(env)
    new["LD_PRELOAD"] = f"{library} {preloaded}".strip()
    new.setdefault("MIMALLOC_PURGE_DELAY", "-1")
    return new


def preload(caller):
    """Re-executes this command under mimalloc when `caller` (pass `__name__`) is '__main__'.

    Call it at the top of a command's module, before its other imports: the
    process is replaced, so whatever ran before runs again (importing JAX twice
    cost 2-3 s of every command's start-up on a 2-core machine).
    """
    if caller != "__main__":
        return
    env = preload_environment(os.environ)
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    # sys.orig_argv is the command line as typed (`python -m hyperiqa_jax.train ...`).
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
