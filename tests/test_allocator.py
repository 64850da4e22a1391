"""The commands re-execute themselves under the mimalloc the project installs."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from hyperiqa_jax import allocator

REPO = Path(__file__).resolve().parents[1]
LIB = "/site/cmeel.prefix/lib/libmimalloc.so"

# A command of its own: prints whether mimalloc is mapped, what LD_PRELOAD the
# command's environment holds, and its arguments.
PROBE = """import os, sys
from hyperiqa_jax import allocator
allocator.preload_command(commands=("probe_command",))
print('libmimalloc' in open('/proc/self/maps').read(), os.environ.get('LD_PRELOAD'), sys.argv[1:])
"""


def test_environment_for_the_re_execution():
    env = allocator.preload_environment({"PATH": "/bin"}, "linux", LIB)
    assert env == {"PATH": "/bin", "LD_PRELOAD": LIB, "MIMALLOC_PURGE_DELAY": "-1"}
    # Another preloaded library stays; a purge delay the user set stays.
    env = allocator.preload_environment({"LD_PRELOAD": "libfoo.so", "MIMALLOC_PURGE_DELAY": "10"},
                                        "linux", LIB)
    assert env["LD_PRELOAD"] == f"{LIB} libfoo.so" and env["MIMALLOC_PURGE_DELAY"] == "10"


@pytest.mark.parametrize("env, platform", [
    ({"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"}, "linux"),
    ({"LD_PRELOAD": "/opt/libjemalloc.so.2"}, "linux"),
    ({"LD_PRELOAD": LIB}, "linux"),  # already re-executed: no loop
    ({"HYPERIQA_ALLOCATOR": "system"}, "linux"),
    ({"HYPERIQA_ALLOCATOR": "SYSTEM"}, "linux"),
    ({}, "darwin"),
])
def test_no_re_execution(env, platform):
    assert allocator.preload_environment(env, platform, LIB) is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the wheel is Linux-only")
def test_the_installed_wheel_ships_the_library():
    path = allocator.library_path()
    assert path is not None and os.path.isfile(path) and "libmimalloc" in path


def _environment(**env):
    """This process's environment without any allocator choice, plus `env`."""
    return {k: v for k, v in os.environ.items()
            if k not in ("LD_PRELOAD", "HYPERIQA_ALLOCATOR", "MIMALLOC_PURGE_DELAY")} | env


def _probe(tmp_path, **env):
    (tmp_path / "probe_command.py").write_text(PROBE)
    out = subprocess.run([sys.executable, "-m", "probe_command", "arg"], cwd=tmp_path,
                         env=_environment(PYTHONPATH=str(REPO), **env),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip()


@pytest.mark.parametrize("argv, module", [
    (["python", "-m", "hyperiqa_jax.train", "--config=x"], "hyperiqa_jax.train"),
    (["python", "-X", "importtime", "-u", "-mbenchmarks.scoring"], "benchmarks.scoring"),
    (["python", "-W", "ignore", "-m", "hyperiqa_jax.demo"], "hyperiqa_jax.demo"),
    (["python", "script.py", "-m", "hyperiqa_jax.train"], None),
    (["python", "-c", "print(1)", "-m", "x"], None),
    (["python"], None),
])
def test_command_module(argv, module):
    assert allocator.command_module(argv) == module


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD is Linux's")
def test_a_command_re_executes_under_mimalloc_and_gives_its_children_the_users_environment(
        tmp_path):
    # The same command line runs again (arguments kept), now with mimalloc mapped, and
    # LD_PRELOAD is back to what the user gave (unset here; kept when set).
    assert _probe(tmp_path) == "True None ['arg']"
    assert _probe(tmp_path, LD_PRELOAD="") == "True  ['arg']"
    assert _probe(tmp_path, HYPERIQA_ALLOCATOR="system") == "False None ['arg']"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD is Linux's")
def test_library_use_never_re_executes(tmp_path):
    # Importing the package from a program that is not one of the commands.
    code = ("import hyperiqa_jax, os; "
            "print('libmimalloc' in open('/proc/self/maps').read(), os.getpid())")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path,
                         env=_environment(PYTHONPATH=str(REPO)), capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and out.stdout.split()[0] == "False", out.stderr[-2000:]


def _imports(module):
    """Modules `python -X importtime -m module --help` imports, in order, over all its
    processes (a re-executed process reports its imports after the first one's)."""
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", module, "--help"], cwd=REPO,
                         env=_environment(), capture_output=True, text=True, timeout=300)
    assert "--helpfull" in out.stdout + out.stderr, out.stderr[-2000:]  # absl's help, exit 1
    return [line.rsplit("|", 1)[-1].strip() for line in out.stderr.splitlines()
            if line.startswith("import time:")]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD is Linux's")
@pytest.mark.parametrize("module", allocator.COMMANDS)
def test_commands_re_execute_before_loading_jax(module):
    # The re-execution replaces the process: whatever the first one imported is loaded
    # twice (~2-3 s for JAX, grain and orbax on a 2-core machine). -X importtime is kept
    # across it, so both processes report their imports on stderr.
    imports = _imports(module)
    assert imports.count("hyperiqa_jax.allocator") == 2  # two processes: it did re-execute
    # The first process ends in the allocator's re-execution: it never loaded JAX.
    first_process = imports[:imports.index("hyperiqa_jax.allocator") + 1]
    assert "jax" not in first_process, first_process
