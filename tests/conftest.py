"""Shared test settings: float32 matmuls at full precision for parity checks, and one
persistent XLA compilation cache for the whole session, subprocesses included."""

import os

import jax
import pytest

from tests import train_utils

jax.config.update("jax_default_matmul_precision", "highest")

# The tests compile the same tiny programs many times, in this process and in the commands
# they start (train, predict, export, the multi-process clusters): the environment carries
# the cache to those, and the re-execution under mimalloc keeps the environment.
_cache = train_utils.enable_compilation_cache()
os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = str(
    jax.config.jax_persistent_cache_min_compile_time_secs)


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    """A cut-down demo data set: one train and one test reference of 56 px (= the crop)."""
    from hyperiqa_jax.data import demo

    root = tmp_path_factory.mktemp("demo")
    demo.generate_demo_dataset(str(root), size=56,
                               sources={"astronaut": (1, "train"), "camera": (1, "test")})
    return str(root)
