"""hyperiqa_jax: HyperIQA with a Swin Transformer backbone, in JAX/Flax.

Started as a CPU-heavy command (`python -m hyperiqa_jax.train`, ...), the
process re-executes itself under mimalloc here, before the command imports
anything (allocator.py); imported as a library, nothing happens.
"""

from hyperiqa_jax import allocator

__version__ = "0.1.0"

__all__ = ["QualityModel"]

allocator.preload_command()


def __getattr__(name):
    # Lazy: `import hyperiqa_jax` stays light; JAX and the model load on first use.
    if name == "QualityModel":
        from hyperiqa_jax.scoring import QualityModel

        return QualityModel
    raise AttributeError(f"module 'hyperiqa_jax' has no attribute {name!r}")
