"""Benchmarks, run from a checkout as `python -m benchmarks.NAME`.

Importing the package first re-executes the CPU-heavy benchmarks under
mimalloc, as the package's commands do (hyperiqa_jax/allocator.py).
"""

from hyperiqa_jax import allocator

allocator.preload_command()
