"""hyperiqa_jax: HyperIQA with a Swin Transformer backbone, in JAX/Flax."""

__version__ = "0.1.0"

__all__ = ["QualityModel"]


def __getattr__(name):
    # Lazy: `import hyperiqa_jax` stays light; JAX and the model load on first use.
    if name == "QualityModel":
        from hyperiqa_jax.scoring import QualityModel

        return QualityModel
    raise AttributeError(f"module 'hyperiqa_jax' has no attribute {name!r}")
