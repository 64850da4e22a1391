"""Runs the CPU-heavy commands under mimalloc, which the project installs (cmeel-mimalloc).

glibc's malloc hands JAX's large temporary buffers back to the OS after every
step and page-faults them in again on the next one; a thread-caching allocator
keeps them (docs/benchmarks.md, "The allocator", has the measured effect).

An allocator has to be in LD_PRELOAD when the process starts, so a command
re-executes itself once, before it imports anything heavy, with

    LD_PRELOAD=<site-packages>/cmeel.prefix/lib/libmimalloc.so  MIMALLOC_PURGE_DELAY=-1

(purge delay -1: freed memory stays with the process). The one place that does
it is `preload_command`, which the package's `__init__` calls: `python -m
hyperiqa_jax.train` imports the package before the command's module, so the
re-execution comes before any of the command's imports. It acts only when the
process was started as one of `COMMANDS`, and does nothing when

- not on Linux, or the wheel is not installed (other platforms),
- LD_PRELOAD already names an allocator (tcmalloc, jemalloc, mimalloc: the user's
  choice is kept),
- HYPERIQA_ALLOCATOR=system (opt out: glibc's malloc).

The re-executed command takes LD_PRELOAD (and the purge delay) back out of its
environment once mimalloc is loaded, so the processes it starts (git, grain
workers, torch in tests) get the environment the user gave; a child that is
itself one of the commands re-executes itself. The allocator only concerns host
memory, so GPU/TPU hosts get it too; it is harmless there.
"""

import json
import os
import sys

OPT_OUT = "HYPERIQA_ALLOCATOR"
ALLOCATORS = ("mimalloc", "tcmalloc", "jemalloc")
LIBRARY = "cmeel.prefix/lib/libmimalloc.so"
# The commands that run JAX on the host for long enough for the allocator to matter.
COMMANDS = ("hyperiqa_jax.train", "hyperiqa_jax.demo", "hyperiqa_jax.evaluate",
            "hyperiqa_jax.predict", "hyperiqa_jax.study", "benchmarks.throughput",
            "benchmarks.scoring")
# Set for the re-executed process only: its pid, and the variables to restore.
_REEXECUTED = "_HYPERIQA_ALLOCATOR_PID"
_SAVED = "_HYPERIQA_ALLOCATOR_SAVED"
_VARIABLES = ("LD_PRELOAD", "MIMALLOC_PURGE_DELAY")


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


def command_module(argv):
    """The module of `python [options] -m MODULE ...` (sys.orig_argv), or None."""
    args = iter(argv[1:])
    for arg in args:
        if arg == "-m":
            return next(args, None)
        if arg.startswith("-m"):
            return arg[2:]
        if arg in ("-X", "-W"):  # options whose value is the next argument
            next(args, None)
        elif not arg.startswith("-") or arg in ("-c", "-"):
            return None  # a script, a -c program or stdin
    return None


def preload_command(argv=None, env=None, commands=COMMANDS):
    """Re-executes this process under mimalloc if it was started as one of `commands`.

    In the re-executed process (whose pid the environment names: exec keeps it,
    a child has another) it restores the environment the user gave instead.
    """
    env = os.environ if env is None else env
    if env.get(_REEXECUTED) == str(os.getpid()):
        for name, value in json.loads(env.pop(_SAVED, "{}")).items():
            if value is None:
                env.pop(name, None)
            else:
                env[name] = value
        return
    argv = sys.orig_argv if argv is None else argv
    if command_module(argv) not in commands:
        return
    new = preload_environment(env)
    if new is None:
        return
    new[_REEXECUTED] = str(os.getpid())
    new[_SAVED] = json.dumps({name: env.get(name) for name in _VARIABLES})
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *argv[1:]], new)
